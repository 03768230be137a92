"""The model card generator (cdcl_hf.model_card): front matter, model index, body, and what it must never show."""

import re

import pytest
from huggingface_hub import ModelCard

from cdcl_hf import CDCLConfig, CDCLImageProcessor
from cdcl_hf.model_card import (
    CDCL_CITATION,
    build_model_card,
    looks_like_hub_id,
    public_training_settings,
    transformers_requirement,
)

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
SECRET = "hf_" + "SECRETtokenInAnOldRun0123456789"  # built here so no token-shaped string is committed


def config(**overrides) -> dict:
    return CDCLConfig.from_preset("tiny", num_channels=5, channel_names=CHANNELS, **overrides).to_dict()


def processor_config(**overrides) -> dict:
    settings = {"normalization": "per_channel", "image_mean": [100.0, 200.0, 300.0, 400.0, 500.0],
                "image_std": [10.0, 20.0, 30.0, 40.0, 50.0], **overrides}
    return CDCLImageProcessor(num_channels=5, channel_names=CHANNELS, size=32, **settings).to_dict()


def training_args(**overrides) -> dict:
    return {
        "dataset_name": "my-org/cellpainting-screen", "dataset_split": "train", "method": "cdcl", "domain_column": "batch",
        "normalization": "plate_controls", "learning_rate": 7e-4, "init_from_vit": "facebook/deit-small-patch16-224",
        "output_dir": "/home/alice/private-project/run", "push_to_hub": True, "hub_model_id": "org/x",
        "synthetic_num_images": 120,
        # What a training_args.json written before the token was left out may hold.
        "hub_token": SECRET, "wandb_api_key": "abc123secret", "config": f"/home/alice/{SECRET}/preset.yaml",
        **overrides,
    }


def metric(value, n=10, unit="treatments", **details):
    return {"value": value, "n": n, "defined": value is not None, "unit": unit,
            "reason": None if value is not None else "only one batch", "details": details}


RESULTS = {
    "model": "run", "dataset": "my-org/cellpainting-screen", "split": "test",
    "settings": {"profile_level": "well", "aggregate": "median", "correction": "mad", "dataset_revision": "v1.0"},
    "input_normalization": "per_plate:controls", "n_images": 500, "n_profiles": 96, "embedding_dim": 64,
    "metrics": {
        "nsc": metric(0.8125),
        "nscb": metric(None),
        "moa_map": metric(0.41, n=6, unit="MoAs"),
        "batch_classification_controls": metric(0.3, n=24, unit="profiles", chance=0.25, n_classes=4),
        "kbet_controls": metric(0.7, n=24, unit="profiles", n_batches=4, no_batch_value=0.95),
        "knn_treatment_identification": {**metric(0.01, n=40, unit="queries", chance=0.03), "informative": False,
                                         "reason": "0.010 is below its chance level 0.030"},
    },
}


def card(**kwargs) -> ModelCard:
    arguments = {"model_id": "org/cdcl-vit", "revision": "main", "export_format": "dinov2",
                 "training_dataset": "my-org/cellpainting-screen", "base_model": "facebook/deit-small-patch16-224",
                 "serving_files": ["pipeline_cdcl.py", "handler.py", "requirements.txt"], **kwargs}
    return build_model_card(config(), processor_config(), training_args(), RESULTS, **arguments)


def test_front_matter_parses_and_the_model_index_matches_the_results():
    parsed = ModelCard(str(card()))  # huggingface_hub parses the YAML front matter
    data = parsed.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-feature-extraction"
    assert data["license"] == "apache-2.0"
    assert {"microscopy", "cell-painting", "self-supervised", "cdcl", "dino"} <= set(data["tags"])
    assert "custom_code" not in data["tags"]  # a stock Dinov2Model
    assert data["datasets"] == ["my-org/cellpainting-screen"]
    assert data["base_model"] == "facebook/deit-small-patch16-224" and data["base_model_relation"] == "finetune"
    entries = {(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split, r.dataset_revision)
               for r in parsed.data.eval_results}
    defined = {(name, m["value"], RESULTS["dataset"], "test", "v1.0") for name, m in RESULTS["metrics"].items()
               if m["defined"] and m.get("informative", True)}
    assert entries == defined and ("nscb", None) not in {(e[0], e[1]) for e in entries}
    assert "knn_treatment_identification" not in {e[0] for e in entries}  # flagged: not informative


def test_body_channels_normalisation_results_limitations_and_citation():
    text = card().text
    assert "| 0 | `DNA` | 100 | 10 |" in text and "| 4 | `Mito` | 500 | 50 |" in text
    assert "image_mean=plate_pixels.mean(axis=0).tolist()" in text
    assert "| NSC (1-NN MoA accuracy, other compounds) (`nsc`) | 0.8125 | 10 treatments |" in text
    assert "not defined: only one batch" in text
    limitations = text.split("## Limitations", 1)[1].split("\n## ", 1)[0]
    assert "Batch classification accuracy, negative controls 0.3 over 4 groups (chance 0.25)" in limitations
    assert "kBET acceptance, negative controls 0.7 over 4 groups (no batch: 0.95)" in limitations
    assert "0.01, not informative: 0.010 is below its chance level 0.030" in text
    assert "`nscb` (only one batch)" in limitations and "values of `batch`" in limitations
    assert "Evaluated on the screen and split it was trained on" not in limitations  # split test != train
    assert "Format: stock `Dinov2Model`" in text
    assert 'AutoModel.from_pretrained(repo, revision="main").eval()' in text  # no trust_remote_code for the model
    assert "handler.py" in text and 'create_inference_endpoint(name, repository="org/cdcl-vit"' in text
    assert 'pipeline(model="org/cdcl-vit", revision="main", trust_remote_code=True)' in text
    assert "hub/push_space.py" in text
    assert f"transformers{transformers_requirement()}" in text
    assert "```bibtex\n" + CDCL_CITATION in text
    for author in ("Haslum", "Matsoukas", "Leuchowius", 'M{\\"u}llers', "Smith"):
        assert author in CDCL_CITATION
    assert "MIDL" in CDCL_CITATION and "2212.11595" in CDCL_CITATION


def test_no_secret_and_no_local_path_reaches_the_card():
    text = str(card())
    assert SECRET not in text and "abc123secret" not in text and "hub_token" not in text
    assert "/home/alice" not in text and "private-project" not in text
    settings = public_training_settings(training_args())
    assert not {"hub_token", "wandb_api_key", "output_dir", "push_to_hub", "hub_model_id"} & set(settings)
    assert "synthetic_num_images" not in settings  # not a synthetic run
    assert settings["learning_rate"] == 7e-4 and settings["config"] == "preset.yaml"  # a local path: its name only


def test_custom_code_format_pooling_mean_and_no_results():
    text = build_model_card(config(pooling="mean"), processor_config(normalization="per_image", image_mean=None,
                                                                     image_std=None),
                            training_args(), None, model_id="outputs/run", export_format="cdcl",
                            license="cc-by-nc-4.0").text
    data = ModelCard(build_model_card(config(pooling="mean"), processor_config(), None, None, model_id="x/y").content).data
    assert "custom_code" in data.tags and data.eval_results is None and data.datasets is None
    assert "Format: custom code (`CDCLModel`)" in text and 'pooling `mean` has no stock transformers equivalent' in text
    assert "AutoModel.from_pretrained(repo, trust_remote_code=True)" in text and "revision=" not in text
    assert "Not evaluated yet" in text and "No Endpoint handler ships" in text
    assert "standardised per channel on its own pixels" in text
    assert "license: cc-by-nc-4.0" in build_model_card(config(), processor_config(), None, None, model_id="x/y",
                                                       license="cc-by-nc-4.0").content


def test_stock_pipeline_section_explains_the_rgb_normalisation():
    three = CDCLConfig.from_preset("tiny", num_channels=3, channel_names=["DNA", "Tub", "Act"]).to_dict()
    processor = {**CDCLImageProcessor(num_channels=3, channel_names=["DNA", "Tub", "Act"], size=32,
                                      normalization="per_channel", image_mean=[300.0] * 3, image_std=[50.0] * 3).to_dict(),
                 "image_processor_type": "ViTImageProcessor", "rescale_factor": 4095 / 255, "rgb_white_level": 4095}
    text = build_model_card(three, processor, None, None, model_id="org/m", revision="main", export_format="dinov2").text
    section = text.split("## Without custom code", 1)[1].split("\n## ", 1)[0]
    assert 'pipeline("image-feature-extraction", model="org/m", revision="main")' in section
    assert "(pixel × 4095/255 − mean) / std" in section and "R = `DNA`, G = `Tub`, B = `Act`" in section
    assert "integers(0, 4096" in text  # the usage snippet's stand-in pixels span the assumed detector range


def test_evaluated_on_its_training_split_is_flagged():
    same = {**RESULTS, "split": "train"}
    text = build_model_card(config(), processor_config(), training_args(), same, model_id="x/y").text
    assert "Evaluated on the screen and split it was trained on" in text


@pytest.mark.parametrize("value, expected", [
    ("my-org/screen", True), ("facebook/deit-small-patch16-224", True), ("synthetic", False), ("/data/screen", False),
    ("./screen", False), ("a/b/c", False), ("~/screen", False), (None, False), ("org/../x", False),
])
def test_hub_id_detection(value, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_hub_id(value) is expected


def test_a_local_folder_named_like_an_id_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "screen").mkdir(parents=True)
    assert not looks_like_hub_id("data/screen")


def test_transformers_requirement_is_the_declared_range():
    pyproject = open(__file__.replace("tests/test_model_card.py", "pyproject.toml")).read()
    declared = re.search(r'"transformers([^"]+)"', pyproject).group(1)
    assert sorted(transformers_requirement().split(",")) == sorted(declared.split(","))


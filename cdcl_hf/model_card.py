"""The model card (README.md) of a CDCL embedding model, for the Hub and for a local save.

One generator, `build_model_card`, writes the card from what a run leaves behind: the model's configuration, the
image processor's settings, `training_args.json` and, when the model was evaluated, the evaluation's `results.json`
(`cdcl_hf.commands.evaluate`). `cdcl_hf.publishing.publish_model` pushes it with the model;
`cdcl_hf.training.export.export_embedding_model` saves it next to the weights of every finished run.

Front matter (huggingface_hub `ModelCardData`): `library_name: transformers`, `pipeline_tag:
image-feature-extraction`, `license`, `tags`, `datasets` (the Hub dataset trained on), `base_model` (the Hub ViT the
run started from) and a `model-index` with every metric the evaluation could compute (`defined`), on the evaluated
dataset and split.

License: a model's license is its publisher's decision, not something to copy from the training data, so the card
says `apache-2.0` (the license of cdcl-hf, whose code the repository ships) unless `license` says otherwise; the card
names the training dataset, whose own terms apply to the data.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .stock_export import default_white_level
from .training.arguments import SECRET_ARGUMENTS

__all__ = [
    "DEFAULT_LICENSE",
    "CARD_TAGS",
    "CDCL_CITATION",
    "METRIC_NAMES",
    "looks_like_hub_id",
    "public_training_settings",
    "transformers_requirement",
    "build_model_card",
    "write_model_card",
]

DEFAULT_LICENSE = "apache-2.0"
CARD_TAGS = ["microscopy", "cell-painting", "high-content-screening", "self-supervised", "cdcl", "dino", "vit",
             "image-feature-extraction"]

CDCL_CITATION = textwrap.dedent(
    """\
    @inproceedings{haslum2023cdcl,
      title     = {Metadata-guided Consistency Learning for High Content Images},
      author    = {Haslum, Johan Fredin and Matsoukas, Christos and Leuchowius, Karl-Johan and M{\\"u}llers, Erik and Smith, Kevin},
      booktitle = {Medical Imaging with Deep Learning (MIDL)},
      year      = {2023},
      eprint    = {2212.11595},
      archivePrefix = {arXiv},
      url       = {https://arxiv.org/abs/2212.11595}
    }"""
)

# Readable names and the direction of each metric of cdcl_hf.metrics (docs/evaluation.md).
METRIC_NAMES = {
    "nsc": ("NSC (1-NN MoA accuracy, other compounds)", "higher"),
    "nscb": ("NSCB (NSC excluding the query's batches)", "higher"),
    "moa_map": ("MoA mAP", "higher"),
    "replicate_map": ("Replicate mAP", "higher"),
    "knn_treatment_identification": ("kNN treatment identification (held-out batches)", "higher"),
    "silhouette_moa": ("Silhouette by MoA", "higher"),
    "batch_classification_controls": ("Batch classification accuracy, negative controls", "lower (chance: no batch)"),
    "plate_classification_controls": ("Plate classification accuracy, negative controls", "lower (chance: no batch)"),
    "silhouette_batch_controls": ("Batch silhouette (scIB, 1 = mixed), negative controls", "higher"),
    "kbet_controls": ("kBET acceptance, negative controls", "higher"),
    "ilisi_controls": ("iLISI (scaled, 1 = mixed), negative controls", "higher"),
    "silhouette_batch_scib": ("Batch silhouette within MoA (scIB)", "higher"),
    "kbet_within_treatment": ("kBET acceptance within treatment", "higher"),
    "kbet_within_moa": ("kBET acceptance within MoA", "higher"),
    "batch_classification_all_profiles": ("Batch classification accuracy, all profiles (biology confounded)", "lower"),
    "plate_classification_all_profiles": ("Plate classification accuracy, all profiles (biology confounded)", "lower"),
    "silhouette_batch_all_profiles": ("Silhouette by batch, all profiles (biology confounded)", "lower (0 = mixed)"),
    "kbet_all_profiles": ("kBET acceptance, all profiles (biology confounded)", "higher"),
    "ilisi_all_profiles": ("iLISI (scaled), all profiles (biology confounded)", "higher"),
}
# Metrics that measure how much of a nuisance grouping the embeddings still carry, where batch is not confounded
# with biology (negative controls, within a label), and NSCB.
BATCH_METRICS = (
    "batch_classification_controls", "silhouette_batch_controls", "kbet_controls", "ilisi_controls",
    "silhouette_batch_scib", "kbet_within_treatment", "kbet_within_moa", "nscb",
)

# Settings that say where and how a run wrote, not what it learned: left out of the recipe table.
RUN_PLUMBING = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "stop_after_steps", "debug", "push_to_hub",
    "hub_model_id", "hub_private_repo", "hub_export_format", "report_to", "logging_steps", "checkpointing_steps",
    "checkpoints_total_limit", "dataloader_num_workers",
}
# Anything named like a credential never reaches a card, whatever SECRET_ARGUMENTS says (older training_args.json
# files, written before the token was left out, may hold one).
SECRET_NAME = re.compile(r"token|secret|password|credential|api_key", re.IGNORECASE)
HUB_TOKEN_VALUE = re.compile(r"\bhf_[A-Za-z0-9_]{6,}")


def looks_like_hub_id(value: Any) -> bool:
    """Whether `value` reads as a Hub repo id (`namespace/name`) rather than a local path or `"synthetic"`.

    A syntactic test: `data/screen` passes it too, which is why `cdcl_hf.publishing` asks the Hub before it names a
    dataset or base model in the front matter.
    """
    if not isinstance(value, str) or value.count("/") != 1 or value.startswith((".", "/", "~")) or "\\" in value:
        return False
    if Path(value).expanduser().exists():
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]", value) is not None and ".." not in value


def _public_value(key: str, value: Any) -> Any:
    """A setting as it may appear in a public card: local paths cut to their last part, token-like strings removed."""
    if isinstance(value, str):
        value = HUB_TOKEN_VALUE.sub("[redacted]", value)
        if value.startswith(("/", "~")) or (key in ("config", "init_from_vit", "dataset_name") and Path(value).exists()):
            value = Path(value).name
    return value


def public_training_settings(training_args: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of `training_args.json` a card may show: no secrets, no run plumbing, no local paths.

    Args:
        training_args (`Mapping`): The run's stored settings.

    Returns:
        `dict`: Setting name -> public value, in the stored order.
    """
    synthetic = training_args.get("dataset_name") == "synthetic"
    settings = {}
    for key, value in training_args.items():
        if key in SECRET_ARGUMENTS or SECRET_NAME.search(key) or key in RUN_PLUMBING:
            continue
        if key.startswith("synthetic_") and not synthetic:
            continue
        settings[key] = _public_value(key, value)
    return settings


def transformers_requirement() -> str | None:
    """The transformers version range cdcl-hf declares, e.g. `">=5.18,<6"` (`None` if it cannot be found).

    Read from `pyproject.toml` when the package runs from a source checkout (what the code in use declares), else
    from the installed package's metadata.
    """
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    requirements: Iterable[str] = ()
    if pyproject.is_file():
        import tomllib

        requirements = tomllib.loads(pyproject.read_text()).get("project", {}).get("dependencies", [])
    else:
        try:
            requirements = importlib.metadata.requires("cdcl-hf") or []
        except importlib.metadata.PackageNotFoundError:
            return None
    for requirement in requirements:
        match = re.fullmatch(r"transformers\s*([<>=!~,.\d\s]+)", requirement.split(";")[0].strip())
        if match:
            parts = sorted((p.strip() for p in match.group(1).split(",")), key=lambda p: not p.startswith(">"))
            return ",".join(parts)
    return None


def _format_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(_format_number(v) for v in value)
    return "—" if value is None else str(value)


def _table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _defined_metrics(results: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    if not results:
        return {}
    # A value its own evaluation flagged as not informative (below chance, reference lacking labels) stays out of the
    # model index; the results table shows it with the reason.
    return {
        name: metric
        for name, metric in results.get("metrics", {}).items()
        if metric.get("defined") and metric.get("informative", True)
    }


def _eval_results(results: Mapping[str, Any] | None, dataset: str | None) -> list[EvalResult]:
    """One model-index entry per defined metric of `results`, on its dataset and split."""
    entries = []
    for name, metric in _defined_metrics(results).items():
        entries.append(
            EvalResult(
                task_type="image-feature-extraction",
                task_name="Profiling (cdcl-evaluate)",
                dataset_type=dataset or "unknown",
                dataset_name=dataset or "unknown",
                dataset_split=results.get("split"),
                dataset_revision=(results.get("settings") or {}).get("dataset_revision"),
                metric_type=name,
                metric_name=METRIC_NAMES.get(name, (name, ""))[0],
                metric_value=metric["value"],
            )
        )
    return entries


def _python_block(code: str) -> str:
    return f"```python\n{textwrap.dedent(code).strip()}\n```"


def build_model_card(
    config: Mapping[str, Any],
    processor_config: Mapping[str, Any],
    training_args: Mapping[str, Any] | None = None,
    results: Mapping[str, Any] | None = None,
    *,
    model_id: str,
    revision: str | None = None,
    export_format: str = "cdcl",
    license: str | None = None,
    training_dataset: str | None = None,
    base_model: str | None = None,
    serving_files: Iterable[str] = (),
    space_id: str | None = None,
    summary: Mapping[str, Any] | None = None,
) -> ModelCard:
    r"""
    The model card of a CDCL embedding model.

    Args:
        config (`Mapping`): The CDCL configuration (`CDCLConfig.to_dict()` or the training folder's `config.json`).
        processor_config (`Mapping`): The image processor's settings as saved (`preprocessor_config.json`), including
            the stock processor fields for 3-channel repositories (`cdcl_hf.stock_export`).
        training_args (`Mapping`, *optional*): The run's `training_args.json`; secrets are never shown.
        results (`Mapping`, *optional*): The evaluation's `results.json`.
        model_id (`str`): What the usage snippet loads: the Hub repo id, or the local folder.
        revision (`str`, *optional*): The branch the snippet pins (`revision="..."`); none for a local folder.
        export_format (`str`, *optional*, defaults to `"cdcl"`): `"dinov2"` (a stock `Dinov2Model`) or `"cdcl"` (the
            custom-code `CDCLModel`).
        license (`str`, *optional*): The license identifier; defaults to `DEFAULT_LICENSE`.
        training_dataset (`str`, *optional*): The Hub dataset trained on (front matter `datasets`); `None` when the
            run used a local or synthetic screen.
        base_model (`str`, *optional*): The Hub model the run started from (front matter `base_model`).
        serving_files (`Iterable[str]`, *optional*): The serving files shipped beside the model (`handler.py`, ...).
        space_id (`str`, *optional*): The Space hosting the demo.
        summary (`Mapping`, *optional*): The run's `training_summary.json` (steps trained).

    Returns:
        `ModelCard`: The card; `str(card)` is the README.md text.
    """
    training_args = dict(training_args or {})
    settings = public_training_settings(training_args)
    num_channels = int(config["num_channels"])
    channel_names = processor_config.get("channel_names") or config.get("channel_names") or [
        f"channel_{c}" for c in range(num_channels)
    ]
    normalization = processor_config.get("normalization", "per_image")
    size = processor_config.get("size") or {}
    hidden_size = int(config["hidden_size"])
    pooling = config.get("pooling", "cls")
    pooled_size = 2 * hidden_size if pooling == "cls+mean" else hidden_size
    method = training_args.get("method", "cdcl")
    steps = (summary or {}).get("global_step")
    stock = export_format == "dinov2"
    stock_processor = processor_config.get("image_processor_type") == "ViTImageProcessor"
    serving_files = list(serving_files)
    evaluated_dataset = _public_value("dataset_name", results.get("dataset")) if results else None
    model_name = model_id.rstrip("/").split("/")[-1]

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=license or DEFAULT_LICENSE,
        tags=list(CARD_TAGS) + ([] if stock else ["custom_code"]),
        datasets=[training_dataset] if training_dataset else None,
        base_model=base_model,
        model_name=model_name,
        eval_results=_eval_results(results, evaluated_dataset) or None,
        **({"base_model_relation": "finetune"} if base_model else {}),
    )

    revision_argument = f', revision="{revision}"' if revision else ""
    sections = [f"# {model_name}"]

    # ---- what it is
    trained_on = training_dataset or _public_value("dataset_name", training_args.get("dataset_name", "an unknown screen"))
    sections.append(
        f"A **{method.upper() if method == 'cdcl' else method}** embedding model for {num_channels}-channel microscopy "
        f"images: a Vision Transformer (hidden size {hidden_size}, {config['num_hidden_layers']} layers, patch "
        f"{config['patch_size']} px, trained at {size.get('height', config['image_size'])} px) whose pooled output "
        f"(`pooler_output`, {pooled_size} values, pooling `{pooling}`) is one embedding per image, for profiling "
        f"high-content screens. It is the EMA teacher of a self-supervised run on `{trained_on}`"
        + (f" ({steps} optimizer steps)" if steps else "")
        + ", trained with cdcl-hf: Cross-Domain Consistency Learning (Haslum et al., MIDL 2023): "
        "DINO self-distillation whose two global views come from two images of the same treatment imaged in "
        "different plates or batches, with per-domain teacher centring and a cross-correlation term, so that the "
        "embedding keeps the biology and drops the batch."
    )
    if stock:
        sections.append(
            "**Format: stock `Dinov2Model`.** The weights are a transformers `Dinov2Model` (layer scale 1, the "
            "normalised CLS token as `pooler_output`), numerically the CDCL backbone: `AutoModel.from_pretrained` "
            "needs no `trust_remote_code`. The multi-channel image processor is custom code "
            "(`image_processing_cdcl.py`, loaded with `trust_remote_code=True`)."
        )
    else:
        sections.append(
            "**Format: custom code (`CDCLModel`).** The model code ships in this repository "
            "(`configuration_cdcl.py`, `modeling_cdcl.py`, `image_processing_cdcl.py`); load it with "
            "`trust_remote_code=True` (or with cdcl-hf installed)"
            + (f" — pooling `{pooling}` has no stock transformers equivalent." if pooling != "cls" else ".")
        )

    # ---- channels and normalisation
    channel_rows = []
    for index, name in enumerate(channel_names):
        row = [index, f"`{name}`"]
        if normalization == "per_channel":
            row += [_format_number(processor_config["image_mean"][index]), _format_number(processor_config["image_std"][index])]
        channel_rows.append(row)
    header = ["order", "channel"] + (["mean (raw units)", "std (raw units)"] if normalization == "per_channel" else [])
    sections.append("## Input channels\n\nPass the channels in this order (channels-last `(H, W, C)` or "
                    "channels-first `(C, H, W)` arrays, or a list of per-channel planes):\n\n"
                    + _table(header, channel_rows))

    if normalization == "per_channel":
        sections.append(
            "## Normalisation\n\nTraining normalised every image by **its own plate's** per-channel mean and "
            "standard deviation (raw 8/16-bit intensity units, computed over the plate's "
            f"{'control images' if training_args.get('normalization', 'plate_controls') == 'plate_controls' else 'images'})."
            " The processor stores the average training plate (the table above), the best default for a plate "
            "without statistics. For embeddings that match training, compute each plate's statistics and pass them "
            "per call (population std over all pixels of the plate's images):\n\n"
            + _python_block(
                """
                plate_pixels = controls.reshape(-1, controls.shape[-1])  # controls: (n, H, W, C) images of one plate
                inputs = processor(list(images), image_mean=plate_pixels.mean(axis=0).tolist(),
                                   image_std=plate_pixels.std(axis=0).tolist(), return_tensors="pt")
                """
            )
            + "\n\n`cdcl-evaluate` / `cdcl_hf.normalization.PlateNormalization` do this for a whole screen."
        )
    else:
        sections.append(
            "## Normalisation\n\nEvery image is standardised per channel on its own pixels "
            f"(`normalization=\"{normalization}\"`); no statistics are needed."
        )

    # ---- usage
    load_model = (f'model = AutoModel.from_pretrained(repo{revision_argument}).eval()  # stock Dinov2Model, no custom code'
                  if stock else
                  f"model = AutoModel.from_pretrained(repo{revision_argument}, trust_remote_code=True).eval()")
    if processor_config.get("rgb_white_level"):
        example_max = int(processor_config["rgb_white_level"])
    elif normalization == "per_channel":
        example_max = default_white_level(processor_config["image_mean"], processor_config["image_std"])
    else:
        example_max = 4095
    sections.append(
        "## Usage\n\n"
        + _python_block(
            f"""
            import numpy as np
            import torch
            from transformers import AutoImageProcessor, AutoModel

            repo = "{model_id}"
            {load_model}
            processor = AutoImageProcessor.from_pretrained(repo{revision_argument}, trust_remote_code=True)

            # Stand-in pixels: use your own (H, W, {num_channels}) 8/16-bit images, channels in the order above.
            images = np.random.default_rng(0).integers(0, {example_max + 1}, size=(2, 96, 96, {num_channels}), dtype=np.uint16)
            inputs = processor(list(images), return_tensors="pt")  # resized to {size.get('height', '?')} px, normalised
            with torch.no_grad():
                embeddings = model(**inputs).pooler_output
            print(embeddings.shape)  # (2, {pooled_size})
            """
        )
        + ("\n\nThe snippet pins the branch it was pushed to; pin a commit of this repository's history "
           '(`revision="<commit sha>"`) for results that never change.' if revision else "")
        + "\n\nThe processor resizes a whole image to the model's input size. Full fields (e.g. 1080×1080) are "
        "better embedded as tiles at training resolution (`cdcl-evaluate --tile_size`, `cdcl-embed`)."
    )
    if stock and stock_processor:
        level = processor_config.get("rgb_white_level")
        meaning = (
            f"it computes `(pixel × {level}/255 − mean) / std` with the average plate's statistics: exact only for a "
            f"PNG that maps each stored channel linearly from 0 to {level} onto 0–255 (no contrast stretch, no "
            f"gamma), in the channel order above (R = `{channel_names[0]}`, G = `{channel_names[1]}`, "
            f"B = `{channel_names[2]}`). {level} is the detector range assumed (`cdcl-push --rgb_white_level`; by "
            "default the smallest 8-, 12- or 16-bit range that holds the average plate's mean + 3 std); a rendering "
            "that stretches contrast or applies a gamma shifts the inputs."
            if level else
            "it computes `(pixel / 255 − 0.5) / 0.5`, a fixed stand-in for the per-image standardisation the model "
            "was trained with, so its embeddings only approximate the CDCL processor's."
        )
        sections.append(
            "## Without custom code: the stock pipeline (RGB renderings)\n\n"
            + _python_block(
                f"""
                from transformers import pipeline

                extractor = pipeline("image-feature-extraction", model="{model_id}"{revision_argument})
                embedding = extractor("composite.png", pool=True)  # an 8-bit RGB rendering of the 3 channels
                """
            )
            + "\n\nThe stock pipeline converts every input to 8-bit RGB and uses the stock `ViTImageProcessor` "
            "settings stored in `preprocessor_config.json` (the same file holds the CDCL processor's, which "
            f"`trust_remote_code=True` loads instead): {meaning} Measured intensities (16-bit TIFF / NPY) belong "
            "in the CDCL processor above. Transformers 5.x's pipeline may ask whether to run the repository's "
            "custom processor code for a video processor it probes for: answer no, or pass `trust_remote_code=False`."
        )

    # ---- serving
    if "pipeline_cdcl.py" in serving_files:
        sections.append(
            "## Files, tiles and plates: the microscopy pipeline\n\nThis repository ships a custom pipeline "
            "(`pipeline_cdcl.py`, registered in `config.json`) for measured images: multi-channel TIFF / NPY files, "
            "one file per channel, or arrays; fields larger than the model's input are tiled, not resized.\n\n"
            + _python_block(
                f"""
                from transformers import pipeline

                embed = pipeline(model="{model_id}"{revision_argument}, trust_remote_code=True)  # microscopy-feature-extraction
                embedding = embed("field.tif")  # or {{"channels": [one file per channel]}}, or an (H, W, C) array
                """
            )
        )
    serving = ["## Hosted demo and Inference Endpoint"]
    if space_id:
        serving.append(f"A demo runs at [spaces/{space_id}](https://huggingface.co/spaces/{space_id}): upload a "
                       "multi-channel TIFF / NPY and get its embedding and nearest reference treatments.")
    else:
        serving.append("The Hub's serverless widget does not serve image-feature-extraction models. A demo Space "
                       "for this model is published from cdcl-hf's `hub/space/` with `python hub/push_space.py` "
                       "(the Hub lists Spaces that use a model on its page).")
    if "handler.py" in serving_files:
        serving.append(
            "This repository ships `handler.py` (`EndpointHandler`) and `requirements.txt` for a dedicated "
            "[Inference Endpoint](https://huggingface.co/docs/inference-endpoints): create an endpoint from this "
            "repository with task *Custom* (in the Endpoints UI, or `huggingface_hub.create_inference_endpoint(name, "
            f'repository="{model_id}"{revision_argument}, framework="pytorch", task="custom", accelerator="cpu", '
            'vendor=..., region=..., type="protected", instance_size=..., instance_type=...)`) and POST '
            '`{"inputs": <base64 PNG / TIFF / NPY, a list of base64 files (one per channel), or a nested (H, W, C) '
            'list>, "parameters": {"image_mean": [...], "image_std": [...], "tile_size": ...}}` (parameters '
            'optional); the answer is `{"embedding": [...], "dim": ..., "tiles": ...}` or `{"error": "..."}`.'
        )
    else:
        serving.append("No Endpoint handler ships with this repository.")
    sections.append("\n\n".join(serving))

    # ---- training recipe
    if settings:
        sections.append(
            "## Training recipe\n\nThe settings of the run (`training_args.json`; secrets and output locations "
            "left out):\n\n" + _table(["setting", "value"], ((f"`{k}`", _format_number(v)) for k, v in settings.items()))
        )

    # ---- results and limitations
    sections.append(_results_section(results, evaluated_dataset))
    sections.append(_limitations_section(results, training_args, evaluated_dataset))

    requirement = transformers_requirement()
    sections.append(
        "## Requirements\n\n"
        + (f"`transformers{requirement}` (the range cdcl-hf declares and tests), torch, numpy; no torchvision. "
           if requirement else "transformers 5.x, torch, numpy; no torchvision. ")
        + ("The stock `Dinov2Model` weights also load in other transformers releases that have Dinov2; the custom "
           "image processor needs the range above." if stock else "")
    )
    sections.append("## Citation\n\n```bibtex\n" + CDCL_CITATION + "\n```")

    text = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(text)


def _results_section(results: Mapping[str, Any] | None, dataset: str | None) -> str:
    if not results:
        return ("## Results\n\nNot evaluated yet. `cdcl-evaluate --model <this model> --dataset_name <screen> "
                "--output_dir eval/` scores it (NSC / NSCB, mAP, batch measures); `cdcl-push --evaluation_dir eval/` "
                "puts the scores here and in the model index.")
    rows = []
    for name, metric in results.get("metrics", {}).items():
        label, better = METRIC_NAMES.get(name, (name, ""))
        details = metric.get("details") or {}
        reference = details.get("chance", details.get("no_batch_value"))
        if not metric.get("defined"):
            value = f"not defined: {metric.get('reason')}"
        elif not metric.get("informative", True):
            value = f"{_format_number(metric['value'])}, not informative: {metric.get('reason')}"
        else:
            value = _format_number(metric["value"])
        rows.append([f"{label} (`{name}`)", value, f"{metric.get('n')} {metric.get('unit', '')}".strip(),
                     _format_number(reference) if reference is not None else "", better])
    settings = results.get("settings") or {}
    return (
        f"## Results\n\nOn `{dataset}` (split `{results.get('split')}`): {results.get('n_images')} images → "
        f"{results.get('n_profiles')} {settings.get('profile_level', '')} profiles, aggregated by "
        f"{settings.get('aggregate')}, correction `{settings.get('correction')}`, input normalisation "
        f"`{results.get('input_normalization')}` (`results.json` in this repository holds every detail).\n\n"
        + _table(["metric", "value", "n", "chance / no-batch value", "better"], rows)
    )


def _limitations_section(results: Mapping[str, Any] | None, training_args: Mapping[str, Any], dataset: str | None) -> str:
    lines = ["## Limitations", ""]
    domain = training_args.get("domain_column", "plate")
    lines.append(f"- Trained to ignore differences between values of `{domain}` (the domain column) in its training "
                 "screen; other sources of variation were not part of the objective.")
    if results:
        metrics = results.get("metrics", {})
        tested = []
        for name in BATCH_METRICS:
            metric = metrics.get(name)
            if not metric or not metric.get("defined") or not metric.get("informative", True):
                continue
            details = metric.get("details") or {}
            groups = details.get("n_classes") or details.get("n_batches") or details.get("n_labels")
            tested.append(f"{METRIC_NAMES[name][0]} {_format_number(metric['value'])}"
                          + (f" over {groups} groups" if groups else "")
                          + (f" (chance {_format_number(details['chance'])})" if "chance" in details else "")
                          + (f" (no batch: {_format_number(details['no_batch_value'])})"
                             if "no_batch_value" in details else ""))
        if tested:
            lines.append(f"- Batch effects measured on `{dataset}`: " + "; ".join(tested) + ".")
        untested = [f"`{name}` ({metric.get('reason')})" for name, metric in metrics.items()
                    if not metric.get("defined") or not metric.get("informative", True)]
        if untested:
            lines.append("- Not measured, or not informative, on the evaluation data: " + ", ".join(untested) + ".")
        if not tested:
            lines.append("- No batch-effect measure could be computed on the evaluation data: robustness to batch "
                         "effects is untested.")
        training_data = training_args.get("dataset_name")
        if dataset is not None and training_data not in (None, "synthetic") and dataset == _public_value(
            "dataset_name", training_data
        ) and results.get("split") == training_args.get("dataset_split"):
            lines.append("- Evaluated on the screen and split it was trained on: the scores are not a held-out "
                         "estimate.")
    else:
        lines.append("- Not evaluated: how much batch signal the embeddings keep is unknown.")
    lines.append("- Not tested against: other microscopes, sites or labs, cell lines, stain protocols, "
                 "magnifications or channel sets than the evaluation screen's; images must have the channels above, "
                 "in that order.")
    lines.append("- Embeddings describe image appearance; they are not validated for any diagnostic use.")
    return "\n".join(lines)


def write_model_card(folder: str | Path, card: ModelCard) -> Path:
    """Write `card` as `folder/README.md` and return its path."""
    path = Path(folder) / "README.md"
    path.write_text(str(card))
    return path


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or `None` when the file does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None

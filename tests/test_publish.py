"""Publishing a trained model (cdcl_hf.publishing, cdcl-push, cdcl-train --push_to_hub) to the in-test Hub with the
real huggingface_hub client: one commit, loadable without cdcl-hf and without custom code, no token anywhere, and no
half model after a failed push."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_fixtures import HUB_TOKEN
from hub_server import USER_NAME
from PIL import Image

from cdcl_hf import CDCLImageProcessor, CDCLModel
from cdcl_hf.commands import push
from cdcl_hf.publishing import PublishError, publish_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
# Recognisable, and never a real token: it must appear in no file, log or tracker output.
FAKE_TOKEN = "hf_" + "FAKEtokenCDCLpublishTEST0123456789"  # built here so no token-shaped string is committed
SMALL = [
    "--synthetic_num_images", "120", "--synthetic_image_size", "32", "--per_device_train_batch_size", "16",
    "--out_dim", "128", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32", "--logging_steps", "1",
    "--max_train_steps", "2",
]


def new_repo_id(kind: str) -> str:
    return f"{USER_NAME}/{kind}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def trained(hub_server, tmp_path_factory):
    """One real tiny training run (3 channels), pushed by cdcl-train itself with an overriding --hub_token."""
    workdir = tmp_path_factory.mktemp("train")
    repo_id = new_repo_id("trained")
    sent_before = len(hub_server.state.authorizations)
    result = subprocess.run(
        [sys.executable, str(TRAIN), *SMALL, "--output_dir", "run", "--report_to", "tensorboard",
         "--push_to_hub", "--hub_model_id", repo_id, "--hub_token", FAKE_TOKEN],
        cwd=workdir, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(workdir / "hf_home")},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return {
        "dir": workdir / "run", "repo_id": repo_id, "stdout": result.stdout, "stderr": result.stderr,
        "authorizations": hub_server.state.authorizations[sent_before:],
    }


@pytest.fixture(scope="module")
def evaluation(trained, tmp_path_factory):
    from cdcl_hf.commands import evaluate

    output = tmp_path_factory.mktemp("eval") / "eval"
    assert evaluate.main(["--model", str(trained["dir"]), "--dataset_name", "synthetic", "--synthetic_num_images", "120",
                          "--synthetic_image_size", "32", "--no_progress", "--output_dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def published(trained, evaluation):
    repo_id = new_repo_id("published")
    commit = publish_model(trained["dir"], repo_id, evaluation_dir=evaluation)
    return {"repo_id": repo_id, "commit": commit}


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_training_push_keeps_every_token_out(trained, hub_server, tmp_path):
    from huggingface_hub import snapshot_download

    output_dir = trained["dir"]
    # The override was used for the push (and the environment's token was not)...
    assert f"Bearer {FAKE_TOKEN}" in trained["authorizations"]
    assert f"Bearer {HUB_TOKEN}" not in trained["authorizations"]
    # ... and written nowhere: output folder (training_args.json, train_log.jsonl, README.md, checkpoints, the
    # TensorBoard event files), the pushed repository and the process's own output.
    event_files = list((output_dir / "runs").rglob("events.out.tfevents.*"))
    assert event_files, "the TensorBoard tracker wrote nothing"
    downloaded = Path(snapshot_download(trained["repo_id"], cache_dir=str(tmp_path / "cache")))
    searched = {**{f"output/{k}": v for k, v in all_bytes(output_dir).items()},
                **{f"repo/{k}": v for k, v in all_bytes(downloaded).items()},
                "stdout": trained["stdout"].encode(), "stderr": trained["stderr"].encode()}
    assert any(name.startswith("output/runs/") for name in searched) and "output/training_args.json" in searched
    for token in (FAKE_TOKEN, HUB_TOKEN):
        leaks = [name for name, content in searched.items() if token.encode() in content]
        assert not leaks, f"{token} found in {leaks}"
    stored = json.loads((output_dir / "training_args.json").read_text())
    assert "hub_token" not in stored and stored["hub_private_repo"] is False and stored["hub_model_id"] == trained["repo_id"]
    assert "pushed to " + trained["repo_id"] in trained["stderr"] + trained["stdout"]


def test_training_push_is_one_commit_of_a_stock_model_with_card(trained, hub_server):
    files = hub_server.repo_files(trained["repo_id"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "image_processing_cdcl.py", "README.md",
            "handler.py", "pipeline_cdcl.py", "requirements.txt"} <= set(files)
    # No training state, and no custom model code: the model is a stock Dinov2Model.
    assert not {"training_args.json", "train_log.jsonl", "modeling_cdcl.py"} & set(files)
    assert not any(name.startswith(("checkpoints/", "runs/")) for name in files)
    assert json.loads(files["config.json"])["model_type"] == "dinov2"
    with hub_server.state.lock:
        repo = hub_server.state.repo("model", trained["repo_id"])
        assert len(repo.commits) == 2  # the empty initial commit + the push


def test_local_output_folder_has_a_model_card(trained):
    card = (trained["dir"] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert 'repo = "run"' in card and "trust_remote_code=True" in card  # the local folder holds the CDCL model
    assert "| 2 | `Actin` |" in card and "Not evaluated yet" in card


# Runs where cdcl_hf cannot be imported: what a user of the Hub repository has.
HUB_LOADER = textwrap.dedent(
    """
    import sys

    class RefuseCdclHf:
        def find_spec(self, name, path=None, target=None):
            if name == "cdcl_hf" or name.startswith("cdcl_hf."):
                raise ModuleNotFoundError("cdcl_hf is not installed here")

    sys.meta_path.insert(0, RefuseCdclHf())
    import numpy as np
    import torch
    from transformers import AutoImageProcessor, AutoModel, pipeline

    repo, revision, inputs_file, png, output_file = sys.argv[1:6]
    inputs = np.load(inputs_file)
    stock = AutoModel.from_pretrained(repo, revision=revision).eval()  # no trust_remote_code
    assert type(stock).__module__ == "transformers.models.dinov2.modeling_dinov2", type(stock)
    trusted = AutoModel.from_pretrained(repo, revision=revision, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(repo, revision=revision, trust_remote_code=True)
    assert type(processor).__module__.startswith("transformers_modules"), type(processor)
    pixel_values = processor(list(inputs["images"]), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        results = {
            "pixel_values": pixel_values.numpy(),
            "stock": stock(pixel_values=pixel_values).pooler_output.numpy(),
            "trusted": trusted(pixel_values=pixel_values).pooler_output.numpy(),
            "stock_48": stock(pixel_values=torch.from_numpy(inputs["pixels_48"])).pooler_output.numpy(),
        }
    extractor = pipeline("image-feature-extraction", model=repo, revision=revision)
    assert type(extractor.image_processor).__module__.startswith("transformers.models.vit"), type(extractor.image_processor)
    results["pipeline"] = np.asarray(extractor(png, pool=True))
    assert not any(name.startswith("cdcl_hf") for name in sys.modules)
    np.savez(output_file, **results)
    """
)


def test_pushed_repo_loads_without_cdcl_hf_and_without_custom_code(published, trained, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 4096, size=(3, 40, 40, 3), dtype=np.uint16)
    pixels_48 = rng.standard_normal((2, 3, 48, 48)).astype(np.float32)  # an interpolated size for a 32 px model
    np.savez(tmp_path / "inputs.npz", images=images, pixels_48=pixels_48)
    rgb = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "composite.png")
    result = subprocess.run(
        [sys.executable, "-c", HUB_LOADER, published["repo_id"], published["commit"].oid, str(tmp_path / "inputs.npz"),
         str(tmp_path / "composite.png"), str(tmp_path / "out.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = np.load(tmp_path / "out.npz")

    model = CDCLModel.from_pretrained(trained["dir"]).eval()
    processor = CDCLImageProcessor.from_pretrained(trained["dir"])
    pixel_values = processor(list(images), return_tensors="pt")["pixel_values"]
    np.testing.assert_array_equal(remote["pixel_values"], pixel_values.numpy())  # the same CDCL processor
    with torch.no_grad():
        local = model(pixel_values).pooler_output.numpy()
        local_48 = model(torch.from_numpy(pixels_48)).pooler_output.numpy()
    np.testing.assert_allclose(remote["stock"], local, rtol=0, atol=1e-5)
    np.testing.assert_allclose(remote["trusted"], local, rtol=0, atol=1e-5)
    np.testing.assert_allclose(remote["stock_48"], local_48, rtol=0, atol=1e-5)

    # The stock pipeline ran the same model on the documented normalisation of the 8-bit rendering.
    files = json.loads((trained["dir"] / "preprocessor_config.json").read_text())
    white = published_processor(published)["rgb_white_level"]
    expected_pixels = (rgb.astype(np.float32) * white / 255 - files["image_mean"]) / files["image_std"]
    with torch.no_grad():
        expected = model(torch.from_numpy(expected_pixels.transpose(2, 0, 1)[None].astype(np.float32))).pooler_output
    np.testing.assert_allclose(remote["pipeline"], expected.numpy(), rtol=0, atol=1e-4)


def test_evaluation_loads_the_cdcl_processor_of_a_published_stock_repo(published, trained):
    """The repo's preprocessor_config.json also names a stock class; evaluation must still get the CDCL processor."""
    from cdcl_hf.profiling import load_feature_extractor

    model, processor = load_feature_extractor(published["repo_id"], revision=published["commit"].oid)
    assert type(model).__name__ == "Dinov2Model" and isinstance(processor, CDCLImageProcessor)
    local = CDCLImageProcessor.from_pretrained(trained["dir"])
    assert (processor.normalization, processor.image_mean, processor.image_std) == (
        local.normalization, local.image_mean, local.image_std
    )


def published_processor(published) -> dict:
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(published["repo_id"], "preprocessor_config.json",
                                           revision=published["commit"].oid)).read_text())


def card_python_blocks(card_text: str, heading: str) -> str:
    section = card_text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]


def test_card_yaml_model_index_and_snippets_run_as_written(published, evaluation, tmp_path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(published["repo_id"])
    data = card.data.to_dict()
    assert (data["library_name"], data["pipeline_tag"], data["license"]) == (
        "transformers", "image-feature-extraction", "apache-2.0"
    )
    assert {"microscopy", "cell-painting", "self-supervised", "cdcl", "dino"} <= set(data["tags"])
    results = json.loads((evaluation / "results.json").read_text())
    # Every defined metric the evaluation did not flag as uninformative (those stay in the card's table, with why).
    expected = {(name, m["value"]) for name, m in results["metrics"].items() if m["defined"] and m.get("informative", True)}
    index = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert index == expected and expected
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("synthetic", "train")}
    assert "Format: stock `Dinov2Model`" in card.text and "Metadata-guided Consistency Learning" in card.text
    assert "@inproceedings{haslum2023cdcl" in card.text and "transformers>=5.18,<6" in card.text

    # The snippets, copied from the card, in a fresh process without cdcl_hf (a user's machine).
    Image.fromarray(np.zeros((32, 32, 3), np.uint8) + 40).save(tmp_path / "composite.png")
    refuse = "import sys\nclass R:\n    def find_spec(self, n, p=None, t=None):\n        if n.split('.')[0] == 'cdcl_hf':\n            raise ModuleNotFoundError(n)\nsys.meta_path.insert(0, R())\n"
    for heading in ("Usage", "Without custom code"):
        snippet = card_python_blocks(card.text, heading)
        assert f'"{published["repo_id"]}"' in snippet and 'revision="main"' in snippet
        result = subprocess.run(
            [sys.executable, "-c", refuse + snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            stdin=subprocess.DEVNULL, env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""},
        )
        assert result.returncode == 0, f"{heading}:\n{snippet}\n{result.stderr[-3000:]}"
        if heading == "Usage":
            assert result.stdout.strip().endswith("torch.Size([2, 64])")


def test_refuses_an_unfinished_run_in_one_line(trained, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained["dir"], unfinished, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    (unfinished / "training_summary.json").unlink()
    with pytest.raises(ValueError, match="has no training_summary.json: its training run has not finished"):
        publish_model(unfinished, new_repo_id("never"))
    (unfinished / "training_summary.json").write_text(json.dumps({"global_step": 1, "finished": False}))
    with pytest.raises(SystemExit) as exit_:
        push.main([str(unfinished), new_repo_id("never")])
    message = str(exit_.value.code)
    assert message.startswith("cdcl-push: error: ") and "stopped at step 1 without finishing" in message
    assert "\n" not in message


def perturbed_run(trained_dir: Path, folder: Path, seed: int) -> Path:
    """A copy of the finished run with other weights (other LFS content than any earlier push)."""
    shutil.copytree(trained_dir, folder, ignore=shutil.ignore_patterns("checkpoints", "runs"))
    model = CDCLModel.from_pretrained(trained_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def test_failed_push_leaves_no_half_model_and_a_retry_succeeds(trained, hub_server, tmp_path):
    from huggingface_hub import HfApi
    from transformers import AutoModel

    api, repo_id = HfApi(), new_repo_id("faults")
    first = publish_model(trained["dir"], repo_id, export_format="cdcl")
    before = hub_server.repo_files(repo_id)
    run = perturbed_run(trained["dir"], tmp_path / "run2", seed=1)

    hub_server.state.faults["commit"] = 1  # the server reads the commit request, then fails
    with pytest.raises(PublishError) as failure:
        publish_model(run, repo_id)
    message = str(failure.value)
    assert "failed while creating the commit" in message and "injected fault" in message
    assert f"nothing was committed (main is still at {first.oid[:12]})" in message
    assert f"Retry with: cdcl-push {run} {repo_id}" in message
    # The branch and every file are as before: the previous model, whole, and loadable.
    assert api.model_info(repo_id).sha == first.oid and hub_server.repo_files(repo_id) == before
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, cache_dir=str(tmp_path / "c1"))
    assert type(model).__name__ == "CDCLModel"

    retry = publish_model(run, repo_id)
    files = hub_server.repo_files(repo_id)
    assert api.model_info(repo_id).sha == retry.oid != first.oid
    # The stock format replaced the custom model code in the same commit; nothing else was left behind.
    assert "modeling_cdcl.py" not in files and json.loads(files["config.json"])["model_type"] == "dinov2"
    reloaded = AutoModel.from_pretrained(repo_id, cache_dir=str(tmp_path / "c2")).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixel_values).pooler_output,
                                   CDCLModel.from_pretrained(run).eval()(pixel_values).pooler_output, rtol=0, atol=1e-5)


def test_failure_on_a_new_repo_leaves_it_empty(trained, hub_server, tmp_path):
    from transformers import AutoModel

    repo_id = new_repo_id("empty")
    hub_server.state.faults["commit"] = 1
    with pytest.raises(PublishError, match="nothing was committed"):
        publish_model(perturbed_run(trained["dir"], tmp_path / "run3", seed=2), repo_id)
    assert hub_server.repo_files(repo_id) == {}  # only the repository's initial empty commit
    with pytest.raises((OSError, ValueError), match="config.json"):  # nothing loads from it, not even half a model
        AutoModel.from_pretrained(repo_id, cache_dir=str(tmp_path / "cache"))


def test_a_transient_lfs_failure_is_retried_and_still_one_commit(trained, hub_server, tmp_path):
    repo_id = new_repo_id("lfs")
    hub_server.state.faults["lfs_upload"] = 1
    publish_model(perturbed_run(trained["dir"], tmp_path / "run4", seed=3), repo_id)
    assert hub_server.state.faults["lfs_upload"] == 0  # the fault happened, and the client's retry got through
    with hub_server.state.lock:
        assert len(hub_server.state.repo("model", repo_id).commits) == 2
    assert "model.safetensors" in hub_server.repo_files(repo_id)


def test_branch_pull_request_private_and_cli(trained, hub_server, capsys):
    from huggingface_hub import HfApi

    api, repo_id = HfApi(), new_repo_id("options")
    assert push.main([str(trained["dir"]), repo_id, "--private", "--revision", "experiment",
                      "--commit_message", "first try"]) == 0
    printed = capsys.readouterr().out
    info = api.model_info(repo_id, revision="experiment")
    assert info.private and f'revision="{info.sha}"' in printed
    assert hub_server.repo_files(repo_id, revision="main") == {}  # main untouched
    assert "README.md" in hub_server.repo_files(repo_id, revision="experiment")
    assert 'revision="experiment"' in hub_server.repo_files(repo_id, revision="experiment")["README.md"].decode()

    # A user's own file in the repo is kept by later pushes.
    api.upload_file(path_or_fileobj=b"my notes", path_in_repo="NOTES.md", repo_id=repo_id, revision="experiment")
    commit = publish_model(trained["dir"], repo_id, revision="experiment", create_pr=True, export_format="cdcl")
    assert commit.pr_num == 1
    pr_files = hub_server.repo_files(repo_id, revision="refs/pr/1")
    assert "modeling_cdcl.py" in pr_files and pr_files["NOTES.md"] == b"my notes"
    assert "modeling_cdcl.py" not in hub_server.repo_files(repo_id, revision="experiment")

    public = new_repo_id("public")
    api.create_repo(public)
    with pytest.raises(PublishError, match="exists and is public"):
        publish_model(trained["dir"], public, private=True)


def test_a_token_in_a_file_to_push_is_refused(trained, evaluation, hub_server, tmp_path):
    leaky = tmp_path / "eval"
    shutil.copytree(evaluation, leaky)
    results = json.loads((leaky / "results.json").read_text())
    results["dataset"] = f"https://user:{FAKE_TOKEN}@example.org/screen"
    (leaky / "results.json").write_text(json.dumps(results))
    repo_id = new_repo_id("leak")
    requests_before = len(hub_server.state.requests)
    with pytest.raises(ValueError, match="contains your Hub token"):
        publish_model(trained["dir"], repo_id, evaluation_dir=leaky, token=FAKE_TOKEN)
    assert not [r for r in hub_server.state.requests[requests_before:] if r[0] == "POST"]  # nothing was sent


def readme_section(heading: str) -> str:
    return (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_publish_and_use_commands_run_as_written(trained, evaluation, hub_server, tmp_path, monkeypatch, capsys):
    # The Quickstart's folders, as its commands leave them.
    shutil.copytree(trained["dir"], tmp_path / "outputs" / "cdcl-tiny-synthetic",
                    ignore=shutil.ignore_patterns("checkpoints", "runs"))
    shutil.copytree(evaluation, tmp_path / "outputs" / "eval-tiny-synthetic")
    results_file = tmp_path / "outputs" / "eval-tiny-synthetic" / "results.json"
    results_file.write_text(json.dumps({**json.loads(results_file.read_text()), "model": "outputs/cdcl-tiny-synthetic"}))

    command = re.findall(r"```bash\n(.*?)\n```", readme_section("Publish"), flags=re.DOTALL)[0]
    arguments = command.split()
    assert arguments[0] == "cdcl-push"
    monkeypatch.chdir(tmp_path)
    assert push.main(arguments[1:]) == 0
    assert "pushed commit" in capsys.readouterr().out
    assert "results.json" in hub_server.repo_files("my-org/cdcl-tiny")

    snippet = re.findall(r"```python\n(.*?)```", readme_section("Use it from the Hub"), flags=re.DOTALL)[0]
    result = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "torch.Size([2, 64])"

    # The hosted-demo command, as written, publishes the Space for the model just pushed.
    from cdcl_hf.commands import push_space

    demo = readme_section("Use it from the Hub").split("### Hosted demo and Inference Endpoint", 1)[1]
    space_command = re.findall(r"```bash\n(.*?)\n```", demo, flags=re.DOTALL)[0].split()
    assert space_command[0] == "cdcl-push-space"
    assert push_space.main(space_command[1:]) == 0
    assert {"app.py", "README.md", "profiles.parquet"} <= set(hub_server.repo_files("my-org/cdcl-demo", "space"))

    wrapper = subprocess.run([sys.executable, str(ROOT / "hub" / "push_model.py"), "--help"], capture_output=True,
                             text=True, cwd=ROOT)
    assert wrapper.returncode == 0 and wrapper.stdout.startswith("usage: cdcl-push ")

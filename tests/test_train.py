"""training/train.py (cdcl-train) end to end: the README command, resume, 2 processes, real data, and refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "training" / "train.py"
CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))

# A small synthetic screen and head so that a step takes a fraction of a second on one core.
SMALL = [
    "--synthetic_num_images", "120",
    "--synthetic_image_size", "32",
    "--per_device_train_batch_size", "16",
    "--out_dim", "128",
    "--head_hidden_dim", "64",
    "--head_bottleneck_dim", "32",
    "--logging_steps", "1",
]


def run(command: list[str], cwd: Path, expect_success: bool = True, env: dict | None = None, timeout: int = 600):
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    if expect_success:
        assert result.returncode == 0, f"{' '.join(command)}\nSTDOUT:\n{result.stdout[-3000:]}\nSTDERR:\n{result.stderr[-5000:]}"
    else:
        assert result.returncode != 0, f"expected a failure:\n{result.stdout[-2000:]}"
    return result


def train(tmp_path: Path, *arguments: str, expect_success: bool = True):
    return run([sys.executable, str(TRAIN), *SMALL, *arguments], cwd=tmp_path, expect_success=expect_success)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (a fixed one collides with another test run on the same machine)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_one_line_error(result, *fragments: str) -> None:
    """The failure ends with one line naming it (logging may precede it), and no traceback."""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cdcl-train: error: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(expected: Path, actual: Path, num_steps: int, weight_files=("model.safetensors",)) -> None:
    """Two runs trained the same: steps 1..num_steps logged with the same losses, and the same tensors in each of
    `weight_files` (paths inside both run folders)."""
    expected_log, actual_log = read_log(expected), read_log(actual)
    assert [r["step"] for r in actual_log] == list(range(1, num_steps + 1))
    for a, b in zip(expected_log, actual_log, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
    for name in weight_files:
        want, got = load_file(expected / name), load_file(actual / name)
        assert want.keys() == got.keys(), name
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_presets_parse(config):
    sys.path.insert(0, str(TRAIN.parent))
    try:
        import train as train_module
    finally:
        sys.path.pop(0)
    args = train_module.parse_args(["--config", str(config), "--learning_rate", "1e-3"])
    assert args.learning_rate == 1e-3  # flags win over the preset
    assert args.method in ("dino", "dino-cb", "cdcl")


def test_readme_command_trains_and_saves_a_loadable_model(tmp_path):
    # Exactly the README's main command, run in an empty folder on a machine with no accelerate config.
    result = run(
        ["accelerate", "launch", str(TRAIN)],
        cwd=tmp_path,
        env={"HF_HOME": str(tmp_path / "hf_home")},
    )
    output_dir = tmp_path / "outputs" / "cdcl-tiny-synthetic"
    assert "saved the teacher backbone" in result.stdout + result.stderr
    # Logging is configured as in the HF examples: the main process's INFO lines reach the user.
    assert "partner index: {'policy': 'same_domain', 'items': 936" in result.stderr
    summary = json.loads((output_dir / "training_summary.json").read_text())
    assert summary["finished"] and summary["global_step"] == 116  # 4 epochs x (936 images // batch 32)

    log = read_log(output_dir)
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"dino_loss", "cross_correlation_loss", "teacher_entropy", "lr", "teacher_temp", "pairs_cross_domain"} <= set(log[-1])

    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(output_dir, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)
    assert processor.normalization == "per_channel" and len(processor.image_mean) == 3
    images = torch.randint(0, 4000, (2, 3, 64, 64), dtype=torch.int32).numpy()
    with torch.no_grad():
        embeddings = model(**processor(list(images), return_tensors="pt")).pooler_output
    assert embeddings.shape == (2, 64) and torch.isfinite(embeddings).all()


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_kill_and_resume_gives_the_same_weights(tmp_path, streaming):
    # 104 images / batch 16 = 6 steps per pass: stopping at 3 is mid-pass, stopping at 6 is at a pass's end.
    steps = ["--max_train_steps", "9", "--checkpointing_steps", "3"]
    if streaming:
        # A stream is replayed to the checkpoint's position: the shuffle buffer and partners must come out the same.
        run([sys.executable, "-m", "cdcl_hf.synthetic_screen", "--output_dir", "screen", "--num_images", "120",
             "--image_size", "32"], cwd=tmp_path)
        steps += ["--dataset_name", "screen", "--streaming", "--shuffle_buffer_size", "32", "--steps_per_epoch", "6"]
    train(tmp_path, *steps, "--output_dir", "straight")
    train(tmp_path, *steps, "--output_dir", "resumed", "--stop_after_steps", "3")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step_3" / "training_state.json").is_file()
    for stop in ("6", "9"):
        result = train(
            tmp_path, *steps, "--output_dir", "resumed", "--resume_from_checkpoint", "latest", "--stop_after_steps", stop
        )
        assert "resumed from" in result.stdout + result.stderr

    # The same data order after resuming (every logged step has the same loss), the same teacher backbone and student.
    assert_same_run(tmp_path / "straight", tmp_path / "resumed", 9,
                    ("model.safetensors", "checkpoints/step_9/model.safetensors"))


def test_two_processes_keep_identical_student_and_teacher(tmp_path):
    result = run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(TRAIN), *SMALL, "--max_train_steps", "3", "--output_dir", "ddp",
        ],
        cwd=tmp_path,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    summary = json.loads((tmp_path / "ddp" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2, result.stdout
    rank0, rank1 = summary["replica_fingerprints"]
    assert rank0 == rank1  # student and teacher fingerprints, bit for bit
    assert (tmp_path / "ddp" / "model.safetensors").is_file()


def test_methods_and_options_run(tmp_path):
    train(tmp_path, "--method", "dino", "--max_train_steps", "2", "--output_dir", "dino", "--cpu_linear_kernel", "blas")
    train(
        tmp_path, "--method", "dino-cb", "--only_cross_domain", "--normalization", "per_image",
        "--gradient_accumulation_steps", "2", "--max_train_steps", "2", "--output_dir", "dino-cb",
    )
    log = read_log(tmp_path / "dino")
    assert "cross_correlation_loss" not in log[-1] and log[-1]["pairs_same_image"] == 16

    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "rgb-vit")
    train(
        tmp_path, "--init_from_vit", str(tmp_path / "rgb-vit"), "--mixed_precision", "bf16", "--max_train_steps", "2",
        "--output_dir", "from-vit",
    )
    assert json.loads((tmp_path / "from-vit" / "config.json").read_text())["num_channels"] == 3
    assert "cross_correlation_loss" not in read_log(tmp_path / "dino-cb")[-1]


def test_real_bbbc021_crops_loss_decreases(tmp_path, shared_data_dir):
    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    crops = shared_data_dir / "bbbc021_crops"
    build_screen_dataset(folder_source(crops / "metadata.csv", image_root=crops / "images"), output_dir=tmp_path / "bbbc021")
    # In DINO the target moves: the EMA teacher and the centres change, and centring flattens the teacher, so the
    # cross-entropy of a healthy run can rise early on. With the teacher and its centre held fixed the target is
    # stationary, and the loss falls only if data, views, model, loss and optimiser work together on real crops.
    train(
        tmp_path, "--dataset_name", str(tmp_path / "bbbc021"), "--domain_column", "batch", "--method", "dino-cb",
        "--resize_to", "64", "--per_device_train_batch_size", "32", "--max_train_steps", "40", "--warmup_epochs", "0.2",
        "--momentum_teacher", "1", "--momentum_teacher_end", "1", "--center_momentum", "1", "--output_dir", "real",
    )
    log = read_log(tmp_path / "real")
    # Some treatments were imaged in one week only; those crops fall back to a same-week partner, and are counted.
    pair_counts = {k: v for k, v in log[-1].items() if k.startswith("pairs_")}
    assert sum(pair_counts.values()) == 32 and pair_counts["pairs_cross_domain"] > 0, pair_counts
    for term in ("loss", "dino_kl"):
        values = [row[term] for row in log]
        first, last = sum(values[:8]) / 8, sum(values[-8:]) / 8
        assert last < 0.9 * first, (term, values)


def test_data_loader_workers_give_the_same_run(tmp_path):
    # Workers persist across passes (their decoded-image caches survive) and must still draw each pass's partners
    # and crops exactly as the main process does: 3 passes of 6 steps, and a resume mid-run with workers.
    steps = ["--max_train_steps", "18", "--checkpointing_steps", "9"]
    train(tmp_path, *steps, "--output_dir", "main_process")
    train(tmp_path, *steps, "--output_dir", "workers", "--dataloader_num_workers", "2", "--stop_after_steps", "9")
    train(tmp_path, *steps, "--output_dir", "workers", "--dataloader_num_workers", "2", "--resume_from_checkpoint",
          "latest")
    assert_same_run(tmp_path / "main_process", tmp_path / "workers", 18)


def test_refuses_to_mix_runs_and_mismatched_resumes(tmp_path):
    train(tmp_path, "--max_train_steps", "1", "--output_dir", "run")
    refused = train(tmp_path, "--max_train_steps", "1", "--output_dir", "run", expect_success=False)
    assert_one_line_error(refused, "already holds a training run")
    mismatch = train(
        tmp_path, "--max_train_steps", "1", "--output_dir", "run", "--resume_from_checkpoint", "latest",
        "--out_dim", "256", expect_success=False,
    )
    assert_one_line_error(mismatch, "cannot resume", "out_dim: 128 -> 256")
    train(tmp_path, "--max_train_steps", "1", "--output_dir", "run", "--overwrite_output_dir")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    failed = train(
        tmp_path, "--max_train_steps", "5", "--checkpointing_steps", "1", "--learning_rate", "1e30",
        "--warmup_epochs", "0", "--output_dir", "nan", expect_success=False,
    )
    assert_one_line_error(failed, "non-finite loss at step")
    checkpoints = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").iterdir())
    assert checkpoints and all((tmp_path / "nan" / "checkpoints" / c / "training_state.json").is_file() for c in checkpoints)
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_unpairable_screens_and_missing_columns_are_refused(tmp_path):
    # DMSO is only ever a control and every treatment only ever not: no label spans two is_control "domains".
    policy_error = train(
        tmp_path, "--domain_column", "is_control", "--single_domain_policy", "error", "--max_train_steps", "1",
        "--output_dir", "x", expect_success=False,
    )
    assert_one_line_error(policy_error, "labels occur in one domain only")
    no_partners = train(
        tmp_path, "--domain_column", "is_control", "--max_train_steps", "1", "--output_dir", "y", expect_success=False
    )
    assert_one_line_error(no_partners, "no image has a partner with the same 'treatment' in another 'is_control'")
    missing = train(tmp_path, "--label_column", "sirna", "--max_train_steps", "1", "--output_dir", "z", expect_success=False)
    assert_one_line_error(missing, "'sirna' is not a column")


def test_streams_a_hub_screen_logs_to_tensorboard_and_pushes_the_model(tmp_path, hub_server, hub_repo_id):
    from huggingface_hub import snapshot_download
    from transformers import AutoModel

    from cdcl_hf.synthetic_screen import config_for_num_images, synthetic_screen_dataset

    dataset_repo = hub_repo_id + "-screen"
    synthetic_screen_dataset(config_for_num_images(120, image_size=32)).push_to_hub(dataset_repo, max_shard_size="100KB")
    model_repo = hub_repo_id + "-model"
    result = train(
        tmp_path, "--dataset_name", dataset_repo, "--streaming", "--shuffle_buffer_size", "64", "--max_train_steps", "4",
        "--steps_per_epoch", "2", "--report_to", "tensorboard", "--output_dir", "streamed",
        "--push_to_hub", "--hub_model_id", model_repo,
    )
    assert f"pushed to {model_repo}" in result.stdout + result.stderr
    assert [row["step"] for row in read_log(tmp_path / "streamed")] == [1, 2, 3, 4]
    assert list((tmp_path / "streamed" / "runs").rglob("events.out.tfevents.*"))

    downloaded = Path(snapshot_download(model_repo, cache_dir=str(tmp_path / "cache")))
    names = {p.name for p in downloaded.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "image_processing_cdcl.py", "README.md"} <= names
    assert not {"training_args.json", "train_log.jsonl", "checkpoints", "runs"} & names
    assert f"- {dataset_repo}" in (downloaded / "README.md").read_text()
    model = AutoModel.from_pretrained(downloaded).eval()  # a stock architecture: no custom code needed
    reference = AutoModel.from_pretrained(tmp_path / "streamed", trust_remote_code=True).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=pixel_values).pooler_output, reference(pixel_values).pooler_output, rtol=0, atol=1e-5
        )

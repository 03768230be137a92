"""Training never loses data: refused output folders, kills at every point of a save, checked resumes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import read_log, run, train

STEPS = ["--max_train_steps", "3", "--checkpointing_steps", "1"]


def _tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def screen(tmp_path_factory) -> Path:
    """A saved synthetic screen (120 images of 32 px): a user's dataset folder."""
    folder = tmp_path_factory.mktemp("user_data")
    run([sys.executable, "-m", "cdcl_hf.synthetic_screen", "--output_dir", "screen", "--num_images", "120",
         "--image_size", "32"], cwd=folder)
    return folder / "screen"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("straight")
    train(folder, *STEPS, "--output_dir", "run")
    return folder / "run"


def test_an_output_folder_that_is_holds_or_lies_in_an_input_is_refused(screen):
    before = _tree(screen)
    for output_dir in (screen, screen / "inside", screen.parent):
        refused = train(screen.parent, "--dataset_name", str(screen), "--max_train_steps", "1",
                        "--output_dir", str(output_dir), "--overwrite_output_dir", expect_success=False)
        assert "input --dataset_name" in refused.stderr and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert _tree(screen) == before


def test_a_folder_the_package_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    refused = train(tmp_path, "--max_train_steps", "1", "--output_dir", "mine", "--overwrite_output_dir",
                    expect_success=False)
    assert "not a cdcl-hf training run" in refused.stderr and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert (mine / "notes.txt").read_text() == "a user's file" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "fault",
    ["checkpoint-2", "export", "summary:TERM"],
    ids=["kill-mid-checkpoint", "kill-mid-export", "sigterm-before-finished-mark"],
)
def test_a_kill_at_any_point_of_a_save_leaves_a_whole_state_and_resume_completes(tmp_path, straight_run, fault):
    command = [sys.executable, str(Path(__file__).parents[1] / "training" / "train.py")]
    from test_train import SMALL

    killed = subprocess.run([*command, *SMALL, *STEPS, "--output_dir", "run"], cwd=tmp_path, capture_output=True,
                            text=True, env={**__import__("os").environ, "CDCL_HF_FAULT": fault, "OMP_NUM_THREADS": "1"})
    assert killed.returncode < 0, killed.stderr[-2000:]  # died by the signal
    output_dir = tmp_path / "run"
    # Every checkpoint folder is whole; an interrupted one exists only as a temporary the next run removes.
    for checkpoint in (output_dir / "checkpoints").glob("step_*"):
        assert (checkpoint / "training_state.json").is_file() and (checkpoint / "model.safetensors").is_file()
    summary = output_dir / "training_summary.json"
    assert not summary.exists() or not json.loads(summary.read_text())["finished"]

    train(tmp_path, *STEPS, "--output_dir", "run", "--resume_from_checkpoint", "latest")
    assert json.loads(summary.read_text())["finished"]
    assert not list(output_dir.rglob(".cdcl-hf-tmp-*"))
    straight, resumed = load_file(straight_run / "model.safetensors"), load_file(output_dir / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [row["step"] for row in read_log(output_dir)][-1] == 3


def test_resume_checks_settings_against_the_checkpoint_wherever_it_is(tmp_path):
    train(tmp_path, *STEPS, "--stop_after_steps", "2", "--output_dir", "first")
    original_args = (tmp_path / "first" / "training_args.json").read_text()
    changed_schedule = train(tmp_path, STEPS[0], "5", *STEPS[2:], "--output_dir", "first",
                             "--resume_from_checkpoint", "latest", expect_success=False)
    assert "max_train_steps: 3 -> 5" in changed_schedule.stderr
    into_new_dir = train(tmp_path, *STEPS, "--output_dir", "second", "--normalization", "per_image",
                         "--resume_from_checkpoint", str(tmp_path / "first" / "checkpoints" / "step_2"),
                         expect_success=False)
    assert "normalization: 'plate_controls' -> 'per_image'" in into_new_dir.stderr
    assert (tmp_path / "first" / "training_args.json").read_text() == original_args
    # Same settings into a new folder: allowed (e.g. moving a run), and it continues from step 2.
    moved = train(tmp_path, *STEPS, "--output_dir", "second", "--checkpointing_steps", "5",
                  "--resume_from_checkpoint", str(tmp_path / "first" / "checkpoints" / "step_2"))
    assert "at step 2" in moved.stderr and json.loads((tmp_path / "second" / "training_summary.json").read_text())["finished"]


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train(tmp_path, *STEPS, "--stop_after_steps", "2", "--output_dir", "run")
    damaged = tmp_path / "run" / "checkpoints" / "step_2" / "optimizer.bin"
    damaged.write_bytes(damaged.read_bytes()[:100])
    resumed = train(tmp_path, *STEPS, "--output_dir", "run", "--resume_from_checkpoint", "latest")
    assert "skipping damaged checkpoint" in resumed.stderr and f"{Path('run/checkpoints/step_2/optimizer.bin')} is damaged" in resumed.stderr
    assert "resumed from" in resumed.stderr and "at step 1" in resumed.stderr


def test_resume_on_a_screen_whose_channels_changed_is_refused(tmp_path, screen):
    import datasets

    local = tmp_path / "screen"
    shutil.copytree(screen, local)
    train(tmp_path, "--dataset_name", "screen", *STEPS, "--stop_after_steps", "1", "--output_dir", "run")
    names = datasets.load_from_disk(str(local))[0]["channel_names"]
    renamed = datasets.load_from_disk(str(local)).map(lambda row: {"channel_names": names[::-1]})
    renamed.save_to_disk(str(tmp_path / "renamed"))
    shutil.rmtree(local)
    shutil.move(tmp_path / "renamed", local)
    refused = train(tmp_path, "--dataset_name", "screen", *STEPS, "--output_dir", "run",
                    "--resume_from_checkpoint", "latest", expect_success=False)
    assert f"trained on channels {names}" in refused.stderr and str(names[::-1]) in refused.stderr

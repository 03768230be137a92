"""Checkpoint bookkeeping of a training run: the output folder, where a run is, saving, finding and resuming.

A run's output folder (marked as a cdcl-hf training run, see `cdcl_hf.outputs`) holds `training_args.json` (the
settings it was started with), `checkpoints/step_<n>/` and, once finished, the exported embedding model and
`training_summary.json`. A checkpoint is accelerate's state (student, optimizer, registered teacher and centres,
RNGs) plus the settings it was made with and `training_state.json`, the position in training. It is assembled in a
temporary folder and renamed into place once complete, so `checkpoints/step_<n>/` is always whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.logging import get_logger

from ..outputs import (
    OutputSafetyError,
    atomic_write_text,
    check_output_not_an_input,
    fault_point,
    is_cdcl_output,
    remove_stale_temporaries,
    write_output_marker,
)
from .arguments import changed_resume_settings, serializable_arguments

__all__ = [
    "CHECKPOINT_MARKER",
    "TRAINING_RUN",
    "TrainingPosition",
    "prepare_output_dir",
    "write_training_args",
    "save_checkpoint",
    "load_checkpoint",
]

logger = get_logger(__name__)

TRAINING_RUN = "training_run"  # the output-marker kind of a training output folder
CHECKPOINT_MARKER = "training_state.json"
TRAINING_ARGS_FILE = "training_args.json"
TEMPORARY_CHECKPOINT_PREFIX = ".cdcl-hf-tmp-step_"
# What a training run writes, for recognising folders of runs made before the output marker existed.
RUN_ENTRIES = {
    TRAINING_ARGS_FILE, "train_log.jsonl", "training_summary.json", "checkpoints", "runs", "model.safetensors",
    "config.json", "preprocessor_config.json", "configuration_cdcl.py", "modeling_cdcl.py",
    "image_processing_cdcl.py", "README.md",
}


@dataclass
class TrainingPosition:
    r"""
    Where a run is: enough to continue with the very next batch.

    Args:
        global_step (`int`): Optimizer steps done.
        data_pass (`int`): Index of the current pass over the data (an epoch of a map-style screen, one read of a
            stream).
        batches_done_in_pass (`int`): Batches of that pass already trained on.
    """

    global_step: int = 0
    data_pass: int = 0
    batches_done_in_pass: int = 0


def _step_number(path: Path) -> int:
    return int(path.name.split("_")[1])


def _is_training_run(folder: Path) -> bool:
    if is_cdcl_output(folder, TRAINING_RUN):
        return True
    entries = {entry.name for entry in folder.iterdir()}
    return TRAINING_ARGS_FILE in entries and entries <= RUN_ENTRIES  # a run from before the marker


def _local_path(value: str | None) -> str | None:
    return value if value and Path(value).exists() else None


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Make `--output_dir` ready for this run, refusing anything that could lose or mix data.

    Refused: an output folder that is, contains or lies inside an input (the dataset, the ViT to start from, the
    preset file); a non-empty folder that is not a cdcl-hf training run (even with `--overwrite_output_dir`); a
    training run without `--resume_from_checkpoint` unless `--overwrite_output_dir` (which replaces only a run).
    """
    output_dir = args.output_dir
    check_output_not_an_input(
        output_dir,
        {
            "--dataset_name": _local_path(args.dataset_name),
            "--init_from_vit": _local_path(args.init_from_vit),
            "--config": args.config,
        },
    )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputSafetyError(f"--output_dir {output_dir} is a file; choose a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not _is_training_run(output_dir):
            raise OutputSafetyError(
                f"--output_dir {output_dir} holds files that are not a cdcl-hf training run; it is never written into "
                "or replaced. Choose a new or empty folder."
            )
        if args.resume_from_checkpoint is None:
            if not args.overwrite_output_dir:
                raise OutputSafetyError(
                    f"{output_dir} already holds a training run ({TRAINING_ARGS_FILE}). Pass --resume_from_checkpoint "
                    "latest to continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
                )
            shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_output_marker(output_dir, TRAINING_RUN)
    remove_stale_temporaries(output_dir)
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir():
        remove_stale_temporaries(checkpoints)
        for leftover in checkpoints.glob(f"{TEMPORARY_CHECKPOINT_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)


def write_training_args(args: argparse.Namespace) -> None:
    """Store the run's settings, once: a resumed run keeps the settings it was started with."""
    path = args.output_dir / TRAINING_ARGS_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(serializable_arguments(args), indent=2))


def save_checkpoint(
    accelerator: Accelerator,
    args: argparse.Namespace,
    position: TrainingPosition,
    channel_names: list[str],
) -> None:
    """Save accelerate's state, the settings and the position as `checkpoints/step_<n>/`, whole or not at all.

    Keeps the newest `--checkpoints_total_limit` checkpoints.
    """
    checkpoints = args.output_dir / "checkpoints"
    final = checkpoints / f"step_{position.global_step}"
    staging = checkpoints / f"{TEMPORARY_CHECKPOINT_PREFIX}{position.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fault_point(f"checkpoint-{position.global_step}")
        atomic_write_text(staging / TRAINING_ARGS_FILE, json.dumps(serializable_arguments(args), indent=2))
        state = {**asdict(position), "channel_names": channel_names, "files": _file_manifest(staging)}
        atomic_write_text(staging / CHECKPOINT_MARKER, json.dumps(state))
        if final.exists():  # the same step saved again (a resumed run stopping where it started)
            shutil.rmtree(final)
        os.replace(staging, final)
        if args.checkpoints_total_limit:
            complete = sorted((p for p in checkpoints.glob("step_*") if (p / CHECKPOINT_MARKER).is_file()),
                              key=_step_number)
            for old in complete[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _file_manifest(checkpoint: Path) -> dict[str, list]:
    """Size and SHA-256 of every file of a checkpoint: resume checks them and names the file that changed."""
    return {
        str(path.relative_to(checkpoint)): [path.stat().st_size, _sha256(path)]
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_MARKER)
    }


def _verify_files(checkpoint: Path, manifest: dict[str, list]) -> None:
    for name, (size, sha256) in manifest.items():
        path = checkpoint / name
        if not path.is_file():
            raise OSError(f"{path} is missing")
        if path.stat().st_size != size or _sha256(path) != sha256:
            raise OSError(f"{path} is damaged ({path.stat().st_size} bytes, saved with {size}; its checksum differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidates(args: argparse.Namespace) -> list[Path]:
    """The checkpoints `--resume_from_checkpoint` allows, in the order to try them."""
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise OutputSafetyError(
                f"--resume_from_checkpoint {path} is not a complete checkpoint (no {CHECKPOINT_MARKER}); "
                "give a checkpoints/step_<n> folder of a run, or latest"
            )
        return [path]
    checkpoints = args.output_dir / "checkpoints"
    steps = [p for p in checkpoints.glob("step_*") if p.name.split("_")[1].isdigit()] if checkpoints.is_dir() else []
    return sorted(steps, key=_step_number, reverse=True)


def _stored_settings(checkpoint: Path) -> dict[str, Any]:
    """The settings a checkpoint was made with (its own copy; older checkpoints: their run's training_args.json)."""
    for path in (checkpoint / TRAINING_ARGS_FILE, checkpoint.parent.parent / TRAINING_ARGS_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    raise OutputSafetyError(f"checkpoint {checkpoint} carries no {TRAINING_ARGS_FILE}; its settings cannot be checked")


def _check_resume_settings(checkpoint: Path, args: argparse.Namespace, channel_names: list[str], state: dict) -> None:
    changed = changed_resume_settings(_stored_settings(checkpoint), serializable_arguments(args))
    if changed:
        raise SystemExit(
            f"cannot resume from {checkpoint}: it was made with different settings ({', '.join(changed)}). "
            "Resume with the original settings, or start a new run in another --output_dir."
        )
    stored_channels = state.get("channel_names")
    if stored_channels is not None and list(stored_channels) != list(channel_names):
        raise SystemExit(
            f"cannot resume from {checkpoint}: it was trained on channels {stored_channels}, the screen has "
            f"{channel_names}; resume on the same screen, or start a new run"
        )


def load_checkpoint(accelerator: Accelerator, args: argparse.Namespace, channel_names: list[str]) -> TrainingPosition:
    """Restore the checkpoint `--resume_from_checkpoint` names and return its position (fresh without one).

    Every resume is checked against the settings the checkpoint was made with (a setting that changes the meaning of
    its tensors, the data order or the schedules is refused, named) and the screen's channel names. With `latest`,
    a damaged newest checkpoint is skipped with a warning naming it, and the previous complete one is used.
    """
    if args.resume_from_checkpoint is None:
        return TrainingPosition()
    for checkpoint in _candidates(args):
        marker = checkpoint / CHECKPOINT_MARKER
        try:
            state = json.loads(marker.read_text())
            _check_resume_settings(checkpoint, args, channel_names, state)
            position = TrainingPosition(**{f.name: int(state[f.name]) for f in fields(TrainingPosition)})
            _verify_files(checkpoint, state.get("files", {}))  # checkpoints before the manifest: load errors only
            accelerator.load_state(str(checkpoint))
        except SystemExit:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable part means this checkpoint is damaged
            if args.resume_from_checkpoint != "latest":
                raise OutputSafetyError(f"cannot resume from {checkpoint}: {type(error).__name__}: {error}") from error
            logger.warning(
                f"skipping damaged checkpoint {checkpoint} ({type(error).__name__}: {error}); trying an older one",
                main_process_only=False,
            )
            continue
        logger.info(f"resumed from {checkpoint} at step {position.global_step}")
        return position
    run_settings = args.output_dir / TRAINING_ARGS_FILE
    if run_settings.is_file():  # a run stopped before its first checkpoint: restart it with its own settings only
        changed = changed_resume_settings(json.loads(run_settings.read_text()), serializable_arguments(args))
        if changed:
            raise SystemExit(
                f"cannot resume: {args.output_dir} holds a run with different settings ({', '.join(changed)}). "
                "Resume with the original settings, or start a new run in another --output_dir."
            )
    logger.warning(f"no complete checkpoint in {args.output_dir / 'checkpoints'}; starting from scratch")
    return TrainingPosition()

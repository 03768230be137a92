"""Checkpoint bookkeeping of a training run: the output folder, where a run is, saving, finding and resuming.

A run's output folder holds `training_args.json` (its settings), `checkpoints/step_<n>/` (accelerate's state: student,
optimizer, registered teacher and centres, RNGs; plus `training_state.json`, the position in training, written last:
a folder without it is an interrupted save that resume ignores) and, once finished, the exported embedding model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from .arguments import RESUME_FIXED_SETTINGS, serializable_arguments

__all__ = [
    "CHECKPOINT_MARKER",
    "TrainingPosition",
    "prepare_output_dir",
    "write_training_args",
    "find_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
]

logger = get_logger(__name__)

CHECKPOINT_MARKER = "training_state.json"
TRAINING_ARGS_FILE = "training_args.json"


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


def _complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    candidates = sorted(checkpoints_dir.glob("step_*"), key=_step_number)
    return [path for path in candidates if (path / CHECKPOINT_MARKER).is_file()]


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Refuse to mix two runs in one folder, and a resume whose settings differ from the stored run's."""
    previous_args_file = args.output_dir / TRAINING_ARGS_FILE
    if not previous_args_file.is_file():
        return
    if args.resume_from_checkpoint is not None:
        previous = json.loads(previous_args_file.read_text())
        current = serializable_arguments(args)
        changed = [key for key in RESUME_FIXED_SETTINGS if previous.get(key) != current.get(key)]
        if changed:
            details = ", ".join(f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in changed)
            raise SystemExit(
                f"cannot resume: {args.output_dir} holds a run with different settings ({details}). "
                "Resume with the original settings, or start a new run in another --output_dir."
            )
        return
    if args.overwrite_output_dir:
        shutil.rmtree(args.output_dir)
        return
    raise SystemExit(
        f"{args.output_dir} already holds a training run ({TRAINING_ARGS_FILE}). Pass --resume_from_checkpoint latest "
        "to continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
    )


def write_training_args(args: argparse.Namespace) -> None:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / TRAINING_ARGS_FILE).write_text(json.dumps(serializable_arguments(args), indent=2))


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint `--resume_from_checkpoint` names ("latest": the newest complete one), or None."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / CHECKPOINT_MARKER).is_file():
            raise SystemExit(f"{path} is not a checkpoint folder (no {CHECKPOINT_MARKER})")
        return path
    complete = _complete_checkpoints(args.output_dir / "checkpoints")
    if not complete:
        logger.warning(f"no checkpoint in {args.output_dir / 'checkpoints'}; starting from scratch")
        return None
    return complete[-1]


def save_checkpoint(accelerator: Accelerator, output_dir: Path, position: TrainingPosition, total_limit: int) -> None:
    """accelerate's state, then the position (marking the checkpoint complete); keeps the newest `total_limit`."""
    checkpoint = output_dir / "checkpoints" / f"step_{position.global_step}"
    accelerator.save_state(str(checkpoint))
    if accelerator.is_main_process:
        (checkpoint / CHECKPOINT_MARKER).write_text(json.dumps(asdict(position)))
        if total_limit:
            for old in _complete_checkpoints(checkpoint.parent)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, checkpoint: Path | None) -> TrainingPosition:
    """Restore accelerate's state from `checkpoint` and return its position (a fresh position for None)."""
    if checkpoint is None:
        return TrainingPosition()
    accelerator.load_state(str(checkpoint))
    position = TrainingPosition(**json.loads((checkpoint / CHECKPOINT_MARKER).read_text()))
    logger.info(f"resumed from {checkpoint} at step {position.global_step}")
    return position

"""What a run tells its user: logging set up as in the Hugging Face examples, trackers, and the step log."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import datasets
import transformers
from accelerate import Accelerator

from ..pairing import count_pair_cases
from .arguments import serializable_arguments
from .step import StepOutput

__all__ = ["configure_logging", "init_trackers", "StepLogger"]


def configure_logging(accelerator: Accelerator) -> None:
    """INFO on the main process, warnings only on the others; datasets / transformers at warning level."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
        force=True,
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def init_trackers(accelerator: Accelerator, args: argparse.Namespace) -> None:
    if args.report_to == "none":
        return
    # Trackers (TensorBoard's hparams) take scalars only.
    config = {
        key: (str(value) if isinstance(value, list) else value)
        for key, value in serializable_arguments(args).items()
        if value is not None
    }
    accelerator.init_trackers("cdcl", config=config)


class StepLogger:
    r"""
    Logs every `logging_steps` optimizer steps (and the first and last): trackers, `train_log.jsonl` and the progress
    bar. Pair cases (how each item's partner was chosen) are counted over every batch since the last log line.

    Args:
        accelerator (`Accelerator`): Logs go to its trackers; the file is written by the main process.
        log_file (`Path`): The JSON-lines log.
        logging_steps (`int`): Interval in optimizer steps.
        progress_bar: A tqdm bar whose postfix shows the loss.
    """

    def __init__(self, accelerator: Accelerator, log_file: Path, logging_steps: int, progress_bar: Any):
        self.accelerator, self.log_file, self.logging_steps, self.progress_bar = (
            accelerator, log_file, logging_steps, progress_bar
        )
        self.pair_cases: dict[str, int] = {}

    def count_pairs(self, batch: dict[str, Any]) -> None:
        for case, count in count_pair_cases(batch["pair_case"]).items():
            self.pair_cases[case] = self.pair_cases.get(case, 0) + count

    def maybe_log(self, step: StepOutput, global_step: int, epoch: int, optimizer, momentum: float, last_step: int):
        """Write a log line if `global_step` (the number of optimizer steps done) is due."""
        if not (global_step % self.logging_steps == 0 or global_step == last_step or global_step == 1):
            return
        logs = {name: value.item() for name, value in step.loss.logs.items()}
        logs.update(
            step=global_step,
            epoch=epoch,
            lr=optimizer.param_groups[0]["lr"],
            weight_decay=optimizer.param_groups[0]["weight_decay"],
            teacher_momentum=momentum,
            **({"grad_norm": step.grad_norm} if step.grad_norm is not None else {}),
            **{f"pairs_{case}": count for case, count in self.pair_cases.items() if count},
        )
        self.progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.accelerator.log(logs, step=global_step)
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as handle:
                handle.write(json.dumps(logs) + "\n")
        self.pair_cases = {}

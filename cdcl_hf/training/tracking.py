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

__all__ = ["configure_logging", "init_trackers", "CollapseGuard", "StepLogger"]

logger = logging.getLogger(__name__)


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


# Teacher entropy / log K from which the teacher's outputs count as uniform (a run drifting to collapse).
UNIFORM_ENTROPY_RATIO = 0.95


class CollapseGuard:
    r"""
    Warns when the teacher drifts into one of DINO's two collapses, read off each log line's collapse indicators:
    - to **uniform**: every output is close to the uniform distribution (`teacher_entropy_ratio` >= `uniform_ratio`);
      the head then carries almost no information and the student learns little;
    - onto **a few dimensions**: the batch's mean output concentrates on few of the K outputs
      (`teacher_kl_to_uniform` >= `few_dimensions_fraction` x log K, i.e. fewer than about K^(1 - fraction) in use).
    The early steps are skipped (a fresh head's outputs are near uniform while the teacher temperature warms up).
    Each kind is warned once, and again only after the run has recovered from it.

    Args:
        log_k (`float`): log of the head's output dimension K.
        start_step (`int`): The first optimizer step checked.
        uniform_ratio (`float`, *optional*, defaults to 0.95): Entropy ratio from which the teacher counts as uniform.
        few_dimensions_fraction (`float`, *optional*, defaults to 0.5): Fraction of log K from which the KL to uniform
            counts as a collapse onto few dimensions.
    """

    HINT = ("lower --teacher_temp, centre over fewer, larger domains (--domain_column) or raise --out_dim; "
            "benchmarks/results/tuning_bbbc021_crops.md shows what moved these runs")

    def __init__(self, log_k: float, start_step: int, uniform_ratio: float = UNIFORM_ENTROPY_RATIO,
                 few_dimensions_fraction: float = 0.5):
        self.log_k, self.start_step = log_k, start_step
        self.uniform_ratio, self.few_dimensions_fraction = uniform_ratio, few_dimensions_fraction
        self.active: set[str] = set()

    def check(self, logs: dict[str, Any]) -> list[str]:
        """The collapse kinds this log line is in (warning on entering one); empty before `start_step`."""
        if logs["step"] < self.start_step or "teacher_entropy_ratio" not in logs:
            return []
        ratio, kl = logs["teacher_entropy_ratio"], logs["teacher_kl_to_uniform"]
        states = {
            "uniform": (ratio >= self.uniform_ratio,
                        f"teacher entropy ratio {ratio:.3f} >= {self.uniform_ratio} (KL to uniform {kl:.3f}): the "
                        "teacher's outputs are drifting to uniform"),
            "few_dimensions": (kl >= self.few_dimensions_fraction * self.log_k,
                               f"teacher KL to uniform {kl:.3f} >= {self.few_dimensions_fraction} x log K "
                               f"({self.few_dimensions_fraction * self.log_k:.3f}): the teacher's outputs collapse onto "
                               "a few dimensions"),
        }
        for kind, (collapsing, message) in states.items():
            if not collapsing:
                self.active.discard(kind)
            elif kind not in self.active:
                logger.warning(f"step {logs['step']}: {message}; {self.HINT}")
                self.active.add(kind)
        return [kind for kind, (collapsing, _) in states.items() if collapsing]


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

    def __init__(self, accelerator: Accelerator, log_file: Path, logging_steps: int, progress_bar: Any,
                 collapse_guard: CollapseGuard | None = None):
        self.accelerator, self.log_file, self.logging_steps, self.progress_bar = (
            accelerator, log_file, logging_steps, progress_bar
        )
        self.collapse_guard = collapse_guard
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
        if self.collapse_guard is not None and self.accelerator.is_main_process:
            collapse = self.collapse_guard.check(logs)
            if collapse:
                logs["collapse_warning"] = ",".join(collapse)
        self.progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
        self.accelerator.log(logs, step=global_step)
        if self.accelerator.is_main_process:
            with self.log_file.open("a") as handle:
                handle.write(json.dumps(logs) + "\n")
        self.pair_cases = {}

"""The training loop: passes over the data from a resumable position, steps, logs and checkpoints."""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..cpu_kernels import cpu_linear_kernel
from ..losses import CDCLObjective
from ..multicrop import MultiCropAugmentation
from .checkpoints import TrainingPosition, save_checkpoint
from .components import TrainingSchedules
from .data import cut_batch_views
from .step import NonFiniteLossError, train_step
from .tracking import CollapseGuard, StepLogger

__all__ = ["train_loop"]


def _seed_batch_randomness(seed: int, data_pass: int, batch_index: int, process_index: int) -> None:
    # Drop-path masks come from the global RNG; seeding it per batch makes them a function of the position in
    # training, so a resumed run draws exactly what an uninterrupted one does.
    torch.manual_seed(int(np.random.SeedSequence([seed, data_pass, batch_index, process_index]).generate_state(1)[0]))


def _batch_generator(
    seed: int, data_pass: int, batch_index: int, process_index: int, device: torch.device
) -> torch.Generator:
    # --batched_views: the views' random draws, a function of the batch's position in training like the items' own
    # seeds (a global step would repeat them across accumulated micro-batches and processes).
    state = np.random.SeedSequence([seed, data_pass, batch_index, process_index, 4]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state.view(np.uint64)[0] >> 1))


def train_loop(
    accelerator: Accelerator,
    args: argparse.Namespace,
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    objective: CDCLObjective,
    optimizer: torch.optim.Optimizer,
    dataloader: torch.utils.data.DataLoader,
    schedules: TrainingSchedules,
    position: TrainingPosition,
    channel_names: list[str],
    batched_views: MultiCropAugmentation | None = None,
) -> int:
    """Train from `position` until the run's last step (or `--stop_after_steps`); returns the steps done.

    A pass is one sweep over the data (an epoch of a map-style screen, one read of a stream); a resumed run skips
    the batches its checkpoint had already trained on, so it continues with the very next batch. With
    `batched_views` (`--batched_views`) the batches hold prepared images, and their views are cut here, on the device.
    """
    stop_at = min(schedules.max_train_steps, args.stop_after_steps or schedules.max_train_steps)
    global_step, data_pass = position.global_step, position.data_pass
    show_progress = accelerator.is_local_main_process
    with tqdm(total=stop_at, initial=global_step, disable=not show_progress, desc="training") as progress_bar:
        # Checked once the teacher temperature has warmed up (at most from half-way through the run).
        collapse_guard = CollapseGuard(
            log_k=math.log(args.out_dim),
            start_step=min(max(1, args.warmup_teacher_temp_epochs) * schedules.steps_per_epoch, stop_at // 2),
        )
        step_logger = StepLogger(
            accelerator, args.output_dir / "train_log.jsonl", args.logging_steps, progress_bar, collapse_guard
        )
        student.train()
        while global_step < stop_at:
            # accelerate's loaders pass the pass index on to the sampler (map-style) or the dataset (stream), which
            # derive the shuffling, partners and augmentations from it.
            dataloader.set_epoch(data_pass)
            batches_done = position.batches_done_in_pass if data_pass == position.data_pass else 0  # resumed pass
            pass_dataloader = dataloader
            if batches_done > 0:
                pass_dataloader = accelerator.skip_first_batches(dataloader, batches_done)
                pass_dataloader.set_epoch(data_pass)
            steps_before_pass = global_step

            for batch_index, batch in enumerate(pass_dataloader, start=batches_done):
                _seed_batch_randomness(args.seed, data_pass, batch_index, accelerator.process_index)
                if batched_views is not None:
                    generator = _batch_generator(args.seed, data_pass, batch_index, accelerator.process_index,
                                                 accelerator.device)
                    batch = cut_batch_views(batch, batched_views, generator)
                try:
                    with cpu_linear_kernel(args.cpu_linear_kernel, accelerator.device):
                        step = train_step(
                            accelerator, batch, student, teacher, objective, optimizer, schedules, global_step,
                            args.max_grad_norm, args.freeze_last_layer_epochs,
                        )
                except NonFiniteLossError as error:
                    raise NonFiniteLossError(
                        f"{error}; nothing was saved for this step. The last good checkpoint is in "
                        f"{args.output_dir / 'checkpoints'}; resume from it with a lower --learning_rate, a smaller "
                        "--max_grad_norm or --mixed_precision no."
                    ) from None
                step_logger.count_pairs(batch)
                if not step.optimizer_stepped:
                    continue

                global_step += 1
                progress_bar.update(1)
                step_logger.maybe_log(
                    step, global_step, epoch=(global_step - 1) // schedules.steps_per_epoch, optimizer=optimizer,
                    momentum=float(schedules.teacher_momentum[global_step - 1]), last_step=stop_at,
                )
                if global_step % args.checkpointing_steps == 0 or global_step == stop_at:
                    save_checkpoint(accelerator, args, TrainingPosition(global_step, data_pass, batch_index + 1), channel_names)
                if global_step >= stop_at:
                    break
            # A resumed pass may have nothing left (the checkpoint was at its end); a fresh pass must give a step.
            if global_step == steps_before_pass and global_step < stop_at and batches_done == 0:
                raise SystemExit(
                    f"a full pass over the screen gave no optimizer step: fewer than "
                    f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes} "
                    "usable items; lower --per_device_train_batch_size or --gradient_accumulation_steps"
                )
            data_pass += 1
    return global_step

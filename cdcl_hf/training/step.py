"""One training step of CDCL / DINO: the part of the loop a reader of dino's `train_one_epoch` looks for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from ..dino_head import cancel_last_layer_gradients
from ..losses import CDCLLossOutput, CDCLObjective, teacher_domains_from_batch
from ..multicrop import crop_sources, stack_views
from ..schedules import apply_optimizer_schedules, update_teacher_ema
from .components import TrainingSchedules

__all__ = ["NonFiniteLossError", "StepOutput", "train_step"]


class NonFiniteLossError(FloatingPointError):
    """The loss of a step was NaN or infinite on some process; nothing of that step was applied."""


@dataclass
class StepOutput:
    r"""
    Args:
        loss (`CDCLLossOutput`): The objective's loss and its detached log values.
        grad_norm (`float`, *optional*): The global gradient norm before clipping (on optimizer steps with clipping).
        optimizer_stepped (`bool`): Whether this batch ended a gradient-accumulation cycle (an optimizer step and an
            EMA update of the teacher).
    """

    loss: CDCLLossOutput
    grad_norm: float | None
    optimizer_stepped: bool


def train_step(
    accelerator: Accelerator,
    batch: dict[str, Any],
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    objective: CDCLObjective,
    optimizer: torch.optim.Optimizer,
    schedules: TrainingSchedules,
    global_step: int,
    max_grad_norm: float,
    freeze_last_layer_epochs: int,
) -> StepOutput:
    """Forward -> finite check -> backward -> clip -> cancel last layer -> step -> EMA, on one batch of views.

    `global_step` is the optimizer step this batch contributes to; it indexes the schedules (the epoch, for the
    teacher temperature and the last-layer freeze, is derived from it).
    """
    epoch = global_step // schedules.steps_per_epoch
    # Which image (0: the item, 1: its partner) each view was cropped from; only_cross_domain pairs by it. Kept on the
    # CPU: the losses read it into Python lists, which from a GPU tensor would wait for the forward passes to finish.
    view_sources = crop_sources(batch["local_crops"].shape[1])
    with accelerator.accumulate(student):
        views = stack_views(batch)
        with torch.no_grad(), accelerator.autocast():
            teacher_out = teacher(views[:2])  # the teacher sees the two global views only
        with accelerator.autocast():
            student_out = student(views)
        output = objective(
            student_out.float(),
            teacher_out.float(),
            epoch,
            teacher_domains=teacher_domains_from_batch(batch["domain"], batch["partner_domain"]),
            view_sources=view_sources,
        )
        # Every process must agree to stop, or the others would hang in the next collective.
        finite = accelerator.gather(torch.isfinite(output.loss.detach()).reshape(1))
        if not bool(finite.all()):
            raise NonFiniteLossError(f"non-finite loss at step {global_step} (epoch {epoch})")
        accelerator.backward(output.loss)
        grad_norm = None
        if accelerator.sync_gradients and max_grad_norm > 0:
            grad_norm = float(accelerator.clip_grad_norm_(student.parameters(), max_grad_norm))
        cancel_last_layer_gradients(student, epoch, freeze_last_layer_epochs)
        apply_optimizer_schedules(optimizer, global_step, schedules.learning_rate, schedules.weight_decay)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if accelerator.sync_gradients:
        # The same momentum and the same (all-reduced) student weights on every process keep the teachers identical.
        momentum = float(schedules.teacher_momentum[global_step])
        update_teacher_ema(accelerator.unwrap_model(student), teacher, momentum)
    return StepOutput(loss=output, grad_norm=grad_norm, optimizer_stepped=accelerator.sync_gradients)

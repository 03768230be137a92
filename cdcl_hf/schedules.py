"""Schedules, optimizer parameter groups and the EMA teacher update.

DINO-style schedules are small numpy arrays indexed by the global step (lr, weight decay, teacher
momentum) or by the epoch (teacher temperature); they are cheap (200 epochs x 10k steps = 2M
floats) and trivially resumable: the step number is the whole state.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "cosine_schedule",
    "teacher_temperature_schedule",
    "param_groups_for_adamw",
    "apply_optimizer_schedules",
    "update_teacher_ema",
]


def cosine_schedule(
    base_value: float,
    final_value: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-step values: a linear warm-up, then half a cosine.

    Linear warm-up from `start_warmup_value` to `base_value` over `warmup_epochs`, then half a
    cosine from `base_value` to `final_value`. Used for the learning rate (7e-4 -> 1e-5, 10 warm-up
    epochs), weight decay (4e-3 -> 1e-2, no warm-up) and teacher momentum (0.995 -> 0.9996).

    Args:
        base_value (`float`):
            The value the warm-up leads to and the cosine starts from.
        final_value (`float`):
            The value of the last step.
        epochs (`int`):
            The number of epochs.
        steps_per_epoch (`int`):
            The number of steps per epoch.
        warmup_epochs (`float`, *optional*, defaults to 0):
            The length of the warm-up, in epochs.
        start_warmup_value (`float`, *optional*, defaults to 0.0):
            The first value of the warm-up.

    Returns:
        `np.ndarray` of length `epochs * steps_per_epoch`: the values; the last step equals
        `final_value`.
    """
    if epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError("epochs and steps_per_epoch must be positive")
    total = int(epochs * steps_per_epoch)
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if not 0 <= warmup <= total:
        raise ValueError(f"warm-up ({warmup} steps) longer than training ({total} steps)")
    warm = np.linspace(start_warmup_value, base_value, warmup, endpoint=False) if warmup else np.empty(0)
    remaining = total - warmup
    if remaining == 1:
        decay = np.array([final_value], dtype=np.float64)
    else:
        progress = np.arange(remaining) / max(remaining - 1, 1)
        decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warm, decay]).astype(np.float64)


def teacher_temperature_schedule(
    epochs: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07, warmup_epochs: int = 30
) -> np.ndarray:
    """Per-epoch teacher temperature: a linear warm-up, then constant.

    Linear from `warmup_teacher_temp` to `teacher_temp` over `warmup_epochs` (inclusive at the end),
    then constant. A low early temperature sharpens the teacher while its outputs are still nearly
    uniform.

    Args:
        epochs (`int`):
            The number of epochs.
        warmup_teacher_temp (`float`, *optional*, defaults to 0.04):
            The temperature the warm-up starts from.
        teacher_temp (`float`, *optional*, defaults to 0.07):
            The temperature after the warm-up.
        warmup_epochs (`int`, *optional*, defaults to 30):
            The length of the warm-up, capped at `epochs`.

    Returns:
        `np.ndarray` of length `epochs`: the temperatures.
    """
    if epochs <= 0:
        raise ValueError("epochs must be positive")
    warmup_epochs = min(int(warmup_epochs), epochs)
    ramp = np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs) if warmup_epochs else np.empty(0)
    return np.concatenate([ramp, np.full(epochs - warmup_epochs, teacher_temp)]).astype(np.float64)


def _is_excluded_from_decay(name: str, param: torch.Tensor) -> bool:
    # Biases and norm scales/shifts are 1-D; decaying them only hurts. The magnitude of a
    # weight-normalised layer (parametrizations.<w>.original0) is a per-row scale, not a weight
    # matrix, so decay would just shrink the logits.
    return param.ndim <= 1 or name.endswith(".bias") or name.endswith(".original0")


def param_groups_for_adamw(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: decayed weights, and non-decayed parameters.

    Biases, norms, 1-D params and weight-norm magnitudes are not decayed; frozen parameters are left
    out. Each group carries `apply_weight_decay` so `apply_optimizer_schedules` knows which one
    follows the wd schedule.

    Args:
        model (`nn.Module`):
            The model whose parameters are grouped.
        weight_decay (`float`):
            The weight decay of the decayed group.

    Returns:
        `list[dict]`: the non-empty groups.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if _is_excluded_from_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay), "apply_weight_decay": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False},
    ]
    return [g for g in groups if g["params"]]


def apply_optimizer_schedules(
    optimizer: torch.optim.Optimizer,
    step: int,
    lr_schedule: np.ndarray | None = None,
    wd_schedule: np.ndarray | None = None,
) -> None:
    """Set the learning rate and weight decay of the parameter groups for one step.

    Every group's lr becomes `lr_schedule[step]` and the decayed groups' weight decay
    `wd_schedule[step]` (steps past the end use the last value). Call before `optimizer.step()`.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The optimizer (e.g. over the groups of `param_groups_for_adamw`).
        step (`int`):
            The global step.
        lr_schedule (`np.ndarray`, *optional*):
            Per-step learning rates; `None` leaves the lr as it is.
        wd_schedule (`np.ndarray`, *optional*):
            Per-step weight decay; `None` leaves the weight decay as it is.
    """
    for group in optimizer.param_groups:
        if lr_schedule is not None:
            group["lr"] = float(lr_schedule[min(step, len(lr_schedule) - 1)])
        if wd_schedule is not None and group.get("apply_weight_decay", group.get("weight_decay", 0.0) > 0):
            group["weight_decay"] = float(wd_schedule[min(step, len(wd_schedule) - 1)])


@torch.no_grad()
def update_teacher_ema(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """EMA update of the teacher: `teacher = momentum * teacher + (1 - momentum) * student`.

    Applies to all parameters, matched by name. Uses fused `torch._foreach` ops: one kernel launch
    per op for all tensors.

    Args:
        student (`nn.Module`):
            The unwrapped student (e.g. `accelerator.unwrap_model(student)`).
        teacher (`nn.Module`):
            The teacher, updated in place.
        momentum (`float`):
            The EMA momentum.

    Raises:
        `ValueError`: if the parameter names of student and teacher differ.
    """
    student_params = dict(student.named_parameters())
    teacher_named = list(teacher.named_parameters())
    if student_params.keys() != {name for name, _ in teacher_named}:
        missing = set(student_params) ^ {name for name, _ in teacher_named}
        raise ValueError(f"student and teacher parameters differ: {sorted(missing)[:5]}")
    teacher_tensors = [p.data for _, p in teacher_named]
    student_tensors = [student_params[name].detach().to(p.dtype) for name, p in teacher_named]
    torch._foreach_mul_(teacher_tensors, momentum)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - momentum)

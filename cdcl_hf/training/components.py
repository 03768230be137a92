"""What is trained and how: student and EMA teacher, optimizer, schedules, objective, and the distributed setups."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..configuration_cdcl import CDCLConfig
from ..dino_head import DINOHead, MultiCropModel, make_teacher
from ..losses import CDCLObjective
from ..modeling_cdcl import CDCLModel
from ..schedules import cosine_schedule, param_groups_for_adamw, teacher_temperature_schedule

__all__ = [
    "TrainingSchedules",
    "check_distributed_setup",
    "build_student_teacher",
    "build_optimizer",
    "build_objective",
    "verify_replicas_agree",
]


def check_distributed_setup(accelerator: Accelerator) -> None:
    """Refuse the distributed setups this training loop cannot run correctly.

    FSDP and DeepSpeed ZeRO-3 shard the parameters, so every process's EMA teacher would average only its own shard
    of the student. DeepSpeed ZeRO-1/2 runs the optimizer step inside `accelerator.backward`, so the per-step
    learning-rate / weight-decay schedules would apply one step late, and the last-layer freeze and the gradient clip
    (applied between backward and step here) would do nothing; it is refused until that is handled.
    """
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise SystemExit(
            f"{accelerator.distributed_type.value} is not supported: the EMA teacher needs the full student weights on "
            "every process (FSDP / ZeRO-3 shard them), and the per-step schedules, last-layer freeze and gradient "
            "clipping run between backward and the optimizer step (DeepSpeed steps inside backward). Use DDP "
            "(`accelerate config`: multi-GPU / multi-node, no DeepSpeed or FSDP); a ViT-S/B fits on one GPU."
        )


def build_student_teacher(
    args: argparse.Namespace, num_channels: int, channel_names: list[str]
) -> tuple[MultiCropModel, MultiCropModel]:
    """The student (backbone + DINO head) and its frozen EMA teacher, starting from the same weights."""
    if args.init_from_vit:
        from ..convert_vit import cdcl_model_from_vit_checkpoint

        backbone = cdcl_model_from_vit_checkpoint(
            args.init_from_vit, num_channels=num_channels, drop_path_rate=args.drop_path_rate, pooling=args.pooling,
            channel_names=channel_names,
        )
    else:
        backbone = CDCLModel(
            CDCLConfig.from_preset(
                args.model_preset,
                num_channels=num_channels,
                channel_names=channel_names,
                image_size=args.global_crop_size,
                drop_path_rate=args.drop_path_rate,
                pooling=args.pooling,
            )
        )
    if args.gradient_checkpointing:
        # transformers 5.23 renamed gradient_checkpointing_enable (now a deprecated alias); older 5.x have only it.
        enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
        enable()
    head = DINOHead(
        backbone.config.pooled_size,
        args.out_dim,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
        nlayers=args.head_layers,
    )
    student = MultiCropModel(backbone, head)
    return student, make_teacher(student)


def build_optimizer(student: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases, norms and the weight-normalised magnitudes; lr set per step."""
    return torch.optim.AdamW(param_groups_for_adamw(student, args.weight_decay), lr=args.learning_rate)


@dataclass
class TrainingSchedules:
    r"""
    The per-step schedules of a run (DINO's recipe), indexed by the optimizer step (the teacher temperature by epoch).

    Args:
        steps_per_epoch (`int`), max_train_steps (`int`), num_epochs (`int`): The run's length.
        learning_rate (`np.ndarray`): Linear warm-up, then cosine to the minimum.
        weight_decay (`np.ndarray`): Cosine from `--weight_decay` to `--weight_decay_end`.
        teacher_momentum (`np.ndarray`): Cosine from `--momentum_teacher` to `--momentum_teacher_end`.
        teacher_temperature (`np.ndarray`): Per epoch: warm-up, then constant.
    """

    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    learning_rate: np.ndarray
    weight_decay: np.ndarray
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray

    @classmethod
    def for_run(cls, args: argparse.Namespace, dataloader: torch.utils.data.DataLoader) -> TrainingSchedules:
        """The schedules of a run over `dataloader` (a prepared, per-process one), as `args` describe it."""
        if args.streaming:
            steps_per_epoch = args.steps_per_epoch or args.max_train_steps
        else:
            steps_per_epoch = len(dataloader) // args.gradient_accumulation_steps
            if steps_per_epoch == 0:
                raise SystemExit(
                    f"the screen gives {len(dataloader)} batches per process, fewer than one optimizer step "
                    f"({args.gradient_accumulation_steps} accumulation steps); lower --per_device_train_batch_size"
                )
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
        return cls(
            steps_per_epoch=steps_per_epoch,
            max_train_steps=max_train_steps,
            num_epochs=num_epochs,
            learning_rate=cosine_schedule(
                args.learning_rate, args.min_learning_rate, num_epochs, steps_per_epoch,
                warmup_epochs=min(args.warmup_epochs, num_epochs),
            ),
            weight_decay=cosine_schedule(args.weight_decay, args.weight_decay_end, num_epochs, steps_per_epoch),
            teacher_momentum=cosine_schedule(
                args.momentum_teacher, args.momentum_teacher_end, num_epochs, steps_per_epoch
            ),
            teacher_temperature=teacher_temperature_schedule(
                num_epochs, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs
            ),
        )


def build_objective(
    args: argparse.Namespace, num_domains: int, schedules: TrainingSchedules, accelerator: Accelerator
) -> CDCLObjective:
    """The method's loss, on the accelerator's device (its centres are part of the training state)."""
    objective = CDCLObjective(
        method=args.method,
        out_dim=args.out_dim,
        num_domains=num_domains,
        teacher_temp_schedule=schedules.teacher_temperature,
        student_temp=args.student_temp,
        dino_weight=args.dino_weight,
        cross_correlation_weight=args.cross_correlation_weight,
        off_diagonal_weight=args.off_diagonal_weight,
        center_momentum=args.center_momentum,
        only_cross_domain=args.only_cross_domain,
        gather_distributed=accelerator.num_processes > 1,
    )
    return objective.to(accelerator.device)


def _parameter_fingerprint(module: torch.nn.Module) -> float:
    """A float that differs between replicas whose weights differ (sum of |w| weighted by position)."""
    total = 0.0
    for position, parameter in enumerate(module.parameters(), start=1):
        total += position * parameter.detach().double().abs().sum().item()
    return total


def verify_replicas_agree(accelerator: Accelerator, student: torch.nn.Module, teacher: torch.nn.Module) -> list:
    """Gather every process's (student, teacher) fingerprints; raise if any replica drifted. Returns them."""
    fingerprints = accelerator.gather(
        torch.tensor(
            [[_parameter_fingerprint(accelerator.unwrap_model(student)), _parameter_fingerprint(teacher)]],
            dtype=torch.float64,
            device=accelerator.device,
        )
    ).cpu()
    if not torch.allclose(fingerprints, fingerprints[:1].expand_as(fingerprints), rtol=1e-9, atol=0):
        raise RuntimeError(f"student / teacher weights differ between processes: {fingerprints.tolist()}")
    return fingerprints.tolist()

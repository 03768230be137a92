"""The training stages in process: train_step's order of operations, the refused distributed setups, positions."""

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

import cdcl_hf.cpu_kernels as cpu_kernels
from cdcl_hf.dino_head import last_layer_parameters
from cdcl_hf.multicrop import MultiCropAugmentation
from cdcl_hf.training.arguments import (
    RESUME_FREE_SETTINGS,
    SECRET_ARGUMENTS,
    parse_args,
    serializable_arguments,
)
from cdcl_hf.training.components import (
    TrainingSchedules,
    build_objective,
    build_optimizer,
    build_student_teacher,
    check_distributed_setup,
)
from cdcl_hf.training.step import NonFiniteLossError, train_step

SMALL = ["--out_dim", "32", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16", "--num_local_crops", "2"]


def _batch(batch_size=8, channels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    augmentation = MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=2)
    items = [augmentation(torch.randn(channels, 40, 40, generator=generator), generator=generator)
             for _ in range(batch_size)]
    return {
        "global_crops": torch.stack([item["global_crops"] for item in items]),
        "local_crops": torch.stack([item["local_crops"] for item in items]),
        "domain": torch.arange(batch_size) % 2,
        "partner_domain": (torch.arange(batch_size) + 1) % 2,
        "pair_case": torch.zeros(batch_size, dtype=torch.long),
    }


def _setup(*flags, steps_per_epoch=2):
    args = parse_args([*SMALL, *flags])
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    student, teacher = build_student_teacher(args, 3, ["a", "b", "c"])
    optimizer = build_optimizer(student, args)
    loader = torch.utils.data.DataLoader(range(steps_per_epoch * args.per_device_train_batch_size),
                                         batch_size=args.per_device_train_batch_size)
    schedules = TrainingSchedules.for_run(args, loader)
    objective = build_objective(args, 2, schedules, accelerator)
    student, optimizer = accelerator.prepare(student, optimizer)
    return args, accelerator, student, teacher, objective, optimizer, schedules


def _step(setup, global_step, batch):
    args, accelerator, student, teacher, objective, optimizer, schedules = setup
    return train_step(accelerator, batch, student, teacher, objective, optimizer, schedules, global_step,
                      args.max_grad_norm, args.freeze_last_layer_epochs)


def test_step_freezes_the_last_layer_in_the_first_epoch_then_trains_it():
    setup = _setup("--warmup_epochs", "0")
    _, _, student, teacher, _, optimizer, schedules = setup
    last_layer = [p.detach().clone() for p in last_layer_parameters(student)]
    backbone_before = student.backbone.embeddings.cls_token.detach().clone()
    teacher_before = teacher.backbone.embeddings.cls_token.detach().clone()

    output = _step(setup, 0, _batch())
    assert output.optimizer_stepped and output.grad_norm is not None and output.grad_norm > 0
    assert all(torch.equal(a, b) for a, b in zip(last_layer, last_layer_parameters(student), strict=True))
    assert not torch.equal(backbone_before, student.backbone.embeddings.cls_token)
    # EMA: teacher = m * teacher + (1 - m) * student, with m the schedule's value at this step.
    momentum = schedules.teacher_momentum[0]
    expected = momentum * teacher_before + (1 - momentum) * student.backbone.embeddings.cls_token.detach()
    torch.testing.assert_close(teacher.backbone.embeddings.cls_token, expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(schedules.learning_rate[0])

    _step(setup, schedules.steps_per_epoch, _batch(seed=1))  # epoch 1: the last layer trains
    assert any(not torch.equal(a, b) for a, b in zip(last_layer, last_layer_parameters(student), strict=True))


def test_step_clips_the_global_gradient_norm():
    setup = _setup("--max_grad_norm", "1e-3")
    _step(setup, 0, _batch())
    student = setup[2]
    # zero_grad(set_to_none) ran; the clip is observable through what the optimizer saw: AdamW's first moment.
    first_moments = [setup[5].state[p]["exp_avg"] for p in student.parameters() if p in setup[5].state]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in first_moments]))
    assert float(norm) <= (1 - 0.9) * 1e-3 * 1.001  # beta1 = 0.9: m = 0.1 * clipped gradient


def test_step_stops_on_a_non_finite_loss_before_changing_anything():
    setup = _setup()
    student = setup[2]
    before = [p.detach().clone() for p in student.parameters()]
    batch = _batch()
    batch["global_crops"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        _step(setup, 0, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


@pytest.mark.parametrize("kind", [DistributedType.DEEPSPEED, DistributedType.FSDP])
def test_sharded_and_deepspeed_setups_are_refused_with_a_reason(kind):
    with pytest.raises(SystemExit, match="EMA teacher needs the full student weights"):
        check_distributed_setup(SimpleNamespace(distributed_type=kind))
    check_distributed_setup(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))  # DDP is fine


def test_schedules_span_the_run():
    args = argparse.Namespace(
        streaming=False, gradient_accumulation_steps=1, max_train_steps=None, num_train_epochs=3, learning_rate=1e-3,
        min_learning_rate=1e-5, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.9,
        momentum_teacher_end=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
    )
    schedules = TrainingSchedules.for_run(args, list(range(5)))
    assert (schedules.steps_per_epoch, schedules.max_train_steps, schedules.num_epochs) == (5, 15, 3)
    assert len(schedules.learning_rate) == 15 and schedules.learning_rate[5] == pytest.approx(1e-3)
    assert schedules.weight_decay[-1] == pytest.approx(0.4) and schedules.teacher_momentum[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(schedules.teacher_temperature, [0.04, 0.07, 0.07])


def test_secrets_are_never_serialised():
    args = parse_args(["--push_to_hub", "--hub_model_id", "org/m", "--hub_token", "hf_secret_value"])
    stored = serializable_arguments(args)
    assert "hf_secret_value" not in str(stored) and not set(SECRET_ARGUMENTS) & set(stored)


def test_the_cpu_linear_kernel_is_checked_at_parse_time_and_free_to_change_on_resume(monkeypatch, capsys):
    assert parse_args([]).cpu_linear_kernel == "auto"
    assert "cpu_linear_kernel" in RESUME_FREE_SETTINGS  # a kernel changes float rounding, not what a tensor means
    monkeypatch.setattr(cpu_kernels, "_onednn_linear_op", lambda: None)
    assert parse_args(["--cpu_linear_kernel", "auto"]).cpu_linear_kernel == "auto"
    with pytest.raises(SystemExit):
        parse_args(["--cpu_linear_kernel", "onednn"])
    assert "no oneDNN linear kernel; use auto or blas" in capsys.readouterr().err

"""Schedules, AdamW parameter groups and the EMA teacher update."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from cdcl_hf.dino_head import DINOHead
from cdcl_hf.schedules import (
    apply_optimizer_schedules,
    cosine_schedule,
    param_groups_for_adamw,
    teacher_temperature_schedule,
    update_teacher_ema,
)


def test_cosine_schedule_with_warmup():
    lr = cosine_schedule(7e-4, 1e-5, epochs=20, steps_per_epoch=5, warmup_epochs=2)
    assert lr.shape == (100,)
    assert lr[0] == 0.0 and np.all(np.diff(lr[:10]) > 0)  # linear warm-up
    assert lr[10] == pytest.approx(7e-4) and lr[-1] == pytest.approx(1e-5)
    assert np.all(np.diff(lr[10:]) <= 0) and lr.max() == pytest.approx(7e-4)
    midpoint = 10 + (len(lr) - 10 - 1) / 2
    assert np.interp(midpoint, np.arange(100), lr) == pytest.approx((7e-4 + 1e-5) / 2, rel=1e-3)
    momentum = cosine_schedule(0.995, 0.9996, epochs=3, steps_per_epoch=4)
    assert momentum[0] == pytest.approx(0.995) and momentum[-1] == pytest.approx(0.9996)
    assert np.all(np.diff(momentum) >= 0)
    with pytest.raises(ValueError, match="warm-up"):
        cosine_schedule(1.0, 0.0, epochs=2, steps_per_epoch=3, warmup_epochs=5)


def test_teacher_temperature_schedule():
    temps = teacher_temperature_schedule(
        epochs=10, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_epochs=4
    )
    assert temps.shape == (10,)
    assert temps[0] == pytest.approx(0.04) and temps[3] == pytest.approx(0.07)
    assert np.allclose(temps[4:], 0.07) and np.all(np.diff(temps[:4]) > 0)
    short = teacher_temperature_schedule(epochs=3, warmup_epochs=30)
    assert short.shape == (3,) and short[-1] == pytest.approx(0.07)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.head = DINOHead(6, 10, hidden_dim=8, bottleneck_dim=4, nlayers=2, norm_last_layer=False)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_param_groups_exclude_biases_norms_and_weight_norm_magnitude():
    model = Tiny()
    groups = param_groups_for_adamw(model, weight_decay=0.04)
    decay, no_decay = groups
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = sorted(names[id(p)] for p in decay["params"])
    no_decay_names = sorted(names[id(p)] for p in no_decay["params"])
    assert decay_names == sorted(
        [
            "linear.weight",
            "head.mlp.0.weight",
            "head.mlp.2.weight",
            "head.last_layer.parametrizations.weight.original1",
        ]
    )
    assert "norm.weight" in no_decay_names and "linear.bias" in no_decay_names
    assert "head.last_layer.parametrizations.weight.original0" in no_decay_names
    assert not any(n.startswith("frozen") for n in decay_names + no_decay_names)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0


def test_apply_optimizer_schedules_sets_lr_everywhere_and_wd_on_decayed_group_only():
    model = Tiny()
    optimizer = torch.optim.AdamW(param_groups_for_adamw(model, 0.04), lr=1.0)
    lr, wd = np.array([0.1, 0.2]), np.array([0.04, 0.4])
    apply_optimizer_schedules(optimizer, step=1, lr_schedule=lr, wd_schedule=wd)
    assert [g["lr"] for g in optimizer.param_groups] == [0.2, 0.2]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.4, 0.0]
    apply_optimizer_schedules(optimizer, step=99, lr_schedule=lr)  # past the end: last value
    assert optimizer.param_groups[0]["lr"] == 0.2


def test_update_teacher_ema():
    student, teacher = Tiny(), Tiny()
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_teacher_ema(student, teacher, momentum=0.9)
    for name, s in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * s.detach()
        assert torch.allclose(dict(teacher.named_parameters())[name], expected, atol=1e-6), name
    update_teacher_ema(student, teacher, momentum=0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters(), strict=True))
    frozen = {n: p.clone() for n, p in teacher.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_teacher_ema(student, teacher, momentum=1.0)
    assert all(torch.equal(frozen[n], p) for n, p in teacher.named_parameters())
    with pytest.raises(ValueError, match="differ"):
        update_teacher_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)

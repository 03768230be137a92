"""DINO head, last-layer freezing, the grouped multi-crop forward and the teacher copy."""

import pytest
import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from cdcl_hf.dino_head import (
    DINOHead,
    MultiCropModel,
    cancel_last_layer_gradients,
    last_layer_parameters,
    make_teacher,
)


class TinyBackbone(nn.Module):
    """Stand-in for CDCLModel: (B,C,H,W) -> BaseModelOutputWithPooling; counts its calls."""

    def __init__(self, channels=3, dim=12):
        super().__init__()
        self.proj = nn.Linear(channels, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.5)
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape))
        pooled = self.drop(self.norm(self.proj(pixel_values.mean(dim=(2, 3)))))
        return BaseModelOutputWithPooling(last_hidden_state=pooled[:, None], pooler_output=pooled)


def test_head_shapes_and_normalised_last_layer():
    head = DINOHead(in_dim=12, out_dim=32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(12, 24), (24, 24), (24, 8)]
    logits = head(torch.randn(5, 12))
    assert logits.shape == (5, 32)
    # Magnitude fixed at 1 and a unit-norm input: every logit is a cosine, in [-1, 1].
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad and torch.all(magnitude == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert logits.abs().max() <= 1 + 1e-5
    trainable = DINOHead(12, 32, 24, 8, nlayers=1, norm_last_layer=False)
    assert len([m for m in trainable.mlp if isinstance(m, nn.Linear)]) == 1
    assert trainable.last_layer.parametrizations.weight.original0.requires_grad
    with pytest.raises(ValueError):
        DINOHead(12, 32, nlayers=0)


def test_last_layer_frozen_for_the_first_epochs():
    model = MultiCropModel(TinyBackbone(), DINOHead(12, 32, 24, 8, norm_last_layer=False))
    for epoch, frozen in [(0, True), (1, False)]:
        model.zero_grad(set_to_none=True)
        model([torch.randn(4, 3, 8, 8)]).pow(2).sum().backward()
        cancel_last_layer_gradients(model, epoch, freeze_last_layer_epochs=1)
        last = last_layer_parameters(model)
        assert len(last) == 2  # direction and magnitude of the weight-normalised layer
        assert all((p.grad is None) == frozen for p in last)
        assert model.head.mlp[0].weight.grad is not None


def test_backbone_runs_once_per_resolution_group_and_output_is_view_major():
    backbone = TinyBackbone()
    model = MultiCropModel(backbone, DINOHead(12, 32, 24, 8)).eval()
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(6)]
    logits, features = model(views, return_features=True)
    assert backbone.calls == [(8, 3, 16, 16), (24, 3, 8, 8)]
    assert logits.shape == (32, 32) and features.shape == (32, 12)
    # Same as running each view on its own, in view order.
    per_view = torch.cat([model.head(backbone(pixel_values=v).pooler_output) for v in views])
    assert torch.allclose(logits, per_view, atol=1e-6)


def test_plain_tensor_backbones_are_accepted():
    model = MultiCropModel(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12)), DINOHead(12, 16, 24, 8))

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    model.backbone = Wrapper(model.backbone)
    assert model(torch.randn(2, 3, 4, 4)).shape == (2, 16)


def test_make_teacher_is_a_frozen_eval_copy():
    student = MultiCropModel(TinyBackbone(), DINOHead(12, 32, 24, 8))
    teacher = make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    for (name, s), (_, t) in zip(student.named_parameters(), teacher.named_parameters(), strict=True):
        assert torch.equal(s, t) and s.data_ptr() != t.data_ptr(), name
    x = [torch.randn(3, 3, 8, 8)]
    assert torch.equal(teacher(x), teacher(x))  # dropout off: deterministic


def test_with_real_backbone_when_available():
    modeling = pytest.importorskip("cdcl_hf.modeling_cdcl", reason="model file not written yet")
    configuration = pytest.importorskip("cdcl_hf.configuration_cdcl")
    config = configuration.CDCLConfig.from_preset("tiny", num_channels=5)
    backbone = modeling.CDCLModel(config)
    dim = backbone(pixel_values=torch.randn(1, 5, 32, 32)).pooler_output.shape[-1]
    model = MultiCropModel(backbone, DINOHead(dim, 32, 24, 8))
    logits = model([torch.randn(2, 5, 32, 32)] * 2 + [torch.randn(2, 5, 16, 16)] * 2)
    assert logits.shape == (8, 32)


def test_components_fit_together_for_one_training_step():
    """Pairing -> multi-crop -> student/teacher -> CDCL objective -> AdamW step -> EMA, end to end."""
    from cdcl_hf.losses import CDCLObjective, teacher_domains_from_batch
    from cdcl_hf.multicrop import MultiCropAugmentation, stack_views
    from cdcl_hf.pairing import CrossDomainPairDataset, PartnerIndex
    from cdcl_hf.schedules import (
        apply_optimizer_schedules,
        cosine_schedule,
        param_groups_for_adamw,
        teacher_temperature_schedule,
        update_teacher_ema,
    )

    labels = ["a", "a", "b", "b", "c", "c", "d", "d"]
    plates = ["P0", "P1", "P0", "P1", "P1", "P2", "P2", "P0"]
    index = PartnerIndex(labels, plates)
    images = [torch.rand(3, 20, 20) for _ in labels]
    aug = MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2, global_scale=(0.9, 1.1))
    loader = torch.utils.data.DataLoader(CrossDomainPairDataset(images, index, aug, seed=0), batch_size=4)
    student = MultiCropModel(TinyBackbone(), DINOHead(12, 32, 24, 8))
    teacher = make_teacher(student)
    objective = CDCLObjective(
        "cdcl",
        out_dim=32,
        num_domains=index.num_domains,
        teacher_temp_schedule=teacher_temperature_schedule(2, warmup_epochs=1),
    )
    optimizer = torch.optim.AdamW(param_groups_for_adamw(student, 0.04))
    lr = cosine_schedule(1e-3, 1e-5, epochs=2, steps_per_epoch=len(loader), warmup_epochs=1)
    before = [p.clone() for p in teacher.parameters()]
    for step, batch in enumerate(loader):
        views = stack_views(batch)
        with torch.no_grad():
            teacher_out = teacher(views[:2])
        out = objective(
            student(views),
            teacher_out,
            epoch=0,
            teacher_domains=teacher_domains_from_batch(batch["domain"], batch["partner_domain"]),
            view_sources=aug.view_sources(),
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        cancel_last_layer_gradients(student, epoch=0, freeze_last_layer_epochs=1)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        apply_optimizer_schedules(optimizer, step, lr_schedule=lr)
        optimizer.step()
        update_teacher_ema(student, teacher, momentum=0.99)
        assert torch.isfinite(out.loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, teacher.parameters(), strict=True))
    assert objective.center.center.abs().sum() > 0

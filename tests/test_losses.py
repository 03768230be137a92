"""Losses: per-domain centring, DINO pairs, cross-correlation, the combined objective."""

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from cdcl_hf.losses import (
    CDCLObjective,
    CrossCorrelationLoss,
    DINOLoss,
    PerDomainCenter,
    SingleCenter,
    collapse_metrics,
    teacher_domains_from_batch,
    view_pairs,
)
from cdcl_hf.multicrop import crop_sources

K = 16


def test_teacher_row_is_centred_with_its_own_domain_only():
    center = PerDomainCenter(num_domains=3, out_dim=K)
    center.center.copy_(torch.arange(3.0)[:, None] * 100 + torch.randn(3, K))
    teacher = torch.randn(6, K)
    domains = torch.tensor([0, 2, 1, 2, 0, 1])
    centred = center(teacher, domains)
    for row, d in enumerate(domains.tolist()):
        assert torch.allclose(centred[row], teacher[row] - center.center[d])
    # Changing domain B's centre leaves domain A's rows untouched.
    center.center[2] += 1000
    again = center(teacher, domains)
    assert torch.equal(again[domains != 2], centred[domains != 2])
    assert not torch.allclose(again[domains == 2], centred[domains == 2])


def test_update_uses_only_each_domains_rows_and_keeps_absent_domains():
    center = PerDomainCenter(num_domains=3, out_dim=K, momentum=0.9)
    before = torch.randn(3, K)
    center.center.copy_(before)
    teacher = torch.randn(5, K)
    domains = torch.tensor([0, 0, 2, 0, 2])
    center.update(teacher, domains)
    assert torch.allclose(center.center[0], 0.9 * before[0] + 0.1 * teacher[[0, 1, 3]].mean(0), atol=1e-6)
    assert torch.allclose(center.center[2], 0.9 * before[2] + 0.1 * teacher[[2, 4]].mean(0), atol=1e-6)
    assert torch.equal(center.center[1], before[1])  # absent from the batch: unchanged


def test_center_state_dict_round_trip_and_validation():
    center = PerDomainCenter(num_domains=4, out_dim=K)
    center.update(torch.randn(8, K), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    restored = PerDomainCenter(num_domains=4, out_dim=K)
    restored.load_state_dict(center.state_dict())
    assert torch.equal(restored.center, center.center)
    with pytest.raises(ValueError, match=r"domain ids must lie in \[0, 4\)"):
        center(torch.randn(2, K), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="domain ids for"):
        center(torch.randn(2, K), torch.tensor([0]))


def test_single_center_matches_dino_rule():
    single = SingleCenter(K, momentum=0.9)
    teacher = torch.randn(10, K)
    single.update(teacher)
    assert torch.allclose(single.center[0], 0.1 * teacher.mean(0), atol=1e-6)
    assert torch.allclose(single(teacher), teacher - single.center[0])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_center_worker(rank, world, port, teacher, domains, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        center = PerDomainCenter(num_domains=3, out_dim=teacher.shape[1])
        half = teacher.shape[0] // world
        rows = slice(rank * half, (rank + 1) * half)
        center.update(teacher[rows], domains[rows])  # each rank sees different domains
        torch.save(center.center, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_centres_are_identical_across_ranks(tmp_path):
    teacher = torch.randn(8, K)
    domains = torch.tensor([0, 0, 1, 0, 2, 2, 2, 0])  # rank 0 lacks domain 2, rank 1 lacks domain 1
    torch.multiprocessing.spawn(
        _distributed_center_worker,
        args=(2, _free_port(), teacher, domains, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    reference = PerDomainCenter(num_domains=3, out_dim=K)
    reference.update(teacher, domains)  # one process seeing the global batch
    assert torch.equal(rank0, rank1)
    assert torch.allclose(rank0, reference.center, atol=1e-6)


def _reference_dino(student, teacher_probs, pairs, batch, student_temp):
    """Straightforward per-pair loop, written independently of the vectorised module."""
    total = 0.0
    for t, s in pairs:
        q = teacher_probs[t * batch : (t + 1) * batch]
        log_p = F.log_softmax(student[s * batch : (s + 1) * batch] / student_temp, dim=-1)
        total = total + (-(q * log_p).sum(-1)).mean()
    return total / len(pairs)


def test_view_pairs_standard_and_only_cross_domain():
    sources = crop_sources(6)  # [x, x', x, x, x, x', x', x']
    standard = view_pairs(8, sources, only_cross_domain=False)
    assert len(standard) == 14 and all(t != s for t, s in standard)
    cross = view_pairs(8, sources, only_cross_domain=True)
    assert sorted(cross) == [(0, 1), (0, 5), (0, 6), (0, 7), (1, 0), (1, 2), (1, 3), (1, 4)]
    with pytest.raises(ValueError, match="view_sources"):
        view_pairs(8, None, only_cross_domain=True)
    with pytest.raises(ValueError, match="no .* pairs"):
        view_pairs(2, torch.tensor([0, 0]), only_cross_domain=True)


@pytest.mark.parametrize("only_cross_domain", [False, True])
def test_dino_loss_matches_reference_and_uses_teacher_temperature(only_cross_domain):
    batch, views = 3, 8
    student = torch.randn(views * batch, K, requires_grad=True)
    teacher = torch.randn(2 * batch, K)
    schedule = [0.04, 0.05, 0.07]
    loss_fn = DINOLoss(schedule, student_temp=0.1, only_cross_domain=only_cross_domain)
    sources = crop_sources(6)
    for epoch, temp in [(0, 0.04), (2, 0.07), (50, 0.07)]:
        loss = loss_fn(student, teacher, epoch, sources)
        pairs = view_pairs(views, sources, only_cross_domain)
        expected = _reference_dino(student, F.softmax(teacher / temp, -1), pairs, batch, 0.1)
        assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_dino_loss_is_lower_when_student_agrees_with_teacher():
    batch = 4
    teacher = torch.randn(2 * batch, K) * 3
    agreeing = torch.cat([teacher[batch:], teacher[:batch]])  # view 0 predicts teacher view 1 & vice versa
    loss_fn = DINOLoss(0.1, student_temp=0.1)
    assert loss_fn(agreeing, teacher, 0) < loss_fn(torch.randn(2 * batch, K), teacher, 0)


def _reference_cross_correlation(teacher, student, w):
    n, k = teacher.shape
    zt = (teacher - teacher.mean(0)) / torch.sqrt(teacher.var(0, unbiased=False) + 1e-5)
    zs = (student - student.mean(0)) / torch.sqrt(student.var(0, unbiased=False) + 1e-5)
    c = torch.zeros(k, k)
    for i in range(k):
        for j in range(k):
            c[i, j] = (zt[:, i] * zs[:, j]).sum() / n
    on = sum((c[i, i] - 1) ** 2 for i in range(k)) / k
    off = sum(c[i, j] ** 2 for i in range(k) for j in range(k) if i != j) / (k * k - k)
    return (1 - w) * on + w * off


def test_cross_correlation_weight_is_a_convex_weight_of_means():
    teacher, student = torch.randn(32, 6), torch.randn(32, 6)
    for w in (0.0, 0.95, 1.0):
        raw = CrossCorrelationLoss(off_diagonal_weight=w, normalize=False)(teacher, student)
        assert torch.allclose(raw, _reference_cross_correlation(teacher, student, w), atol=1e-5)
    normalised = CrossCorrelationLoss(0.95, normalize=True)(teacher, student)
    raw = CrossCorrelationLoss(0.95, normalize=False)(teacher, student)
    assert torch.allclose(normalised, raw / (0.05 + 0.0095))
    with pytest.raises(ValueError, match="convex"):
        CrossCorrelationLoss(off_diagonal_weight=5e-3 * 100 + 1)


@pytest.mark.parametrize("rows, width", [(8, 64), (64, 8), (16, 16)], ids=["gram", "full", "square"])
def test_cross_correlation_without_the_k_by_k_matrix_matches_it(rows, width):
    """The loss computes sum C_ij^2 from (n, n) Gram matrices when n < K: same value and gradient as the (K, K) C."""
    torch.manual_seed(0)
    teacher = torch.randn(rows, width) * 2 + 1
    student = torch.randn(rows, width, requires_grad=True)
    loss_fn = CrossCorrelationLoss(0.95, normalize=True)
    loss = loss_fn(teacher, student)
    (gradient,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().clone().requires_grad_(True)
    c = loss_fn.correlation(teacher, reference_student)
    diagonal = torch.diagonal(c)
    reference = ((0.05 * (diagonal - 1).pow(2).mean()) + 0.95 * (c.pow(2).sum() - diagonal.pow(2).sum())
                 / (width * width - width)) / loss_fn.scale
    (reference_gradient,) = torch.autograd.grad(reference, reference_student)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("rows, width", [(8, 64), (64, 8)], ids=["gram", "full"])
def test_cross_correlation_of_all_pairs_at_once_matches_each_pair(rows, width):
    """`pairwise` (what the objective calls) gives every pair's `forward` value, and the same student gradient."""
    torch.manual_seed(0)
    teacher_views = torch.randn(2, rows, width) * 3 - 1
    student_views = torch.randn(5, rows, width, requires_grad=True)
    loss_fn = CrossCorrelationLoss(0.95, normalize=True)
    per_pair = loss_fn.pairwise(teacher_views, student_views)
    assert per_pair.shape == (2, 5)
    (gradient,) = torch.autograd.grad(per_pair[0, 1:].sum() + per_pair[1, 2:].sum(), student_views)

    reference_student = student_views.detach().clone().requires_grad_(True)
    reference = torch.stack([torch.stack([loss_fn(t, s) for s in reference_student]) for t in teacher_views])
    (reference_gradient,) = torch.autograd.grad(reference[0, 1:].sum() + reference[1, 2:].sum(), reference_student)
    torch.testing.assert_close(per_pair, reference.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient, reference_gradient, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"\(T, N, K\)"):
        loss_fn.pairwise(teacher_views, student_views[:, :-1])


def test_cross_correlation_is_zero_for_identical_decorrelated_outputs():
    # Orthogonal, zero-mean columns: C = I exactly, so both terms vanish.
    basis = torch.linalg.qr(torch.randn(64, 8)).Q
    z = basis - basis.mean(0)
    z = torch.linalg.qr(z).Q * 8  # re-orthogonalise after centring
    z = z - z.mean(0)
    loss = CrossCorrelationLoss(0.95, normalize=False)(z, z)
    assert loss < 1e-3
    # Gradients reach the student only (the teacher is a target).
    student = z.clone().requires_grad_(True)
    teacher = torch.randn(64, 8, requires_grad=True)
    CrossCorrelationLoss()(teacher, student).backward()
    assert student.grad is not None and teacher.grad is None


def test_collapse_metrics_extremes():
    uniform = torch.full((4, K), 1.0 / K)
    m = collapse_metrics(uniform)
    assert math.isclose(float(m["teacher_entropy"]), math.log(K), rel_tol=1e-5)
    assert abs(float(m["teacher_kl_to_uniform"])) < 1e-5
    one_hot = F.one_hot(torch.zeros(4, dtype=torch.long), K).float()
    m = collapse_metrics(one_hot)
    assert abs(float(m["teacher_entropy"])) < 1e-5
    assert math.isclose(float(m["teacher_kl_to_uniform"]), math.log(K), rel_tol=1e-5)


def _outputs(batch=4, views=8):
    return torch.randn(views * batch, K, requires_grad=True), torch.randn(2 * batch, K)


def test_objective_method_defaults():
    cdcl = CDCLObjective("cdcl", out_dim=K, num_domains=3)
    assert (cdcl.dino_weight, cdcl.cross_correlation_weight) == (0.25, 0.75)
    assert isinstance(cdcl.center, PerDomainCenter) and cdcl.center.num_domains == 3
    assert cdcl.pairing_mode == "cross_domain"
    for method, mode in [("dino", "same_image"), ("dino-cb", "cross_domain")]:
        objective = CDCLObjective(method, out_dim=K)
        assert isinstance(objective.center, SingleCenter) and objective.cross_correlation_weight == 0
        assert objective.pairing_mode == mode
    with pytest.raises(ValueError, match="only_cross_domain"):
        CDCLObjective("dino", out_dim=K, only_cross_domain=True)
    with pytest.raises(ValueError, match="unknown method"):
        CDCLObjective("byol", out_dim=K)


def test_objective_combines_terms_and_updates_centres_in_training_only():
    batch = 4
    student, teacher = _outputs(batch)
    domains = teacher_domains_from_batch(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 1]))
    sources = crop_sources(6)
    objective = CDCLObjective("cdcl", out_dim=K, num_domains=3, teacher_temp_schedule=[0.04, 0.07])
    objective.center.center.copy_(torch.randn(3, K))
    centres_before = objective.center.center.clone()
    out = objective(student, teacher, epoch=0, teacher_domains=domains, view_sources=sources)

    centred = teacher - centres_before[domains]
    pairs = view_pairs(8, sources, False)
    dino = _reference_dino(student, F.softmax(centred / 0.04, -1), pairs, batch, 0.1)
    cc_fn = CrossCorrelationLoss(0.95, normalize=True)
    cc = sum(
        cc_fn(centred[t * batch : (t + 1) * batch], student[s * batch : (s + 1) * batch]) for t, s in pairs
    ) / len(pairs)
    expected = 0.25 * dino / math.log(K) + 0.75 * cc
    assert torch.allclose(out.loss, expected, atol=1e-5)
    assert torch.allclose(out.logs["dino_loss"], dino.detach(), atol=1e-5)
    assert {
        "loss",
        "cross_correlation_loss",
        "teacher_temp",
        "teacher_entropy",
        "teacher_kl_to_uniform",
        "center_norm",
    } <= set(out.logs)
    # The student-controlled part of the DINO term: mean KL(teacher || student) over the same pairs.
    q = F.softmax(centred / 0.04, -1)
    log_p = F.log_softmax(student / 0.1, -1)
    kl = sum(
        (
            torch.special.xlogy(q[t * batch : (t + 1) * batch], q[t * batch : (t + 1) * batch])
            - q[t * batch : (t + 1) * batch] * log_p[s * batch : (s + 1) * batch]
        )
        .sum(-1)
        .mean()
        for t, s in pairs
    ) / len(pairs)
    assert torch.allclose(out.logs["dino_kl"], kl, atol=1e-4)
    assert not torch.equal(objective.center.center, centres_before)  # updated in training mode
    out.loss.backward()
    assert student.grad.abs().sum() > 0

    objective.eval()
    frozen = objective.center.center.clone()
    objective(student, teacher, epoch=1, teacher_domains=domains, view_sources=sources)
    assert torch.equal(objective.center.center, frozen)
    with pytest.raises(ValueError, match="teacher_domains"):
        objective(student, teacher, epoch=1)


def test_plain_dino_objective_needs_no_domains():
    student, teacher = _outputs()
    objective = CDCLObjective("dino", out_dim=K, normalize_terms=False)
    out = objective(student, teacher, epoch=0)
    assert "cross_correlation_loss" not in out.logs
    assert torch.allclose(out.loss, out.logs["dino_loss"])

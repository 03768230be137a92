"""CDCL / DINO objectives as small composable modules.

Tensor layout (as produced by `cdcl_hf.dino_head.MultiCropModel`): outputs are *view-major*,
`(V * B, K)` = view 0 for the whole batch, then view 1, ... Views are ordered
[global from x, global from x', local crops...] with sources given by
`cdcl_hf.multicrop.crop_sources`. The teacher sees the 2 global views only: `(2 * B, K)`, and
its per-row domain ids are `cat([domain, partner_domain])`.

Pieces:

- `PerDomainCenter` / `SingleCenter`: EMA centres subtracted from the teacher logits.
- `DINOLoss`: cross-entropy between sharpened teacher and student distributions over
  (teacher global view, student view) pairs with different index.
- `CrossCorrelationLoss`: Barlow-Twins-style term on batch-normalised teacher and student outputs.
- `CDCLObjective`: the method-level combination ("dino", "dino-cb", "cdcl").
- `collapse_metrics`: teacher entropy and KL to uniform for logging.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .methods import get_method

__all__ = [
    "PerDomainCenter",
    "SingleCenter",
    "DINOLoss",
    "CrossCorrelationLoss",
    "CDCLObjective",
    "CDCLLossOutput",
    "collapse_metrics",
    "teacher_domains_from_batch",
]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class PerDomainCenter(nn.Module):
    """One EMA centre per domain for the teacher logits.

    `forward` subtracts from each row the centre of its own domain; `update` moves the centres towards the
    batch means. The centre is a persistent buffer: it is in `state_dict` and checkpoints with the module.

    Args:
        num_domains (`int`):
            Number of domains (one centre each), at least 1.
        out_dim (`int`):
            Dimension `K` of the teacher logits.
        momentum (`float`, *optional*, defaults to 0.9):
            EMA momentum `m` of the centres, in [0, 1].
    """

    def __init__(self, num_domains: int, out_dim: int, momentum: float = 0.9):
        super().__init__()
        if num_domains < 1:
            raise ValueError("num_domains must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError("momentum must be in [0, 1]")
        self.num_domains, self.out_dim, self.momentum = int(num_domains), int(out_dim), float(momentum)
        self.register_buffer("center", torch.zeros(self.num_domains, self.out_dim))

    def _check_logits(self, teacher_out: torch.Tensor) -> None:
        if teacher_out.ndim != 2 or teacher_out.shape[1] != self.out_dim:
            raise ValueError(f"teacher output must be (N, {self.out_dim}), got {tuple(teacher_out.shape)}")

    def _check(self, teacher_out: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        self._check_logits(teacher_out)
        domains = domains.to(device=teacher_out.device, dtype=torch.long).reshape(-1)
        if domains.shape[0] != teacher_out.shape[0]:
            raise ValueError(f"{domains.shape[0]} domain ids for {teacher_out.shape[0]} teacher rows")
        # One device-to-host read (a GPU sync) per check; the range for the message only when it fails.
        if bool(((domains < 0) | (domains >= self.num_domains)).any()):
            raise ValueError(
                f"domain ids must lie in [0, {self.num_domains}), got [{int(domains.min())}, {int(domains.max())}]"
            )
        return domains

    def forward(self, teacher_out: torch.Tensor, domains: torch.Tensor) -> torch.Tensor:
        """Subtract from each row the centre of its own domain.

        Args:
            teacher_out (`torch.Tensor` of shape `(N, out_dim)`):
                The teacher logits.
            domains (`torch.Tensor` of shape `(N,)`):
                The domain id of each row, in `[0, num_domains)`.

        Returns:
            `torch.Tensor` of shape `(N, out_dim)`: the centred logits.
        """
        domains = self._check(teacher_out, domains)
        return teacher_out - self.center[domains].to(teacher_out.dtype)

    @torch.no_grad()
    def update(self, teacher_out: torch.Tensor, domains: torch.Tensor) -> None:
        """Move the centre of every domain present in the batch towards the mean of that domain's rows.

        `c_d <- m c_d + (1 - m) mean_d`; absent domains keep their centre. Under torch.distributed the
        per-domain sums and counts are all-reduced first, so every rank applies the same update and the
        centres stay identical across ranks.

        Args:
            teacher_out (`torch.Tensor` of shape `(N, out_dim)`):
                The (uncentred) teacher logits.
            domains (`torch.Tensor` of shape `(N,)`):
                The domain id of each row.
        """
        domains = self._check(teacher_out, domains)
        teacher_out = teacher_out.detach().float()
        sums = torch.zeros(self.num_domains, self.out_dim, device=teacher_out.device)
        sums.index_add_(0, domains, teacher_out)
        counts = torch.bincount(domains, minlength=self.num_domains).float()
        if _distributed():
            # One reduction for sums and counts together keeps ranks in lock-step cheaply.
            packed = torch.cat([sums, counts[:, None]], dim=1)
            dist.all_reduce(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        present = counts > 0
        batch_mean = sums / counts.clamp_min(1.0)[:, None]
        step = torch.full_like(counts, 1.0 - self.momentum)
        step = torch.where(present, step, torch.zeros_like(step))[:, None].to(self.center.device)
        self.center.mul_(1.0 - step).add_(step * batch_mean.to(self.center.device))


class SingleCenter(PerDomainCenter):
    """DINO's single centre: a `PerDomainCenter` with one domain; domain ids are not needed.

    Args:
        out_dim (`int`):
            Dimension `K` of the teacher logits.
        momentum (`float`, *optional*, defaults to 0.9):
            EMA momentum of the centre.
    """

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__(1, out_dim, momentum)

    def _check(self, teacher_out: torch.Tensor, domains: torch.Tensor | None) -> torch.Tensor:
        self._check_logits(teacher_out)
        return torch.zeros(teacher_out.shape[0], dtype=torch.long, device=teacher_out.device)

    def forward(self, teacher_out: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(teacher_out, domains)

    def update(self, teacher_out: torch.Tensor, domains: torch.Tensor | None = None) -> None:
        super().update(teacher_out, domains)


def view_pairs(
    num_student_views: int, view_sources: torch.Tensor | None, only_cross_domain: bool
) -> list[tuple[int, int]]:
    """(teacher view, student view) index pairs used by the losses.

    Teacher views 0 and 1 are paired with every student view of a different index; with
    `only_cross_domain`, pairs whose two views come from the same source image are dropped too.

    Args:
        num_student_views (`int`):
            The number `V` of student views.
        view_sources (`torch.Tensor` of shape `(V,)` or `None`):
            The source image of each view (see `cdcl_hf.multicrop.crop_sources`); required with
            `only_cross_domain`.
        only_cross_domain (`bool`):
            Whether to drop pairs of views from the same source image.

    Returns:
        `list[tuple[int, int]]`: the (teacher view, student view) pairs.

    Raises:
        `ValueError`: if `view_sources` is missing or has the wrong length, or no pair is left.
    """
    if only_cross_domain and view_sources is None:
        raise ValueError("only_cross_domain needs view_sources (see cdcl_hf.multicrop.crop_sources)")
    sources = view_sources.tolist() if view_sources is not None else None
    if sources is not None and len(sources) != num_student_views:
        raise ValueError(f"view_sources has {len(sources)} entries for {num_student_views} student views")
    pairs = [
        (t, s)
        for t in range(2)
        for s in range(num_student_views)
        if s != t and not (only_cross_domain and sources[t] == sources[s])
    ]
    if not pairs:
        raise ValueError("no (teacher, student) view pairs left to train on")
    return pairs


class DINOLoss(nn.Module):
    """DINO cross-entropy `-sum_k q_t log p_s` averaged over the batch and over view pairs.

    `q_t = softmax(centred teacher logits / teacher_temp)` (no gradient) and
    `p_s = softmax(student logits / student_temp)`; the view pairs are those of `view_pairs`.

    Args:
        teacher_temp_schedule (`Sequence[float]` or `float`, *optional*, defaults to 0.07):
            The teacher temperature per epoch (a float for a constant temperature; see
            `cdcl_hf.schedules.teacher_temperature_schedule`); epochs past its end use the last value.
        student_temp (`float`, *optional*, defaults to 0.1):
            The student temperature.
        only_cross_domain (`bool`, *optional*, defaults to `False`):
            Whether to drop (teacher, student) pairs of views from the same source image.
    """

    def __init__(
        self,
        teacher_temp_schedule: Sequence[float] | float = 0.07,
        student_temp: float = 0.1,
        only_cross_domain: bool = False,
    ):
        super().__init__()
        schedule = np.atleast_1d(np.asarray(teacher_temp_schedule, dtype=np.float64))
        if schedule.ndim != 1 or len(schedule) == 0 or (schedule <= 0).any():
            raise ValueError("teacher_temp_schedule must be positive")
        self.teacher_temp_schedule = schedule
        self.student_temp = float(student_temp)
        self.only_cross_domain = bool(only_cross_domain)

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(max(int(epoch), 0), len(self.teacher_temp_schedule) - 1)])

    def teacher_probs(self, centred_teacher_out: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.softmax(centred_teacher_out.detach().float() / self.teacher_temp(epoch), dim=-1)

    def forward(
        self,
        student_out: torch.Tensor,
        centred_teacher_out: torch.Tensor,
        epoch: int,
        view_sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute the loss.

        Args:
            student_out (`torch.Tensor` of shape `(V * B, K)`):
                The view-major student logits.
            centred_teacher_out (`torch.Tensor` of shape `(2 * B, K)`):
                The centred teacher logits of the two global views.
            epoch (`int`):
                The current epoch; selects the teacher temperature.
            view_sources (`torch.Tensor` of shape `(V,)`, *optional*):
                The source image of each view; required with `only_cross_domain`.

        Returns:
            `torch.Tensor`: the scalar loss.
        """
        batch = centred_teacher_out.shape[0] // 2
        if centred_teacher_out.shape[0] != 2 * batch or student_out.shape[0] % batch:
            raise ValueError(
                f"teacher rows {centred_teacher_out.shape[0]} / student rows {student_out.shape[0]} do not match 2 global views"
            )
        num_views = student_out.shape[0] // batch
        pairs = view_pairs(num_views, view_sources, self.only_cross_domain)
        q = self.teacher_probs(centred_teacher_out, epoch).view(2, batch, -1)
        log_p = F.log_softmax(student_out.float() / self.student_temp, dim=-1).view(num_views, batch, -1)
        # All (teacher, student) cross-entropies at once; unused pairs cost 2 of 2V terms.
        cross_entropy = -torch.einsum("tbk,sbk->ts", q, log_p) / batch
        teacher_idx = torch.tensor([t for t, _ in pairs], device=cross_entropy.device)
        student_idx = torch.tensor([s for _, s in pairs], device=cross_entropy.device)
        return cross_entropy[teacher_idx, student_idx].mean()


def _batch_standardise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension batch normalisation over the rows (dim -2) without affine parameters (biased variance)."""
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(dim=-2, keepdim=True) + eps)


class CrossCorrelationLoss(nn.Module):
    """Barlow-Twins-style cross-correlation term between teacher and student outputs.

    `C = BN(teacher)^T BN(student) / N` (K x K). The loss is a convex combination of the mean
    squared on-diagonal error and the mean squared off-diagonal correlation:
    `(1 - w) * mean_i (C_ii - 1)^2 + w * mean_{i != j} C_ij^2` with `w = off_diagonal_weight`.
    Note `w` weights *means*, not sums as in Barlow Twins' lambda, so it does not depend on K.

    Args:
        off_diagonal_weight (`float`, *optional*, defaults to 0.95):
            The convex weight `w`, in [0, 1] (0.95 in the authors' config).
        normalize (`bool`, *optional*, defaults to `True`):
            Divide the value by `(1 - w) + 0.01 w`, the research code's scale making a poorly-correlated
            start ~1 so that the term is commensurate with the log(K)-normalised DINO term in the
            weighted sum.
        eps (`float`, *optional*, defaults to 1e-5):
            Added to the variance in the batch normalisation `BN`.
        gather_distributed (`bool`, *optional*, defaults to `False`):
            With torch.distributed initialised, all-gather the rows (autograd-aware) so the statistics
            use the global batch; otherwise each rank uses its own.
    """

    def __init__(
        self,
        off_diagonal_weight: float = 0.95,
        normalize: bool = True,
        eps: float = 1e-5,
        gather_distributed: bool = False,
    ):
        super().__init__()
        if not 0.0 <= off_diagonal_weight <= 1.0:
            raise ValueError("off_diagonal_weight is a convex weight in [0, 1]")
        self.off_diagonal_weight = float(off_diagonal_weight)
        self.normalize, self.eps, self.gather_distributed = (
            bool(normalize),
            float(eps),
            bool(gather_distributed),
        )

    @property
    def scale(self) -> float:
        w = self.off_diagonal_weight
        return (1.0 - w) + 0.01 * w if self.normalize else 1.0

    def _standardised(self, teacher: torch.Tensor, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both outputs batch-standardised over their rows (dim -2; the global batch when gathering), float32."""
        teacher, student = teacher.float(), student.float()
        if self.gather_distributed and _distributed():
            from torch.distributed.nn.functional import all_gather

            teacher, student = torch.cat(all_gather(teacher), dim=-2), torch.cat(all_gather(student), dim=-2)
        if teacher.shape[-2] < 2:
            raise ValueError("cross-correlation needs at least 2 rows per batch")
        return _batch_standardise(teacher, self.eps), _batch_standardise(student, self.eps)

    def correlation(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """The (K, K) cross-correlation matrix `C` (for inspection; the loss does not need to build it)."""
        teacher, student = self._standardised(teacher, student)
        return teacher.T @ student / teacher.shape[0]

    def forward(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """Compute the loss of one (teacher, student) pair; no gradient flows into `teacher`.

        Args:
            teacher (`torch.Tensor` of shape `(N, K)`):
                The teacher outputs.
            student (`torch.Tensor` of shape `(N, K)`):
                The student outputs.

        Returns:
            `torch.Tensor`: the scalar loss.
        """
        if teacher.ndim != 2 or teacher.shape != student.shape:
            raise ValueError(
                f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} must be the same (N, K) shape"
            )
        return self.pairwise(teacher[None], student[None])[0, 0]

    def pairwise(self, teacher_views: torch.Tensor, student_views: torch.Tensor) -> torch.Tensor:
        """The loss of every (teacher view, student view) pair at once; no gradient flows into the teacher.

        Each view is standardised once (not once per pair it is in), and all pairs share batched products, so the
        term costs a few large kernels instead of a few per pair (what dominated the step on a GPU).

        Args:
            teacher_views (`torch.Tensor` of shape `(T, N, K)`):
                The teacher outputs of `T` views of the same `N` items.
            student_views (`torch.Tensor` of shape `(S, N, K)`):
                The student outputs of `S` views of the same `N` items.

        Returns:
            `torch.Tensor` of shape `(T, S)`: entry `(t, s)` is `forward(teacher_views[t], student_views[s])`.
        """
        if teacher_views.ndim != 3 or student_views.ndim != 3 or teacher_views.shape[1:] != student_views.shape[1:]:
            raise ValueError(
                f"teacher views {tuple(teacher_views.shape)} and student views {tuple(student_views.shape)} must be "
                "(T, N, K) and (S, N, K)"
            )
        teacher, student = self._standardised(teacher_views.detach(), student_views)
        n, k = teacher.shape[1:]
        # C_ii of every pair; one teacher view at a time, as a batched (K-many tiny) product is slow on CPUs.
        diagonal = torch.stack([(t * student).sum(1) for t in teacher]) / n
        if n < k:
            # sum_ij C_ij^2 = ||T^T S||_F^2 / n^2 = <T T^T, S S^T>_F / n^2: two (n, n) Gram matrices instead of the
            # (K, K) matrix, O(n^2 K) instead of O(n K^2) (K = 4096 and n = a per-device batch in the authors' recipe).
            teacher_gram, student_gram = teacher @ teacher.mT, student @ student.mT
            squares = torch.einsum("tij,sij->ts", teacher_gram, student_gram) / (n * n)
        else:
            # (S, K, K) per teacher view: no larger than the student views themselves when K <= n.
            squares = torch.stack([(torch.einsum("nk,snl->skl", t, student) / n).pow(2).sum((1, 2)) for t in teacher])
        on_diag = (diagonal - 1).pow(2).mean(-1)
        off_diag = (squares - diagonal.pow(2).sum(-1)) / max(k * k - k, 1)
        w = self.off_diagonal_weight
        return ((1.0 - w) * on_diag + w * off_diag) / self.scale


@torch.no_grad()
def collapse_metrics(teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse indicators from teacher probabilities, as detached 0-d tensors.

    Args:
        teacher_probs (`torch.Tensor` of shape `(N, K)`):
            The teacher probabilities.

    Returns:
        `dict[str, torch.Tensor]`: the indicators:

        - `teacher_entropy`: mean per-row entropy; -> log K means collapse to the uniform output.
        - `teacher_kl_to_uniform`: KL(mean teacher distribution || uniform) = log K - H(mean);
          large means the batch collapses onto a few dimensions.
        - `teacher_entropy_ratio`: `teacher_entropy / log K`, in [0, 1].
    """
    probs = teacher_probs.float()
    log_k = math.log(probs.shape[-1])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    mean_probs = probs.mean(0)
    mean_entropy = -(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
    return {
        "teacher_entropy": entropy,
        "teacher_kl_to_uniform": log_k - mean_entropy,
        "teacher_entropy_ratio": entropy / log_k,
    }


def teacher_domains_from_batch(domain: torch.Tensor, partner_domain: torch.Tensor) -> torch.Tensor:
    """Domain id of each teacher row (view-major: global 0 is from x, global 1 from x').

    Args:
        domain (`torch.Tensor` of shape `(B,)`):
            The domain of each image x.
        partner_domain (`torch.Tensor` of shape `(B,)`):
            The domain of each partner x'.

    Returns:
        `torch.Tensor` of shape `(2 * B,)`: `cat([domain, partner_domain])` as int64.
    """
    return torch.cat([domain.reshape(-1), partner_domain.reshape(-1)]).long()


@dataclass
class CDCLLossOutput:
    """What `CDCLObjective` returns.

    Args:
        loss (`torch.Tensor`):
            The scalar to backpropagate.
        logs (`dict[str, torch.Tensor]`):
            Detached 0-d tensors (call `.item()` when logging).
    """

    loss: torch.Tensor  # scalar to backpropagate
    logs: dict[str, torch.Tensor]  # detached 0-d tensors (call .item() when logging)


class CDCLObjective(nn.Module):
    """The training objective for `method` in {"dino", "dino-cb", "cdcl"}.

    `loss = dino_weight * DINO / log(K) + cross_correlation_weight * CC` (`normalize_terms`, the
    research code's scaling that makes the 0.25 / 0.75 weights meaningful; with
    `normalize_terms=False` the raw DINO cross-entropy and raw CC are weighted). Per-domain
    centring uses the teacher rows' own domains; the cross-correlation term compares the centred
    teacher logits with the student logits for the same (teacher, student) view pairs as DINO.
    The centres are updated after the loss (in training mode only).

    Args:
        method (`str`, *optional*, defaults to `"cdcl"`):
            `"dino"`, `"dino-cb"` or `"cdcl"` (see `cdcl_hf.methods`); gives the defaults of the
            arguments left `None`.
        out_dim (`int`, *optional*, defaults to 4096):
            The number `K` of head outputs.
        num_domains (`int`, *optional*, defaults to 1):
            The number of domains (centres) for per-domain centring.
        teacher_temp_schedule (`Sequence[float]` or `float`, *optional*, defaults to 0.07):
            See `DINOLoss`.
        student_temp (`float`, *optional*, defaults to 0.1):
            See `DINOLoss`.
        dino_weight (`float`, *optional*):
            Weight of the DINO term; the method's when `None`.
        cross_correlation_weight (`float`, *optional*):
            Weight of the cross-correlation term; the method's when `None`.
        off_diagonal_weight (`float`, *optional*, defaults to 0.95):
            See `CrossCorrelationLoss`.
        center_momentum (`float`, *optional*, defaults to 0.9):
            EMA momentum of the centres.
        only_cross_domain (`bool`, *optional*, defaults to `False`):
            See `DINOLoss`; needs a method with cross-domain pairs.
        per_domain_centering (`bool`, *optional*):
            One centre per domain (`PerDomainCenter`) instead of DINO's `SingleCenter`; the method's
            when `None`.
        normalize_terms (`bool`, *optional*, defaults to `True`):
            Scale the terms as above (also `CrossCorrelationLoss`'s `normalize`).
        gather_distributed (`bool`, *optional*, defaults to `False`):
            See `CrossCorrelationLoss`.
    """

    def __init__(
        self,
        method: str = "cdcl",
        out_dim: int = 4096,
        num_domains: int = 1,
        teacher_temp_schedule: Sequence[float] | float = 0.07,
        student_temp: float = 0.1,
        dino_weight: float | None = None,
        cross_correlation_weight: float | None = None,
        off_diagonal_weight: float = 0.95,
        center_momentum: float = 0.9,
        only_cross_domain: bool = False,
        per_domain_centering: bool | None = None,
        normalize_terms: bool = True,
        gather_distributed: bool = False,
    ):
        super().__init__()
        training_method = get_method(method)
        if only_cross_domain and not training_method.cross_domain_pairs:
            raise ValueError(
                f"only_cross_domain needs cross-domain pairs; method {training_method.name!r} uses one image per item"
            )
        self.method = training_method.name
        self.out_dim = int(out_dim)
        self.dino_weight = float(training_method.dino_weight if dino_weight is None else dino_weight)
        self.cross_correlation_weight = float(
            training_method.cross_correlation_weight if cross_correlation_weight is None else cross_correlation_weight
        )
        if (
            self.dino_weight < 0
            or self.cross_correlation_weight < 0
            or self.dino_weight + self.cross_correlation_weight == 0
        ):
            raise ValueError("loss weights must be >= 0 and not both zero")
        per_domain = bool(
            training_method.per_domain_centering if per_domain_centering is None else per_domain_centering
        )
        self.per_domain_centering = per_domain
        self.center = (
            PerDomainCenter(num_domains, out_dim, center_momentum)
            if per_domain
            else SingleCenter(out_dim, center_momentum)
        )
        self.dino = DINOLoss(teacher_temp_schedule, student_temp, only_cross_domain)
        self.cross_correlation = CrossCorrelationLoss(
            off_diagonal_weight, normalize_terms, gather_distributed=gather_distributed
        )
        self.normalize_terms = bool(normalize_terms)

    @property
    def pairing_mode(self) -> str:
        return get_method(self.method).pairing_mode

    def forward(
        self,
        student_out: torch.Tensor,
        teacher_out: torch.Tensor,
        epoch: int,
        teacher_domains: torch.Tensor | None = None,
        view_sources: torch.Tensor | None = None,
    ) -> CDCLLossOutput:
        """Compute the loss and its logs, then update the centres in training mode.

        Args:
            student_out (`torch.Tensor` of shape `(V * B, K)`):
                The view-major student logits.
            teacher_out (`torch.Tensor` of shape `(2 * B, K)`):
                The teacher logits of the two global views (uncentred).
            epoch (`int`):
                The current epoch; selects the teacher temperature.
            teacher_domains (`torch.Tensor` of shape `(2 * B,)`, *optional*):
                The domain of each teacher row (see `teacher_domains_from_batch`); required with
                per-domain centring.
            view_sources (`torch.Tensor` of shape `(V,)`, *optional*):
                The source image of each view; required with `only_cross_domain`.

        Returns:
            `CDCLLossOutput`: the loss and its logs.
        """
        if self.per_domain_centering and teacher_domains is None:
            raise ValueError("per-domain centring needs teacher_domains (see teacher_domains_from_batch)")
        teacher_out = teacher_out.detach()
        centred = self.center(teacher_out, teacher_domains)
        dino_raw = self.dino(student_out, centred, epoch, view_sources)
        dino_term = dino_raw / math.log(self.out_dim) if self.normalize_terms else dino_raw
        loss = self.dino_weight * dino_term
        logs: dict[str, torch.Tensor] = {"dino_loss": dino_raw.detach()}

        if self.cross_correlation_weight > 0:
            batch = teacher_out.shape[0] // 2
            num_views = student_out.shape[0] // batch
            pairs = view_pairs(num_views, view_sources, self.dino.only_cross_domain)
            per_pair = self.cross_correlation.pairwise(
                centred.view(2, batch, -1), student_out.view(num_views, batch, -1)
            )
            teacher_idx, student_idx = torch.tensor(pairs, device=per_pair.device).T
            cc = per_pair[teacher_idx, student_idx].mean()
            loss = loss + self.cross_correlation_weight * cc
            logs["cross_correlation_loss"] = cc.detach()

        logs["loss"] = loss.detach()
        logs["teacher_temp"] = torch.tensor(self.dino.teacher_temp(epoch))
        logs.update(collapse_metrics(self.dino.teacher_probs(centred, epoch)))
        # Cross-entropy = teacher entropy + KL(teacher || student). The entropy moves with the teacher's sharpness
        # (it rises early in training as the teacher diversifies); the KL is the part the student closes.
        logs["dino_kl"] = logs["dino_loss"] - logs["teacher_entropy"]
        logs["center_norm"] = self.center.center.norm(dim=1).mean().detach()
        if self.training:
            self.center.update(teacher_out, teacher_domains)
        return CDCLLossOutput(loss=loss, logs=logs)

"""Cross-domain partner sampling for CDCL.

CDCL trains DINO on pairs (x, x') where x' has the same label (treatment / siRNA) as x but comes
from a different domain (plate / batch). The research code finds a partner by filtering the whole
metadata table for every item, which is O(N) per item. Here a `PartnerIndex` is built once
(O(N log N)) and every draw afterwards is a handful of array look-ups and one random integer,
independent of the dataset size.

Index layout: all item positions are sorted by (label code, domain code, position). Then

- the items of one label form one contiguous block `order[label_start:label_stop]`;
- inside it, the items of one (label, domain) group form a contiguous sub-block.

A uniform draw from "same label, other domain" is a uniform integer `r` over the label block
length minus the own group's length, shifted past the own group when it lands on or after it.

Labels that exist in one domain only have no cross-domain partner. What happens to their items is
an explicit `SingleDomainPolicy`, and the number of items in each case is exposed in
`PartnerIndex.counts` for logging; every yielded item also carries its `PairCase` code so the
training loop can count what it actually trained on.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .image_io import decode_image

__all__ = [
    "SingleDomainPolicy",
    "PairCase",
    "PairingMode",
    "SingleDomainLabelError",
    "PartnerIndex",
    "CrossDomainPairDataset",
    "CrossDomainPairIterableDataset",
    "EpochIndexSampler",
    "PAIR_CASE_NAMES",
    "count_pair_cases",
]


class SingleDomainPolicy(str, enum.Enum):
    """What to do with an item whose label has no image in any other domain."""

    SAME_DOMAIN = "same_domain"  # authors' fallback: another image of the same label (else itself)
    SELF = "self"  # pair the image with itself
    DROP = "drop"  # exclude the item from training
    ERROR = "error"  # refuse to build the index


class PairCase(enum.IntEnum):
    """How an item's partner was (or would be) chosen; yielded with every item for logging."""

    CROSS_DOMAIN = 0  # same label, different domain (the intended CDCL pair)
    SAME_DOMAIN = 1  # fallback: another image of the same label in the same domain
    SELF = 2  # fallback: the image itself
    DROPPED = 3  # excluded from training by the "drop" policy (never yielded)
    SAME_IMAGE = 4  # "same_image" mode (plain DINO): both views from one image by design


class PairingMode(str, enum.Enum):
    CROSS_DOMAIN = "cross_domain"  # dino-cb and cdcl
    SAME_IMAGE = "same_image"  # plain dino baseline


class SingleDomainLabelError(ValueError):
    """Raised under the "error" policy when some label occurs in one domain only."""


def _factorize(values: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes 0..K-1 and the matching unique values.

    Missing values are an error because a missing label or domain silently forming its own group
    would produce wrong pairs.
    """
    array = values.to_numpy() if isinstance(values, pd.Series) else values
    if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.integer):
        # Integer columns: factorize the numbers directly (10x faster than as Python objects at 1e6 items); the
        # codes are the same and the uniques are given back as the same Python ints.
        codes, uniques = pd.factorize(array, sort=True)
        return codes.astype(np.int64), np.asarray(uniques.tolist(), dtype=object)
    series = pd.Series(np.asarray(values, dtype=object) if not isinstance(values, pd.Series) else values)
    codes, uniques = pd.factorize(series, sort=True)
    missing = int((codes < 0).sum())
    if missing:
        raise ValueError(f"{missing} item(s) have a missing {what}; fill or filter them before pairing")
    return codes.astype(np.int64), np.asarray(uniques, dtype=object)


class PartnerIndex:
    """Label/domain index giving O(1) uniform partner draws.

    Args:
        labels (`Sequence[Any]`):
            One label per item (any hashable values; e.g. the `treatment` column).
        domains (`Sequence[Any]`):
            One domain per item (e.g. `plate` or `batch`).
        policy (`SingleDomainPolicy` or `str`, *optional*, defaults to `"same_domain"`):
            What to do with labels found in one domain only.

    Attributes:
        num_items, num_labels, num_domains (`int`):
            Sizes.
        label_codes, domain_codes (`np.ndarray`):
            int64 arrays of length `num_items`.
        label_names, domain_names (`np.ndarray`):
            The values behind the codes (`domain_names[domain_codes[i]]`).
        item_case (`np.ndarray`):
            int8 array, the `PairCase` of each item under the policy.
        eligible (`np.ndarray`):
            int64 array of the item positions used for training (all but dropped ones).
        counts (`dict[str, int]`):
            Case counts and label statistics for logging.

    Raises:
        `SingleDomainLabelError`: under the "error" policy when some label occurs in one domain only.
    """

    def __init__(
        self, labels: Sequence[Any], domains: Sequence[Any], policy: SingleDomainPolicy | str = "same_domain"
    ):
        self.policy = SingleDomainPolicy(policy)
        self.label_codes, self.label_names = _factorize(labels, "label")
        self.domain_codes, self.domain_names = _factorize(domains, "domain")
        if len(self.label_codes) != len(self.domain_codes):
            raise ValueError(
                f"labels ({len(self.label_codes)}) and domains ({len(self.domain_codes)}) differ in length"
            )
        self.num_items = len(self.label_codes)
        if self.num_items == 0:
            raise ValueError("cannot build a PartnerIndex from zero items")
        self.num_labels = len(self.label_names)
        self.num_domains = len(self.domain_names)

        # Sort once by (label, domain); lexsort is stable so positions stay ascending in a group.
        self.order = np.lexsort((self.domain_codes, self.label_codes)).astype(np.int64)
        self.rank = np.empty(self.num_items, dtype=np.int64)  # position of item i inside `order`
        self.rank[self.order] = np.arange(self.num_items, dtype=np.int64)

        sorted_labels = self.label_codes[self.order]
        sorted_domains = self.domain_codes[self.order]
        # A (label, domain) group starts wherever the label or the domain changes in sorted order.
        starts_group = np.ones(self.num_items, dtype=bool)
        starts_group[1:] = (sorted_labels[1:] != sorted_labels[:-1]) | (
            sorted_domains[1:] != sorted_domains[:-1]
        )
        group_starts = np.flatnonzero(starts_group)
        group_stops = np.append(group_starts[1:], self.num_items)
        group_of_sorted = np.cumsum(starts_group) - 1
        self.group_of_item = np.empty(self.num_items, dtype=np.int64)
        self.group_of_item[self.order] = group_of_sorted
        self.group_start = group_starts.astype(np.int64)
        self.group_stop = group_stops.astype(np.int64)

        label_sizes = np.bincount(self.label_codes, minlength=self.num_labels)
        self.label_stop = np.cumsum(label_sizes).astype(np.int64)
        self.label_start = self.label_stop - label_sizes
        self.group_label = sorted_labels[group_starts]
        domains_per_label = np.bincount(self.group_label, minlength=self.num_labels)

        # Classify every item once so the per-item draw needs no branching on table contents.
        own_group = self.group_of_item
        label_size_of_item = label_sizes[self.label_codes]
        group_size_of_item = (self.group_stop - self.group_start)[own_group]
        has_other_domain = label_size_of_item > group_size_of_item
        has_same_domain_other = group_size_of_item > 1
        case = np.full(self.num_items, PairCase.CROSS_DOMAIN, dtype=np.int8)
        single = ~has_other_domain
        if self.policy is SingleDomainPolicy.SAME_DOMAIN:
            case[single & has_same_domain_other] = PairCase.SAME_DOMAIN
            case[single & ~has_same_domain_other] = PairCase.SELF
        elif self.policy is SingleDomainPolicy.SELF:
            case[single] = PairCase.SELF
        elif self.policy is SingleDomainPolicy.DROP:
            case[single] = PairCase.DROPPED
        elif single.any():  # ERROR
            bad = np.flatnonzero(domains_per_label == 1)
            examples = ", ".join(repr(self.label_names[b]) for b in bad[:5])
            hint = (
                f" (the domain column has a single value, {self.domain_names[0]!r}: cross-domain pairing is impossible)"
                if self.num_domains == 1
                else ""
            )
            raise SingleDomainLabelError(
                f"{len(bad)} of {self.num_labels} labels occur in one domain only ({int(single.sum())} items), "
                f"e.g. {examples}{hint}; choose policy 'same_domain', 'self' or 'drop' to train anyway"
            )
        self.item_case = case
        self.eligible = np.flatnonzero(case != PairCase.DROPPED).astype(np.int64)
        if len(self.eligible) == 0:
            raise ValueError("the 'drop' policy removed every item: no label occurs in more than one domain")

        domain_sizes = np.bincount(self.domain_codes, minlength=self.num_domains)
        self.domain_sizes = domain_sizes
        self.counts: dict[str, int] = {
            "items": self.num_items,
            "labels": self.num_labels,
            "domains": self.num_domains,
            "single_domain_labels": int((domains_per_label == 1).sum()),
            "single_image_labels": int((label_sizes == 1).sum()),
            "single_image_domains": int((domain_sizes == 1).sum()),
            "items_cross_domain": int((case == PairCase.CROSS_DOMAIN).sum()),
            "items_same_domain_fallback": int((case == PairCase.SAME_DOMAIN).sum()),
            "items_self_fallback": int((case == PairCase.SELF).sum()),
            "items_dropped": int((case == PairCase.DROPPED).sum()),
        }

    @classmethod
    def from_table(
        cls,
        table: Any,
        label_column: str = "treatment",
        domain_column: str = "plate",
        policy: SingleDomainPolicy | str = "same_domain",
    ) -> PartnerIndex:
        """Build from a pandas DataFrame or a `datasets.Dataset` (columns read via Arrow, no images).

        Args:
            table (`pd.DataFrame` or `datasets.Dataset`):
                The metadata table, one row per item.
            label_column (`str`, *optional*, defaults to `"treatment"`):
                The column holding the labels.
            domain_column (`str`, *optional*, defaults to `"plate"`):
                The column holding the domains.
            policy (`SingleDomainPolicy` or `str`, *optional*, defaults to `"same_domain"`):
                See `PartnerIndex`.
        """
        if isinstance(table, pd.DataFrame):
            frame = table
        elif hasattr(table, "select_columns") and hasattr(table, "to_pandas"):
            frame = table.select_columns([label_column, domain_column]).to_pandas()
        else:
            raise TypeError(f"expected a pandas DataFrame or a datasets.Dataset, got {type(table).__name__}")
        missing = [c for c in (label_column, domain_column) if c not in frame.columns]
        if missing:
            raise KeyError(f"column(s) {missing} not found; available: {list(frame.columns)}")
        return cls(frame[label_column], frame[domain_column], policy=policy)

    def __len__(self) -> int:
        return self.num_items

    def sample_partner(self, item: int, rng: random.Random | np.random.Generator) -> tuple[int, PairCase]:
        """Draw a partner for `item` under the index's policy; O(1).

        Args:
            item (`int`):
                The item position.
            rng (`random.Random` or `np.random.Generator`):
                The random source.

        Returns:
            `tuple[int, PairCase]`: `(partner_position, case)`.

        Raises:
            `IndexError`: for items dropped by the policy.
        """
        case = PairCase(int(self.item_case[item]))
        if case is PairCase.DROPPED:
            raise IndexError(f"item {item} was dropped by the 'drop' policy (its label has one domain only)")
        if case is PairCase.SELF:
            return item, case
        group = self.group_of_item[item]
        group_start, group_stop = int(self.group_start[group]), int(self.group_stop[group])
        if case is PairCase.CROSS_DOMAIN:
            label = self.label_codes[item]
            label_start, label_stop = int(self.label_start[label]), int(self.label_stop[label])
            num_candidates = (label_stop - label_start) - (group_stop - group_start)
            offset = label_start + _uniform_int(rng, num_candidates)
            if offset >= group_start:  # skip over the own-domain block
                offset += group_stop - group_start
            return int(self.order[offset]), case
        # SAME_DOMAIN fallback: another member of the own group, skipping the item itself.
        own_rank = int(self.rank[item])
        offset = group_start + _uniform_int(rng, group_stop - group_start - 1)
        if offset >= own_rank:
            offset += 1
        return int(self.order[offset]), case

    def sample_partners(self, items: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `sample_partner` for many items (same distribution); O(len(items))."""
        items = np.asarray(items, dtype=np.int64)
        cases = self.item_case[items]
        if (cases == PairCase.DROPPED).any():
            raise IndexError("some items were dropped by the 'drop' policy")
        partners = items.copy()
        groups = self.group_of_item[items]
        group_start, group_stop = self.group_start[groups], self.group_stop[groups]
        group_len = group_stop - group_start

        cross = cases == PairCase.CROSS_DOMAIN
        if cross.any():
            labels = self.label_codes[items[cross]]
            label_start = self.label_start[labels]
            n = (self.label_stop[labels] - label_start) - group_len[cross]
            offset = label_start + np.floor(rng.random(n.shape) * n).astype(np.int64)
            offset = np.where(offset >= group_start[cross], offset + group_len[cross], offset)
            partners[cross] = self.order[offset]
        same = cases == PairCase.SAME_DOMAIN
        if same.any():
            n = group_len[same] - 1
            offset = group_start[same] + np.floor(rng.random(n.shape) * n).astype(np.int64)
            offset = np.where(offset >= self.rank[items[same]], offset + 1, offset)
            partners[same] = self.order[offset]
        return partners, cases

    def state_summary(self) -> dict[str, int | str]:
        """Counts plus the policy, ready for a logger or a run card."""
        return {"policy": self.policy.value, **self.counts}


def _uniform_int(rng: random.Random | np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n) from either RNG flavour."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def _default_image_loader(row: Any) -> torch.Tensor:
    """A (C,H,W) float tensor from a row: a tensor/array itself, or a dict with an `image` entry."""
    value = row["image"] if isinstance(row, Mapping) else row
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, (list, tuple)):  # screen schema: one single-channel image per channel
        value = decode_image(value)
    return torch.from_numpy(np.asarray(value, dtype=np.float32))


class EpochIndexSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` so the epoch reaches `CrossDomainPairDataset` even in persistent workers.

    Persistent DataLoader workers do not see `dataset.set_epoch` called in the main process. The order
    is a permutation seeded by `(seed, epoch)` (or sequential with `shuffle=False`); `set_epoch` must
    be called before each epoch, as with `DistributedSampler`.

    Args:
        num_items (`int`):
            The dataset length.
        seed (`int`, *optional*, defaults to 0):
            The base seed of the permutations.
        shuffle (`bool`, *optional*, defaults to `True`):
            Whether to permute the order each epoch.
    """

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        self.num_items, self.seed, self.shuffle, self.epoch = num_items, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        return iter([(self.epoch, int(i)) for i in order])


class CrossDomainPairDataset(Dataset):
    """Map-style dataset yielding (image, partner image) pairs, deterministic per (seed, epoch, idx).

    Item `idx` runs over `index.eligible` (items dropped by the policy are skipped), and may be
    an int (uses `self.epoch`, set by `set_epoch`) or an `(epoch, idx)` tuple from
    `EpochIndexSampler`. Each item is a dict with the transform's tensors plus `domain`,
    `partner_domain`, `index`, `partner_index` and `pair_case` (a `PairCase` code).

    Args:
        base_dataset (`Any`):
            Anything indexable by item position (a `datasets.Dataset`, a list of tensors...).
        index (`PartnerIndex`):
            The index of `base_dataset` (same item order).
        transform (`Callable`, *optional*):
            Called as `transform(image, partner, generator=torch.Generator)` and returns a dict of
            tensors (e.g. `cdcl_hf.multicrop.MultiCropAugmentation`); `None` returns the raw `image` /
            `partner_image` tensors instead.
        mode (`PairingMode` or `str`, *optional*, defaults to `"cross_domain"`):
            `"cross_domain"` (partner from `index`) or `"same_image"` (plain DINO: partner = image).
        seed (`int`, *optional*, defaults to 0):
            The base seed; together with epoch and idx it fixes the partner and all augmentations.
        image_loader (`Callable[[Any], torch.Tensor]`, *optional*):
            Maps `base_dataset[i]` to a float (C,H,W) tensor (e.g. decoding and per-plate
            normalisation: training uses `cdcl_hf.normalization.PlateNormalization.load_normalized`).
        cache_bytes (`int`, *optional*, defaults to 0):
            Keep up to this many bytes of loaded images in memory (per process / data-loader worker), so an image
            drawn again (as a partner, or in a later epoch) is not decoded again. Loading is deterministic, so the
            items are identical with or without the cache; 0 disables it. The transform must not modify its
            input images in place (`MultiCropAugmentation` does not).
    """

    def __init__(
        self,
        base_dataset: Any,
        index: PartnerIndex,
        transform: Callable[..., Mapping[str, torch.Tensor]] | None = None,
        mode: PairingMode | str = "cross_domain",
        seed: int = 0,
        image_loader: Callable[[Any], torch.Tensor] | None = None,
        cache_bytes: int = 0,
    ):
        if len(base_dataset) != index.num_items:
            raise ValueError(
                f"base dataset has {len(base_dataset)} items but the index has {index.num_items}"
            )
        self.base_dataset = base_dataset
        self.index = index
        self.transform = transform
        self.mode = PairingMode(mode)
        self.seed = int(seed)
        self.image_loader = image_loader or _default_image_loader
        # In same_image mode there is no partner, so the single-domain policy must not drop anything.
        self.items = index.eligible if self.mode is PairingMode.CROSS_DOMAIN else np.arange(index.num_items)
        self.epoch = 0
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def load_image(self, item: int) -> torch.Tensor:
        """The loaded (and, if the transform has an idempotent `prepare`, prepared) image of base item `item`."""
        image = self._cache.get(item)
        if image is not None:
            return image
        image = self.image_loader(self.base_dataset[item])
        prepare = getattr(self.transform, "prepare", None)
        if prepare is not None:  # e.g. MultiCropAugmentation's resize: idempotent, so done once per cached image
            image = prepare(image)
        size = image.element_size() * image.nelement() if isinstance(image, torch.Tensor) else 0
        if size and self._cached_bytes + size <= self.cache_bytes:
            self._cache[item] = image
            self._cached_bytes += size
        return image

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def pair_for(self, idx: int, epoch: int | None = None) -> tuple[int, int, PairCase]:
        """(item, partner, case) for dataset position `idx` at `epoch`; no image is loaded."""
        epoch = self.epoch if epoch is None else int(epoch)
        item = int(self.items[idx])
        if self.mode is PairingMode.SAME_IMAGE:
            return item, item, PairCase.SAME_IMAGE
        rng = random.Random(_mix_seed(self.seed, epoch, idx, 0))
        partner, case = self.index.sample_partner(item, rng)
        return item, partner, case

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, idx = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        item, partner, case = self.pair_for(idx, epoch)
        image = self.load_image(item)
        partner_image = image if partner == item else self.load_image(partner)
        out: dict[str, Any]
        if self.transform is None:
            out = {"image": image, "partner_image": partner_image}
        else:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, epoch, idx, 1))
            out = dict(self.transform(image, partner_image, generator=generator))
        out.update(
            domain=int(self.index.domain_codes[item]),
            partner_domain=int(self.index.domain_codes[partner]),
            index=item,
            partner_index=partner,
            pair_case=int(case),
        )
        return out


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing avoids correlated neighbours)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
        .generate_state(2, np.uint32)
        .view(np.uint64)[0]
        >> 1
    )


@dataclass
class _Slot:
    row: Any
    label: Any
    domain: Any


class _PartnerPool:
    """Fixed-capacity pool of recent rows with uniform draws by (label, other / same domain).

    Draws never scan the pool. Per label: per-domain lists of slot ids with O(1) swap-removal. A
    draw from "label L, not domain d" walks the label's domain lists (at most min(#domains, capacity)
    of them), which is bounded by the pool size, never by the (unbounded) stream length.

    Args:
        capacity (`int`):
            The maximum number of rows held.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.slots: list[_Slot | None] = [None] * capacity
        self.free = list(range(capacity - 1, -1, -1))
        self.buckets: dict[Any, dict[Any, list[int]]] = {}
        self.bucket_pos: dict[int, int] = {}

    def __len__(self) -> int:
        return self.capacity - len(self.free)

    def add(self, row: Any, label: Any, domain: Any) -> int:
        slot = self.free.pop()
        self.slots[slot] = _Slot(row, label, domain)
        bucket = self.buckets.setdefault(label, {}).setdefault(domain, [])
        self.bucket_pos[slot] = len(bucket)
        bucket.append(slot)
        return slot

    def remove(self, slot: int) -> None:
        entry = self.slots[slot]
        assert entry is not None
        domains = self.buckets[entry.label]
        _swap_remove(domains[entry.domain], self.bucket_pos, slot)
        if not domains[entry.domain]:
            del domains[entry.domain]
            if not domains:
                del self.buckets[entry.label]
        self.slots[slot] = None
        self.free.append(slot)

    def draw(self, slot: int, rng: random.Random, other_domain: bool) -> int | None:
        """A uniform pool slot with the label of `slot`, or `None` when there is none.

        With `other_domain` the slot's domain differs from that of `slot`; otherwise it is the same
        domain, excluding `slot` itself.
        """
        entry = self.slots[slot]
        assert entry is not None
        domains = self.buckets[entry.label]
        if not other_domain:
            same = domains[entry.domain]
            if len(same) < 2:
                return None
            r = rng.randrange(len(same) - 1)
            return same[r + 1] if r >= self.bucket_pos[slot] else same[r]
        total = sum(len(slots) for d, slots in domains.items() if d != entry.domain)
        if total == 0:
            return None
        r = rng.randrange(total)
        for d, slots in domains.items():
            if d == entry.domain:
                continue
            if r < len(slots):
                return slots[r]
            r -= len(slots)
        raise AssertionError("unreachable")


def _swap_remove(items: list[int], positions: dict[int, int], value: int) -> None:
    pos = positions.pop(value)
    last = items.pop()
    if last != value:
        items[pos] = last
        positions[last] = pos


class CrossDomainPairIterableDataset(IterableDataset):
    """Streaming version: rows are shuffled through a buffer and partners come from recent rows.

    Rows enter a shuffle buffer of `buffer_size`; when it is full a uniformly chosen row is
    emitted. Its partner is drawn uniformly from the *partner pool* — the rows still in the
    shuffle buffer plus the last `buffer_size` emitted rows — among those with the same label
    and another domain (so rows at the end of the stream still find partners). If there is none,
    the policy applies *within the pool*. `pair_case` is yielded with each item and `counts`
    tallies cases (per process / worker). Deterministic given (seed, epoch, worker id) and the
    upstream order.

    Args:
        base_iterable (`Iterable[Mapping[str, Any]]`):
            The rows, as mappings holding the label and domain columns; `set_epoch` is forwarded to it
            when it has one.
        label_column (`str`, *optional*, defaults to `"treatment"`):
            The column holding the labels.
        domain_column (`str`, *optional*, defaults to `"plate"`):
            The column holding the domains.
        transform (`Callable`, *optional*):
            As in `CrossDomainPairDataset`.
        mode (`PairingMode` or `str`, *optional*, defaults to `"cross_domain"`):
            As in `CrossDomainPairDataset`.
        seed (`int`, *optional*, defaults to 0):
            The base seed of the shuffling, partners and augmentations.
        buffer_size (`int`, *optional*, defaults to 1000):
            The size of the shuffle buffer.
        policy (`SingleDomainPolicy` or `str`, *optional*, defaults to `"same_domain"`):
            Applied within the pool: "same_domain" takes a pooled same-label row from the same domain
            (else the row itself), "self" pairs the row with itself, "drop" skips the row. "error" is
            refused because a missing partner in a pool says nothing about the whole dataset.
        domain_to_id (`Mapping[Any, int]`, *optional*):
            Domain ids index the per-domain centres, so pass this (e.g. from the dataset's plate list)
            for ids that are stable across workers and runs; otherwise ids follow first appearance.
        image_loader (`Callable[[Any], torch.Tensor]`, *optional*):
            As in `CrossDomainPairDataset`.
    """

    def __init__(
        self,
        base_iterable: Iterable[Mapping[str, Any]],
        label_column: str = "treatment",
        domain_column: str = "plate",
        transform: Callable[..., Mapping[str, torch.Tensor]] | None = None,
        mode: PairingMode | str = "cross_domain",
        seed: int = 0,
        buffer_size: int = 1000,
        policy: SingleDomainPolicy | str = "same_domain",
        domain_to_id: Mapping[Any, int] | None = None,
        image_loader: Callable[[Any], torch.Tensor] | None = None,
    ):
        self.policy = SingleDomainPolicy(policy)
        if self.policy is SingleDomainPolicy.ERROR:
            raise ValueError(
                "policy 'error' is not supported when streaming: a pool without a cross-domain "
                "partner does not prove the label has one domain; use 'same_domain', 'self' or 'drop'"
            )
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self.base_iterable = base_iterable
        self.label_column, self.domain_column = label_column, domain_column
        self.transform = transform
        self.mode = PairingMode(mode)
        self.seed = int(seed)
        self.buffer_size = int(buffer_size)
        self._fixed_domain_ids = domain_to_id is not None
        self.domain_to_id: dict[Any, int] = dict(domain_to_id) if domain_to_id is not None else {}
        self.image_loader = image_loader or _default_image_loader
        self.epoch = 0
        self.counts = {case.name.lower(): 0 for case in PairCase}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.base_iterable, "set_epoch"):
            self.base_iterable.set_epoch(epoch)

    def _domain_id(self, domain: Any) -> int:
        if domain not in self.domain_to_id:
            if self._fixed_domain_ids:
                raise KeyError(f"domain {domain!r} is not in domain_to_id")
            self.domain_to_id[domain] = len(self.domain_to_id)
        return self.domain_to_id[domain]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        rng = random.Random(_mix_seed(self.seed, self.epoch, worker_id, 2))
        pool = _PartnerPool(2 * self.buffer_size)
        pending: list[int] = []  # pool slots not yet emitted (the shuffle buffer)
        pending_pos: dict[int, int] = {}
        emitted_slots: deque[int] = deque()  # emitted slots still in the pool, oldest first
        emitted = 0

        def emit_one() -> dict[str, Any] | None:
            nonlocal emitted
            slot = pending[rng.randrange(len(pending))]
            _swap_remove(pending, pending_pos, slot)
            emitted_slots.append(slot)
            out = self._pair(pool, slot, rng, emitted, worker_id)
            emitted += 1
            return out

        for row in self.base_iterable:
            if len(pending) == self.buffer_size:
                out = emit_one()
                if out is not None:
                    yield out
            if len(pool) == pool.capacity:
                pool.remove(emitted_slots.popleft())
            slot = pool.add(row, row[self.label_column], row[self.domain_column])
            pending_pos[slot] = len(pending)
            pending.append(slot)
        while pending:
            out = emit_one()
            if out is not None:
                yield out

    def _pair(
        self, pool: _PartnerPool, slot: int, rng: random.Random, emitted: int, worker_id: int
    ) -> dict[str, Any] | None:
        entry = pool.slots[slot]
        assert entry is not None
        if self.mode is PairingMode.SAME_IMAGE:
            partner_slot, case = slot, PairCase.SAME_IMAGE
        else:
            partner_slot, case = pool.draw(slot, rng, other_domain=True), PairCase.CROSS_DOMAIN
            if partner_slot is None:
                if self.policy is SingleDomainPolicy.DROP:
                    self.counts["dropped"] += 1
                    return None
                if self.policy is SingleDomainPolicy.SAME_DOMAIN:
                    partner_slot, case = pool.draw(slot, rng, other_domain=False), PairCase.SAME_DOMAIN
                if partner_slot is None:
                    partner_slot, case = slot, PairCase.SELF
        partner = pool.slots[partner_slot]
        assert partner is not None
        self.counts[case.name.lower()] += 1
        image = self.image_loader(entry.row)
        partner_image = image if partner_slot == slot else self.image_loader(partner.row)
        if self.transform is None:
            out: dict[str, Any] = {"image": image, "partner_image": partner_image}
        else:
            generator = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, worker_id, emitted, 3))
            out = dict(self.transform(image, partner_image, generator=generator))
        out.update(
            domain=self._domain_id(entry.domain),
            partner_domain=self._domain_id(partner.domain),
            pair_case=int(case),
        )
        return out


# Kept for log keys: a readable name for each PairCase code.
PAIR_CASE_NAMES = {int(case): case.name.lower() for case in PairCase}


def count_pair_cases(pair_case: torch.Tensor | np.ndarray | Sequence[int]) -> dict[str, int]:
    """Counts of each `PairCase` in a batch's `pair_case` column, keyed by name (for logging)."""
    values = np.asarray(pair_case.cpu() if isinstance(pair_case, torch.Tensor) else pair_case, dtype=np.int64)
    counts = np.bincount(values, minlength=len(PairCase))
    return {PAIR_CASE_NAMES[i]: int(c) for i, c in enumerate(counts)}

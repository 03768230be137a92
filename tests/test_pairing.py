"""Partner sampling: correctness of every draw, fallbacks per policy, O(1) cost, determinism."""

import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from cdcl_hf.pairing import (
    CrossDomainPairDataset,
    CrossDomainPairIterableDataset,
    EpochIndexSampler,
    PairCase,
    PartnerIndex,
    SingleDomainLabelError,
    count_pair_cases,
)


def _table(seed=0, n=400, labels=30, domains=6):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "treatment": [f"cpd{i}" for i in rng.integers(0, labels, n)],
            "plate": [f"P{i}" for i in rng.integers(0, domains, n)],
        }
    )
    # Hard cases appended explicitly: a label on one plate only (3 images), a label with a single
    # image, and a plate holding a single image whose label exists on other plates.
    extra = pd.DataFrame(
        {
            "treatment": ["only_P0"] * 3 + ["singleton", "cpd0"],
            "plate": ["P0"] * 3 + ["P1", "lonely_plate"],
        }
    )
    return pd.concat([frame, extra], ignore_index=True)


def _candidates(frame, item, other_domain=True):
    """O(N) reference: what the research code computes by filtering the table."""
    label, domain = frame.treatment[item], frame.plate[item]
    same_label = frame.treatment == label
    mask = same_label & ((frame.plate != domain) if other_domain else (frame.plate == domain))
    mask[item] = False
    return set(np.flatnonzero(mask.to_numpy()))


def test_every_partner_has_same_label_and_other_domain_when_one_exists():
    frame = _table()
    index = PartnerIndex.from_table(frame, "treatment", "plate", policy="same_domain")
    rng = random.Random(0)
    for item in range(len(frame)):
        cross = _candidates(frame, item, other_domain=True)
        same = _candidates(frame, item, other_domain=False)
        drawn = {index.sample_partner(item, rng) for _ in range(30)}
        for partner, case in drawn:
            assert frame.treatment[partner] == frame.treatment[item]
            if cross:
                assert case is PairCase.CROSS_DOMAIN and partner in cross
            elif same:
                assert case is PairCase.SAME_DOMAIN and partner in same
            else:
                assert case is PairCase.SELF and partner == item


def test_draw_is_uniform_over_all_cross_domain_candidates():
    frame = pd.DataFrame(
        {"treatment": ["a"] * 7 + ["b"] * 2, "plate": ["P0", "P0", "P1", "P2", "P2", "P2", "P3", "P0", "P1"]}
    )
    index = PartnerIndex(frame.treatment, frame.plate)
    rng = np.random.default_rng(1)
    draws = Counter(index.sample_partner(0, rng)[0] for _ in range(5000))
    assert set(draws) == _candidates(frame, 0) == {2, 3, 4, 5, 6}
    assert all(abs(count / 5000 - 1 / 5) < 0.03 for count in draws.values())
    # The same with the vectorised draw.
    partners, cases = index.sample_partners(np.zeros(5000, dtype=np.int64), rng)
    assert (cases == PairCase.CROSS_DOMAIN).all()
    vector_counts = Counter(partners.tolist())
    assert set(vector_counts) == {2, 3, 4, 5, 6}
    assert all(abs(count / 5000 - 1 / 5) < 0.03 for count in vector_counts.values())


def test_vectorised_draw_follows_the_same_rules():
    frame = _table(seed=3)
    index = PartnerIndex(frame.treatment, frame.plate)
    items = np.arange(len(frame))
    partners, cases = index.sample_partners(items, np.random.default_rng(0))
    for item, partner, case in zip(items, partners, cases, strict=True):
        assert frame.treatment[partner] == frame.treatment[item]
        if case == PairCase.CROSS_DOMAIN:
            assert frame.plate[partner] != frame.plate[item]
        elif case == PairCase.SAME_DOMAIN:
            assert frame.plate[partner] == frame.plate[item] and partner != item
        else:
            assert case == PairCase.SELF and partner == item


def test_policies_and_counts():
    frame = _table()
    n = len(frame)
    same = PartnerIndex(frame.treatment, frame.plate, policy="same_domain")
    # only_P0 (3 images) falls back within its plate; the singleton label can only pair with itself.
    assert same.counts["items_same_domain_fallback"] == 3
    assert same.counts["items_self_fallback"] == 1
    assert same.counts["single_domain_labels"] == 2
    assert same.counts["single_image_labels"] == 1
    assert same.counts["single_image_domains"] == 1
    assert same.counts["items_cross_domain"] == n - 4
    # The lonely plate's image still gets a cross-domain partner (its label lives elsewhere).
    lonely = n - 1
    assert same.item_case[lonely] == PairCase.CROSS_DOMAIN

    self_policy = PartnerIndex(frame.treatment, frame.plate, policy="self")
    assert self_policy.counts["items_self_fallback"] == 4
    only_p0 = int(np.flatnonzero(frame.treatment == "only_P0")[0])
    assert self_policy.sample_partner(only_p0, random.Random(0)) == (only_p0, PairCase.SELF)

    drop = PartnerIndex(frame.treatment, frame.plate, policy="drop")
    assert drop.counts["items_dropped"] == 4 and len(drop.eligible) == n - 4
    assert only_p0 not in set(drop.eligible.tolist())
    with pytest.raises(IndexError, match="dropped"):
        drop.sample_partner(only_p0, random.Random(0))
    assert drop.state_summary()["policy"] == "drop"

    with pytest.raises(SingleDomainLabelError, match="2 of .* labels occur in one domain only"):
        PartnerIndex(frame.treatment, frame.plate, policy="error")


def test_single_domain_column_is_reported_clearly():
    labels, domains = ["a", "a", "b", "b"], ["P0"] * 4
    with pytest.raises(SingleDomainLabelError, match="single value, 'P0'"):
        PartnerIndex(labels, domains, policy="error")
    with pytest.raises(ValueError, match="removed every item"):
        PartnerIndex(labels, domains, policy="drop")
    index = PartnerIndex(labels, domains, policy="same_domain")
    assert index.counts["items_same_domain_fallback"] == 4 and index.counts["items_cross_domain"] == 0


def test_invalid_inputs():
    with pytest.raises(ValueError, match="missing label"):
        PartnerIndex(["a", None, "b"], ["P0", "P1", "P1"])
    with pytest.raises(ValueError, match="differ in length"):
        PartnerIndex(["a", "b"], ["P0"])
    with pytest.raises(ValueError):
        PartnerIndex(["a"], ["P0"], policy="sometimes")
    with pytest.raises(KeyError, match="not found"):
        PartnerIndex.from_table(pd.DataFrame({"treatment": ["a"], "plate": ["P"]}), "siRNA", "plate")


def test_from_hf_dataset_reads_columns_only():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"treatment": ["a", "a", "b", "b"], "batch": ["W1", "W2", "W1", "W2"]})
    index = PartnerIndex.from_table(ds, label_column="treatment", domain_column="batch")
    assert index.num_domains == 2 and list(index.domain_names) == ["W1", "W2"]
    assert index.sample_partner(0, random.Random(0))[0] == 1


class _CountingArray(np.ndarray):
    """ndarray that counts element reads and refuses whole-array arithmetic, to show that a draw
    touches a constant number of scalars and never scans the table."""

    reads = 0

    def __getitem__(self, key):
        result = super().__getitem__(key)
        size = np.size(result)
        _CountingArray.reads += size
        return result.view(np.ndarray) if isinstance(result, np.ndarray) else result

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        raise AssertionError(f"whole-array operation {ufunc.__name__} during a draw")


@pytest.mark.parametrize("policy", ["same_domain", "self"])
def test_draw_cost_is_constant_in_dataset_size(policy):
    reads_per_draw = {}
    for n in (200, 200_000):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, max(n // 20, 2), n)
        domains = rng.integers(0, 8, n)
        labels[:3], domains[:3] = -1, 0  # a single-domain label, to exercise the fallback path
        index = PartnerIndex(labels, domains, policy=policy)
        for name in (
            "order",
            "rank",
            "group_of_item",
            "group_start",
            "group_stop",
            "label_codes",
            "label_start",
            "label_stop",
            "item_case",
        ):
            setattr(index, name, getattr(index, name).view(_CountingArray))
        draw_rng = random.Random(0)
        worst = 0
        for item in list(range(3)) + rng.integers(0, n, 300).tolist():
            _CountingArray.reads = 0
            index.sample_partner(int(item), draw_rng)
            worst = max(worst, _CountingArray.reads)
        reads_per_draw[n] = worst
    assert reads_per_draw[200] == reads_per_draw[200_000] <= 12, reads_per_draw


def _toy_images(n, channels=2, size=8):
    return [torch.full((channels, size, size), float(i)) for i in range(n)]


def test_pair_dataset_is_deterministic_per_seed_epoch_index():
    frame = _table()
    index = PartnerIndex(frame.treatment, frame.plate)
    images = _toy_images(len(frame))
    ds = CrossDomainPairDataset(images, index, mode="cross_domain", seed=7)
    again = CrossDomainPairDataset(images, index, mode="cross_domain", seed=7)
    other_seed = CrossDomainPairDataset(images, index, mode="cross_domain", seed=8)
    item = int(np.flatnonzero(frame.treatment == "cpd1")[0])  # many candidates
    first = [ds.pair_for(item, epoch)[1] for epoch in range(20)]
    assert first == [again.pair_for(item, epoch)[1] for epoch in range(20)]
    assert len(set(first)) > 1  # partners change across epochs
    assert first != [other_seed.pair_for(item, epoch)[1] for epoch in range(20)]

    ds.set_epoch(3)
    sample = ds[item]
    assert sample["partner_index"] == ds[(3, item)]["partner_index"] == first[3]
    # Images are the items' own tensors (value = position) and domains are the index codes.
    assert torch.all(sample["image"] == item) and torch.all(
        sample["partner_image"] == sample["partner_index"]
    )
    assert sample["domain"] == index.domain_codes[item] != sample["partner_domain"]
    assert sample["pair_case"] == PairCase.CROSS_DOMAIN


def test_pair_dataset_with_transform_is_reproducible():
    frame = _table()
    index = PartnerIndex(frame.treatment, frame.plate)
    images = [torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(len(frame))]

    def transform(image, partner, generator):
        noise = torch.randn(image.shape, generator=generator)
        return {"views": torch.stack([image + noise, partner + noise])}

    ds = CrossDomainPairDataset(images, index, transform=transform, seed=1)
    a, b = ds[(2, 5)], ds[(2, 5)]
    assert torch.equal(a["views"], b["views"])
    assert not torch.equal(a["views"], ds[(3, 5)]["views"])


def test_pair_dataset_respects_drop_policy_and_same_image_mode():
    frame = _table()
    images = _toy_images(len(frame))
    drop = PartnerIndex(frame.treatment, frame.plate, policy="drop")
    ds = CrossDomainPairDataset(images, drop)
    assert len(ds) == len(frame) - 4
    cases = [ds[i]["pair_case"] for i in range(len(ds))]
    assert set(cases) == {PairCase.CROSS_DOMAIN}
    same_image = CrossDomainPairDataset(images, drop, mode="same_image")
    assert len(same_image) == len(frame)  # plain DINO uses every image, no partner needed
    sample = same_image[0]
    assert sample["partner_index"] == sample["index"] and sample["pair_case"] == PairCase.SAME_IMAGE
    with pytest.raises(ValueError, match="items but the index"):
        CrossDomainPairDataset(images[:-1], drop)


def test_dataloader_batches_and_case_counts():
    frame = _table()
    index = PartnerIndex(frame.treatment, frame.plate)
    ds = CrossDomainPairDataset(_toy_images(len(frame)), index, seed=0)
    sampler = EpochIndexSampler(len(ds), seed=0)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler)
    seen, totals = [], Counter()
    for batch in loader:
        seen += batch["index"].tolist()
        totals.update(count_pair_cases(batch["pair_case"]))
        assert batch["image"].shape[1:] == (2, 8, 8)
    assert sorted(seen) == list(range(len(frame)))  # a permutation of the epoch
    assert totals["cross_domain"] == index.counts["items_cross_domain"]
    assert totals["same_domain"] == 3 and totals["self"] == 1
    order_epoch1 = list(iter(sampler))
    sampler.set_epoch(2)
    assert order_epoch1 != list(iter(sampler))


def _rows(frame):
    return [
        {"image": torch.full((1, 4, 4), float(i)), "treatment": t, "plate": p, "row": i}
        for i, (t, p) in enumerate(zip(frame.treatment, frame.plate, strict=True))
    ]


def test_iterable_pairs_from_shuffle_buffer():
    frame = _table(n=300)
    rows = _rows(frame)
    stream = CrossDomainPairIterableDataset(rows, buffer_size=64, seed=0)
    out = list(stream)
    assert len(out) == len(rows)
    assert sorted(int(o["image"][0, 0, 0]) for o in out) == list(range(len(rows)))  # each row once
    domain_ids = stream.domain_to_id
    for o in out:
        item, partner = int(o["image"][0, 0, 0]), int(o["partner_image"][0, 0, 0])
        assert frame.treatment[partner] == frame.treatment[item]
        assert o["domain"] == domain_ids[frame.plate[item]]
        if o["pair_case"] == PairCase.CROSS_DOMAIN:
            assert frame.plate[partner] != frame.plate[item]
    counts = stream.counts
    assert counts["cross_domain"] > 0.8 * len(rows)
    assert sum(counts.values()) == len(rows)
    # Deterministic given the seed and epoch; a new epoch reshuffles.
    again = [int(o["image"][0, 0, 0]) for o in CrossDomainPairIterableDataset(rows, buffer_size=64, seed=0)]
    assert again == [int(o["image"][0, 0, 0]) for o in out]
    stream.set_epoch(1)
    assert [int(o["image"][0, 0, 0]) for o in stream] != again


def test_iterable_policies():
    rows = _rows(
        pd.DataFrame({"treatment": ["a", "a", "b", "c", "c"], "plate": ["P0", "P1", "P0", "P0", "P0"]})
    )
    with pytest.raises(ValueError, match="not supported when streaming"):
        CrossDomainPairIterableDataset(rows, policy="error")
    dropped = CrossDomainPairIterableDataset(rows, buffer_size=8, policy="drop")
    assert sorted(int(o["image"][0, 0, 0]) for o in dropped) == [0, 1]
    assert dropped.counts["dropped"] == 3
    fallback = CrossDomainPairIterableDataset(rows, buffer_size=8, policy="same_domain")
    cases = {int(o["image"][0, 0, 0]): o["pair_case"] for o in fallback}
    assert cases[2] == PairCase.SELF  # 'b' has one image
    # 'c' has two images on one plate: each pairs with the other, which stays in the partner pool
    # after it is emitted (so the end of the stream is not starved of partners).
    assert [cases[3], cases[4]] == [PairCase.SAME_DOMAIN] * 2
    fixed = CrossDomainPairIterableDataset(rows, domain_to_id={"P0": 0})
    with pytest.raises(KeyError, match="P1"):
        list(fixed)


def test_end_to_end_on_a_screen_dataset():
    """PartnerIndex + pair dataset + loader + multi-crop on the real screen schema (PNG channels)."""
    screen_data = pytest.importorskip("cdcl_hf.screen_data")
    from cdcl_hf.multicrop import MultiCropAugmentation
    from cdcl_hf.normalization import PlateNormalization

    rng = np.random.default_rng(0)
    metadata = pd.DataFrame(
        {
            "plate": ["P1", "P1", "P2", "P2", "P3", "P3"],
            "well": ["B02", "B03", "B02", "B03", "B02", "B03"],
            "site": ["1"] * 6,
            "batch": ["W1", "W1", "W1", "W1", "W2", "W2"],
            "compound": ["DMSO", "taxol", "DMSO", "taxol", "DMSO", "taxol"],
            "concentration": [0.0, 1.0, 0.0, 1.0, 0.0, 1.0],
            "is_control": [True, False, True, False, True, False],
        }
    )
    images = rng.integers(0, 4000, (6, 3, 24, 24)).astype(np.uint16)
    ds = screen_data.dataset_from_arrays(images, metadata)
    index = PartnerIndex.from_table(ds, label_column="treatment", domain_column="batch", policy="error")
    stats = {
        p: (images[metadata.plate == p].mean((0, 2, 3)), images[metadata.plate == p].std((0, 2, 3)))
        for p in ("P1", "P2", "P3")
    }
    pairs = CrossDomainPairDataset(
        ds,
        index,
        MultiCropAugmentation(global_size=16, local_size=8, num_local_crops=2),
        image_loader=PlateNormalization("plate_all", stats).load_normalized,
    )
    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=6)))
    assert batch["global_crops"].shape == (6, 2, 3, 16, 16) and batch["local_crops"].shape == (6, 2, 3, 8, 8)
    assert batch["global_crops"].abs().mean() < 3  # normalised intensities, not raw uint16 counts
    treatments = ds["treatment"]
    for i, p in zip(batch["index"].tolist(), batch["partner_index"].tolist(), strict=True):
        assert treatments[i] == treatments[p] and metadata.batch[i] != metadata.batch[p]

"""Metrics: the BBBC021 anchor, and each metric on a hand-built case whose answer is worked out below."""

import numpy as np
import pandas as pd
import pytest

from cdcl_hf import metrics
from cdcl_hf.metrics import (
    HIGHER_IS_BETTER,
    MetricResult,
    _perplexity_weights,
    batch_classification_accuracy,
    evaluate_profiles,
    ilisi,
    kbet_acceptance_rate,
    kbet_within_label,
    knn_identification,
    moa_retrieval_map,
    nsc_nscb_accuracy,
    reference_note,
    replicate_retrieval_map,
    results_markdown_table,
    silhouette,
    silhouette_batch_scib,
)
from cdcl_hf.profiling import aggregate_profiles


def unit_vectors(degrees):
    """2-D unit vectors at the given angles: cosine similarity ranks by angular distance."""
    radians = np.deg2rad(np.asarray(degrees, dtype=float))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


# ---------------------------------------------------------------------------------------------
# Correctness anchor: BBBC021 CellProfiler profiles
# ---------------------------------------------------------------------------------------------


def test_bbbc021_anchor_nsc_nscb(shared_data_dir):
    wells = pd.read_csv(shared_data_dir / "bbbc021_profiles" / "BBBC021_feature_selected_mad_robustize.csv")
    wells = wells[wells["Metadata_Compound"] != "DMSO"].copy()
    wells["Metadata_Batch"] = wells["Metadata_Plate"].str.split("_").str[0]  # "Week4_27861" -> "Week4"
    treatments = aggregate_profiles(
        wells, by=["Metadata_Compound", "Metadata_Concentration"], method="median", collect=["Metadata_Batch"]
    )
    assert len(treatments) == 103
    features = treatments.filter(regex="^(?!Metadata_)").to_numpy()
    results = nsc_nscb_accuracy(
        features, treatments, moa_column="Metadata_moa", compound_column="Metadata_Compound",
        batch_column="Metadata_Batch",
    )
    nsc, nscb = results["nsc"], results["nscb"]
    assert (nsc.n, nscb.n) == (103, 92)
    assert (nsc.details["n_correct"], nscb.details["n_correct"]) == (94, 68)
    assert round(nsc.value, 3) == 0.913
    assert round(nscb.value, 3) == 0.739


# ---------------------------------------------------------------------------------------------
# NSC / NSCB
# ---------------------------------------------------------------------------------------------


def six_treatments(batches=("W1", "W2", "W1", "W2", "W1", "W2")):
    # t0 and t1 are two doses of compound cA. Angles chosen so that the 1-NN answers are:
    # NSC:  t0->t2 ok, t1->t2 ok, t2->t3 wrong, t3->t2 wrong, t4->t5 ok, t5->t4 ok  = 4/6
    # NSCB: t0 skipped (X has no other-batch, other-compound candidate), t1->t2 ok, t2->t3 wrong,
    #       t3->t2 wrong, t4->t5 ok, t5->t4 ok                                        = 3/5
    metadata = pd.DataFrame(
        {
            "Metadata_Compound": ["cA", "cA", "cB", "cC", "cD", "cE"],
            "Metadata_moa": ["X", "X", "X", "Y", "Y", "Y"],
            "Metadata_Batch": list(batches),
        }
    )
    return unit_vectors([0, 5, 30, 50, 90, 80]), metadata


def test_nsc_nscb_hand_built():
    embeddings, metadata = six_treatments()
    results = nsc_nscb_accuracy(embeddings, metadata)
    assert results["nsc"].defined and results["nsc"].n == 6
    assert results["nsc"].value == pytest.approx(4 / 6)
    assert results["nscb"].n == 5
    assert results["nscb"].value == pytest.approx(3 / 5)
    assert results["nscb"].details["n_skipped_no_candidate_of_same_moa"] == 1


def test_nscb_excludes_every_batch_of_a_multi_batch_treatment():
    # t1 was imaged in both batches: it has no candidate left (skipped) and is nobody's candidate,
    # so t2 (W1, X) loses its only X candidate and is skipped too (t0 already was).
    # t3 -> t2 wrong; t4 -> t5 and t5 -> t4 right: 2/3.
    embeddings, metadata = six_treatments(batches=["W1", ("W1", "W2"), "W1", "W2", "W1", "W2"])
    nscb = nsc_nscb_accuracy(embeddings, metadata)["nscb"]
    assert (nscb.n, nscb.value) == (3, pytest.approx(2 / 3))
    assert nscb.details["n_skipped_no_candidate_of_same_moa"] == 3


def test_nscb_single_batch_is_undefined_not_zero():
    embeddings, metadata = six_treatments(batches=["W1"] * 6)
    results = nsc_nscb_accuracy(embeddings, metadata)
    assert results["nsc"].defined
    nscb = results["nscb"]
    assert not nscb.defined and nscb.value is None and "single batch" in nscb.reason


def test_nsc_rejects_bad_input():
    embeddings, metadata = six_treatments()
    with_nan = embeddings.copy()
    with_nan[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nsc_nscb_accuracy(with_nan, metadata)
    with pytest.raises(ValueError, match="missing column"):
        nsc_nscb_accuracy(embeddings, metadata.drop(columns="Metadata_Batch"))
    with pytest.raises(ValueError, match="rows"):
        nsc_nscb_accuracy(embeddings[:5], metadata)
    no_moa = metadata.assign(Metadata_moa=["X", None, "X", "Y", "Y", "Y"])
    with pytest.raises(ValueError, match="no MoA"):
        nsc_nscb_accuracy(embeddings, no_moa)
    dropped = nsc_nscb_accuracy(embeddings, no_moa, missing_moa="drop")["nsc"]
    assert dropped.n == 5 and dropped.details["n_dropped_without_moa"] == 1


# ---------------------------------------------------------------------------------------------
# kNN identification
# ---------------------------------------------------------------------------------------------


def test_knn_leave_one_domain_out_perfect():
    embeddings = unit_vectors([0, 90, 10, 80])
    result = knn_identification(embeddings, ["a", "b", "a", "b"], ["D1", "D1", "D2", "D2"], k=1)
    assert (result.value, result.n) == (1.0, 4)


def test_knn_temperature_weighted_vote():
    # Query at 10 deg; reference: one "a" at 0 deg (cos 10 = 0.985), two "b" at 30 and 35 deg
    # (cos 20 = 0.940, cos 25 = 0.906). T=0.1: exp(9.85) < exp(9.40) + exp(9.06) -> "b".
    # T=0.01: exp(98.5) dominates -> "a". The query's true label is "a".
    embeddings = unit_vectors([0, 30, 35, 10])
    labels, domains = ["a", "b", "b", "a"], ["R", "R", "R", "Q"]
    warm = knn_identification(embeddings, labels, domains, test_domains=["Q"], k=3, temperature=0.1)
    cold = knn_identification(embeddings, labels, domains, test_domains=["Q"], k=3, temperature=0.01)
    assert (warm.value, warm.n) == (0.0, 1)
    assert (cold.value, cold.n) == (1.0, 1)


def test_knn_single_domain_undefined():
    result = knn_identification(unit_vectors([0, 10]), ["a", "b"], ["D", "D"])
    assert not result.defined and result.value is None


# ---------------------------------------------------------------------------------------------
# Mean average precision
# ---------------------------------------------------------------------------------------------


def test_replicate_map_against_other_treatments():
    # a1 0, a2 10, b1 4, b2 90 deg. Rankings (pos = same treatment):
    # a1: b1, a2*        AP 1/2    a2: b1, a1*        AP 1/2
    # b1: a1, a2, b2*    AP 1/3    b2: a2, b1*, a1    AP 1/2
    # mAP(A) = 1/2, mAP(B) = 5/12 -> mean 11/24.
    metadata = pd.DataFrame({"Metadata_Treatment": ["A", "A", "B", "B"], "Metadata_is_control": [False] * 4})
    result = replicate_retrieval_map(unit_vectors([0, 10, 4, 90]), metadata, negatives="others", null_size=200)
    assert result.n == 2
    assert result.details["per_group"] == {"A": pytest.approx(0.5), "B": pytest.approx(5 / 12)}
    assert result.value == pytest.approx(11 / 24)


def test_replicate_map_against_controls():
    # Same treated profiles plus DMSO at 45 and 60 deg, negatives = controls only:
    # a1, a2 rank their replicate first (AP 1). b1 (4 deg) sees c1 (41 away) and c2 (56) before
    # b2 (86): AP 1/3; b2 (90) sees c2 (30) and c1 (45) before b1 (86): AP 1/3. mAP A 1, B 1/3.
    metadata = pd.DataFrame(
        {
            "Metadata_Treatment": ["A", "A", "B", "B", "DMSO", "DMSO"],
            "Metadata_is_control": [False, False, False, False, True, True],
        }
    )
    result = replicate_retrieval_map(unit_vectors([0, 10, 4, 90, 45, 60]), metadata, null_size=200)
    assert result.n == 2
    assert result.value == pytest.approx((1.0 + 1 / 3) / 2)


def test_moa_map_excludes_same_compound_positives():
    # X: cA@0, cA@5 (second dose), cB@10; Y: cC@8, cD@90. Positives: same MoA, other compound.
    # cA0: cC, cB* -> 1/2; cA5: cC, cB* -> 1/2; cB: cC, cA5*, cA0* -> (1/2 + 2/3)/2 = 7/12
    # cC: cB, cA5, cA0, cD* -> 1/4; cD: cB, cC*, ... -> 1/2
    # mAP(X) = 19/36, mAP(Y) = 3/8 -> mean 65/144.
    metadata = pd.DataFrame(
        {"Metadata_Compound": ["cA", "cA", "cB", "cC", "cD"], "Metadata_moa": ["X", "X", "X", "Y", "Y"]}
    )
    result = moa_retrieval_map(unit_vectors([0, 5, 10, 8, 90]), metadata, null_size=200)
    assert result.n == 2
    assert result.value == pytest.approx(65 / 144)


def test_map_without_controls_is_undefined():
    metadata = pd.DataFrame({"Metadata_Treatment": ["A", "A"], "Metadata_is_control": [False, False]})
    result = replicate_retrieval_map(unit_vectors([0, 10]), metadata)
    assert not result.defined and "control" in result.reason


# ---------------------------------------------------------------------------------------------
# Batch-effect measures
# ---------------------------------------------------------------------------------------------


def test_batch_classification_separable_and_single_batch():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(40, 5))
    embeddings[20:, 0] += 20.0  # batch B shifted far along one axis: perfectly predictable
    batches = ["A"] * 20 + ["B"] * 20
    result = batch_classification_accuracy(embeddings, batches)
    assert (result.value, result.n) == (1.0, 40)
    assert result.details["chance"] == 0.5
    single = batch_classification_accuracy(embeddings, ["A"] * 40)
    assert not single.defined and single.value is None


def test_silhouette_two_tight_clusters():
    # Clusters {0, 10} and {90, 100} deg; cosine distance d(t) = 1 - cos t. Every point has
    # a = d(10) and b = mean(d(90), d(100)) (or d(80), d(90)), so s = 1 - a / b per point.
    embeddings = unit_vectors([0, 10, 90, 100])
    d = lambda degrees: 1 - np.cos(np.deg2rad(degrees))  # noqa: E731
    expected = np.mean([1 - d(10) / ((d(90) + d(100)) / 2), 1 - d(10) / ((d(80) + d(90)) / 2)])
    result = silhouette(embeddings, ["x", "x", "y", "y"])
    assert result.value == pytest.approx(expected)
    assert not silhouette(embeddings, ["x"] * 4).defined


def test_kbet_separated_vs_interleaved():
    positions = np.arange(40, dtype=float)
    # Points on a circle arc so that cosine neighbours are positional neighbours.
    embeddings = unit_vectors(positions * 2)
    separated = kbet_acceptance_rate(embeddings, ["A"] * 20 + ["B"] * 20, k=6)
    interleaved = kbet_acceptance_rate(embeddings, ["A", "B"] * 20, k=6)
    # A 6-neighbourhood (self included) is the point and the 5 nearest along the arc. Only points
    # 18-21 see the other batch (5:1 -> chi2 = 2.67, p = 0.10, or 4:2 -> p = 0.41): 4 of 40 accepted.
    # 6:0 gives chi2 = 6, p = 0.014: rejected.
    assert separated.value == pytest.approx(4 / 40)
    assert interleaved.value == 1.0  # every neighbourhood holds 3 A + 3 B (or 4/2 at the ends)
    assert not kbet_acceptance_rate(embeddings, ["A"] * 40).defined


# ---------------------------------------------------------------------------------------------
# Batch measures that mean batch: scIB silhouette, kBET within label, iLISI, controls only
# ---------------------------------------------------------------------------------------------


def twin_batches(n=10, degrees_apart=9.0):
    """Batches A and B at the very same n points on an arc: batch carries no information at all."""
    points = unit_vectors(np.arange(n) * degrees_apart)
    return np.vstack([points, points]), np.array(["A"] * n + ["B"] * n)


def test_silhouette_batch_scib_mixed_separated_and_confounded():
    mixed, batches = twin_batches(10)
    # Each point's twin (distance 0) is in the other batch: a = S / (n - 1), b = S / n over the same distances S, so
    # s = -1/n exactly and the score is 1 - 1/n.
    result = silhouette_batch_scib(mixed, batches, ["X"] * 20)
    assert result.value == pytest.approx(1 - 1 / 10) and result.n == 1
    assert result.details["no_batch_value"] == 1.0
    separated = unit_vectors(np.r_[np.arange(10) * 0.5, 90 + np.arange(10) * 0.5])
    assert silhouette_batch_scib(separated, batches, ["X"] * 20).value < 0.05
    # A label seen in one batch only (confounded with batch) is skipped, as scIB does, not scored as separation.
    with_confounded = silhouette_batch_scib(
        np.vstack([mixed, unit_vectors([200, 201, 202])]), np.r_[batches, ["A"] * 3], ["X"] * 20 + ["Y"] * 3)
    assert with_confounded.value == pytest.approx(1 - 1 / 10)
    assert (with_confounded.n, with_confounded.details["n_labels_skipped"]) == (1, 1)
    assert not silhouette_batch_scib(mixed, ["A"] * 20, ["X"] * 20).defined


def test_kbet_within_label_keeps_biology_out_of_batch():
    # Three labels on three arcs: X holds A and B interleaved (mixed); Y is all A, Z all B (confounded with batch).
    # Over all profiles the pure Y and Z neighbourhoods (10:0 against the global 1:1) are rejected; within X the
    # batches mix, and Y and Z, one batch each, are skipped.
    x = unit_vectors(np.arange(20) * 2.0)
    embeddings = np.vstack([x, unit_vectors(120 + np.arange(20) * 2.0), unit_vectors(240 + np.arange(20) * 2.0)])
    batches = np.array(["A", "B"] * 10 + ["A"] * 20 + ["B"] * 20)
    labels = np.array(["X"] * 20 + ["Y"] * 20 + ["Z"] * 20)
    overall = kbet_acceptance_rate(embeddings, batches, k=10)
    within = kbet_within_label(embeddings, batches, labels)
    assert overall.value <= 0.5
    assert within.value == 1.0 and within.n == 1
    assert within.details["n_labels_skipped_one_batch"] == 2 and within.details["n_profiles_scored"] == 20
    # Separated within the label: rejected everywhere but at the boundary.
    # k = 10 of 20: only the profiles near the boundary see both batches.
    separated = kbet_within_label(x, ["A"] * 10 + ["B"] * 10, ["X"] * 20)
    assert separated.value <= 0.3
    too_small = kbet_within_label(x[:6], ["A", "B"] * 3, ["X"] * 6)
    assert not too_small.defined and "1 too small" in too_small.reason


def test_ilisi_mixed_separated_and_no_batch_value():
    # Both batches drawn from one distribution: every neighbourhood holds about as many of each.
    mixed = np.random.default_rng(0).normal(size=(200, 5))
    result = ilisi(mixed, np.array(["A", "B"] * 100))  # perplexity 30, 90 neighbours
    assert result.details["n_neighbours"] == 90 and result.details["no_batch_value"] == 1.0
    assert 1.9 < result.details["ilisi_median"] <= 2.0 and result.value > 0.9
    batches = np.array(["A"] * 40 + ["B"] * 40)
    # Two clusters of 40, each one batch, 15 neighbours: every neighbourhood is pure, LISI 1, scaled 0.
    separated = unit_vectors(np.r_[np.arange(40) * 0.5, 120 + np.arange(40) * 0.5])
    apart = ilisi(separated, batches, perplexity=5)
    assert apart.details["n_neighbours"] == 15
    assert apart.details["ilisi_median"] == pytest.approx(1.0) and apart.value == pytest.approx(0.0)
    # Unequal batches (10, 10, 20): perfect mixing gives 1 / (0.25^2 + 0.25^2 + 0.5^2) = 8/3, scaled (8/3 - 1) / 2.
    uneven = ilisi(unit_vectors(np.arange(40)), ["A"] * 10 + ["B"] * 10 + ["C"] * 20, perplexity=5)
    assert uneven.details["no_batch_value"] == pytest.approx((8 / 3 - 1) / 2)
    assert not ilisi(mixed, ["A"] * 200).defined


def test_perplexity_weights_reach_the_target_perplexity():
    distances = np.sort(np.random.default_rng(0).uniform(0, 2, size=(5, 30)), axis=1)
    weights = _perplexity_weights(distances, perplexity=7.0)
    entropy = -(weights * np.log(weights)).sum(axis=1)
    np.testing.assert_allclose(np.exp(entropy), 7.0, rtol=1e-6)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


def test_knn_identification_flags_labels_missing_from_the_reference():
    # Every treatment sits in one batch: held out, its label is never in the reference set.
    embeddings = unit_vectors(np.arange(12) * 30.0)
    result = knn_identification(embeddings, [f"t{i // 2}" for i in range(12)], ["W1", "W1", "W2", "W2"] * 3, k=1)
    assert result.defined and not result.informative
    assert result.details["n_queries_label_absent_from_reference"] == 12 and "lacks the label of 12 of 12" in result.reason
    assert "not informative" in results_markdown_table({"knn_treatment_identification": result})


def synthetic_screen(batch_shift: float, seed: int = 0, n_features: int = 8) -> pd.DataFrame:
    """Three batches, 12 DMSO wells in each; six treatments, each in ONE batch (as compounds in BBBC021 weeks).

    Treatments differ strongly by MoA and somewhat by compound; `batch_shift` moves every profile of a batch
    (controls included).
    """
    rng = np.random.default_rng(seed)
    batch_offsets = {b: batch_shift * rng.normal(size=n_features) for b in ("W1", "W2", "W3")}
    moa_centres = {"X": 6 * rng.normal(size=n_features), "Y": 6 * rng.normal(size=n_features)}
    rows = []
    for batch_index, batch in enumerate(batch_offsets):
        for _well in range(12):
            rows.append(("DMSO", "DMSO", None, batch, True, rng.normal(size=n_features) + batch_offsets[batch]))
        for moa, compound in (("X", f"cX{batch_index}"), ("Y", f"cY{batch_index}")):
            compound_centre = moa_centres[moa] + 3 * rng.normal(size=n_features)
            for _well in range(6):
                rows.append((compound, compound, moa, batch, False,
                             compound_centre + rng.normal(size=n_features) + batch_offsets[batch]))
    table = pd.DataFrame(np.stack([r[5] for r in rows]), columns=[f"f{i}" for i in range(n_features)])
    meta = pd.DataFrame({
        "Metadata_Treatment": [r[0] for r in rows], "Metadata_Compound": [r[1] for r in rows],
        "Metadata_moa": [r[2] for r in rows], "Metadata_Batch": [r[3] for r in rows],
        "Metadata_Plate": [f"{r[3]}_P{i % 2}" for i, r in enumerate(rows)], "Metadata_is_control": [r[4] for r in rows],
    })
    return pd.concat([meta, table], axis=1)


def test_controls_metrics_see_batch_where_all_profile_metrics_see_biology():
    clean = evaluate_profiles(synthetic_screen(batch_shift=0.0), null_size=100)
    shifted = evaluate_profiles(synthetic_screen(batch_shift=3.0), null_size=100)
    # No batch effect: on controls the batch is not predictable and the batches mix...
    assert clean["batch_classification_controls"].value <= clean["batch_classification_controls"].details["chance"] + 0.15
    assert clean["kbet_controls"].value >= 0.8 and clean["ilisi_controls"].value >= 0.6
    assert clean["silhouette_batch_controls"].value >= 0.85
    # ... while on all profiles the compounds, each confined to one batch, make batch look predictable.
    assert clean["batch_classification_all_profiles"].value >= clean["batch_classification_controls"].value + 0.1
    # A real batch effect shows on the controls.
    assert shifted["batch_classification_controls"].value >= 0.9
    assert shifted["kbet_controls"].value <= 0.3 and shifted["ilisi_controls"].value <= 0.3
    assert shifted["silhouette_batch_controls"].value < clean["silhouette_batch_controls"].value
    # Within MoA (scIB's silhouette), compounds of one MoA in different batches mix less once batches are shifted.
    assert clean["silhouette_batch_scib"].value > shifted["silhouette_batch_scib"].value + 0.2
    assert clean["kbet_within_moa"].n == 2 and clean["kbet_within_moa"].informative  # both MoAs span 3 batches
    # Each treatment sits in one batch: kBET within treatment has nothing to score.
    assert not clean["kbet_within_treatment"].defined
    assert clean["silhouette_batch_scib"].details["label"] == "MoA"
    for name, result in clean.items():
        assert name in HIGHER_IS_BETTER, name
        assert "informative" in result.to_dict()


def test_controls_batch_scores_come_with_their_permutation_null(monkeypatch):
    """Each controls-only batch score is given beside its value under shuffled batch labels: no batch effect scores
    inside that null, a real one far outside, and on few controls per batch the null sits far from the analytic
    no-batch value (which is why it is reported)."""
    clean = evaluate_profiles(synthetic_screen(batch_shift=0.0), null_size=100)
    shifted = evaluate_profiles(synthetic_screen(batch_shift=3.0), null_size=100)
    names = ("batch_classification_controls", "plate_classification_controls", "silhouette_batch_controls",
             "kbet_controls", "ilisi_controls")
    for name in names:
        null = clean[name].details["permutation_null"]
        assert null["n_permutations"] == metrics.PERMUTATION_NULL_SIZE == len(null["values"]) and null["sd"] > 0, name
        assert abs(clean[name].details["z_vs_null"]) < 3, (name, clean[name].details["z_vs_null"])
        assert clean[name].details["p_vs_null"] > 0.05, (name, clean[name].details["p_vs_null"])
        assert "shuffled batches" in reference_note(clean[name].details)
        assert "p " in reference_note(clean[name].details)
    assert shifted["batch_classification_controls"].details["z_vs_null"] > 5
    assert shifted["kbet_controls"].details["z_vs_null"] < -5 and shifted["ilisi_controls"].details["z_vs_null"] < -5
    # A real batch effect is more batch-like than every shuffle: the p-value's floor.
    floor = 1 / (1 + metrics.PERMUTATION_NULL_SIZE)
    for name in ("batch_classification_controls", "kbet_controls", "ilisi_controls"):
        assert shifted[name].details["p_vs_null"] == pytest.approx(floor), name
    # The same call twice gives the same null (seeded shuffles).
    again = evaluate_profiles(synthetic_screen(batch_shift=0.0), null_size=100)
    assert again["ilisi_controls"].details["permutation_null"] == clean["ilisi_controls"].details["permutation_null"]

    # 5 controls in each of 10 batches of pure noise: shuffled labels stay well below iLISI's analytic no-batch value.
    rng = np.random.default_rng(0)
    noise, batches = rng.normal(size=(50, 16)), np.repeat([f"B{i}" for i in range(10)], 5)
    result = metrics._controls_batch_metrics(noise, batches, None, np.ones(50, bool), seed=0)["ilisi_controls"]
    assert result.details["permutation_null"]["mean"] < result.details["no_batch_value"] - 0.1

    # Above the size cap the null is left out (the analytic value is close there, and the shuffles cost time).
    monkeypatch.setattr(metrics, "MAX_PERMUTATION_NULL_PROFILES", 10)
    capped = evaluate_profiles(synthetic_screen(batch_shift=0.0), null_size=100)
    assert all("permutation_null" not in capped[name].details for name in names)


def test_permutation_p_value_counts_ties_and_follows_the_batch_direction():
    null = {"values": [1.0, 1.0, 0.98, 0.96, 1.0]}
    # kBET (higher = better mixed): 0.96 is matched by one shuffle, 0.9 by none.
    assert metrics.permutation_p_value(0.96, null, batch_when_higher=False) == pytest.approx(2 / 6)
    assert metrics.permutation_p_value(0.9, null, batch_when_higher=False) == pytest.approx(1 / 6)
    assert metrics.permutation_p_value(1.0, null, batch_when_higher=False) == pytest.approx(1.0)
    # Classification accuracy (higher = more batch): the direction flips.
    assert metrics.permutation_p_value(0.99, null, batch_when_higher=True) == pytest.approx(4 / 6)


def test_too_few_or_whitened_controls_are_flagged_not_informative():
    screen = synthetic_screen(batch_shift=0.0)
    # Keep 2 controls per batch: computed, but flagged.
    keep = ~screen["Metadata_is_control"] | (screen.groupby("Metadata_Batch").cumcount() < 2)
    few = evaluate_profiles(screen[keep].reset_index(drop=True), null_size=100)
    result = few["kbet_controls"]
    assert result.defined and not result.informative and "only 6 control profiles in 3 batches" in result.reason
    # Controls whitened onto a simplex (what TVN fitted on them does): equidistant, whatever their batch.
    from cdcl_hf.profiling import correct_profiles

    # 40 features for 36 controls: TVN keeps 35 components, as many as 36 centred points span.
    whitened = evaluate_profiles(correct_profiles(synthetic_screen(0.0, n_features=40), "tvn"), null_size=100)
    assert not whitened["silhouette_batch_controls"].informative
    assert "equidistant" in whitened["silhouette_batch_controls"].reason
    assert whitened["kbet_within_moa"].informative  # treated profiles are not on the simplex


def test_undefined_results_are_not_informative_and_serialise_the_flag():
    result = MetricResult.undefined("x", "no batch")
    assert result.to_dict()["informative"] is False
    assert MetricResult("y", 0.5, 3, True).to_dict()["informative"] is True


# ---------------------------------------------------------------------------------------------
# Large screens: the capped / chunked paths (issue 10, item 4)
# ---------------------------------------------------------------------------------------------


def mid_size_screen(n=3000, n_features=16, seed=0):
    """n profiles: 20 % controls, ~10 replicates per treatment, 6 MoAs, 5 batches; signal weak enough that no score is
    at its floor or ceiling (so a sampled estimate has room to be wrong)."""
    rng = np.random.default_rng(seed)
    n_treatments = n // 10
    moa_of = rng.integers(0, 6, n_treatments)
    treatment = rng.integers(0, n_treatments, n)
    control = rng.random(n) < 0.2
    batch = rng.integers(0, 5, n)
    x = rng.normal(size=(n, n_features)) + 0.4 * rng.normal(size=(5, n_features))[batch]
    x[~control] += 0.5 * rng.normal(size=(6, n_features))[moa_of[treatment[~control]]]
    x[~control] += 0.5 * rng.normal(size=(n_treatments, n_features))[treatment[~control]]
    meta = pd.DataFrame({
        "Metadata_Treatment": np.where(control, "DMSO", np.char.add("T", treatment.astype(str))),
        "Metadata_Compound": np.where(control, "DMSO", np.char.add("C", (treatment // 2).astype(str))),
        "Metadata_moa": np.where(control, "control", np.char.add("M", moa_of[treatment].astype(str))),
        "Metadata_Batch": np.char.add("B", batch.astype(str)),
        "Metadata_is_control": control,
    })
    return x, meta


@pytest.fixture
def capped(monkeypatch):
    """Caps far below the 3,000-profile screen: every sampled / chunked path runs."""
    import cdcl_hf.metrics as metrics

    def apply():
        monkeypatch.setattr(metrics, "MAX_SCORED_PROFILES", 1000)
        monkeypatch.setattr(metrics, "MAX_CLASSIFIED_PROFILES", 1000)
        monkeypatch.setattr(metrics, "MAX_COPAIRS_PAIRS", 0)

    return apply


def test_sampled_scores_are_close_to_the_full_computation(capped):
    # 1,000 of 3,000 profiles: a share's standard error is at most 0.5 / sqrt(1000) x sqrt(1 - 1/3) = 0.013, so the
    # share-type scores (kBET acceptance, kNN accuracy) and the iLISI median get 0.04 (3 standard errors); a
    # silhouette varies less from profile to profile (per-profile sd ~0.1 here: standard error ~0.003), 0.01. The
    # classifier trains on a third of the data, which costs it some accuracy: 0.05. Observed on this screen:
    # |difference| <= 0.005 everywhere but the classifier (0.028).
    x, meta = mid_size_screen()
    batches, moas = meta["Metadata_Batch"].to_numpy(), meta["Metadata_moa"].to_numpy()
    treated = ~meta["Metadata_is_control"].to_numpy()

    def scores():
        return {
            "silhouette_batch": silhouette(x, batches),
            "silhouette_moa": silhouette(x[treated], moas[treated]),
            "silhouette_batch_scib": silhouette_batch_scib(x, batches, np.where(treated, "treated", "control")),
            "kbet": kbet_acceptance_rate(x, batches),
            "ilisi": ilisi(x, batches),
            "knn": knn_identification(x[treated], meta["Metadata_Treatment"].to_numpy()[treated], batches[treated]),
            "batch_classification": batch_classification_accuracy(x, batches),
        }

    full = scores()
    capped()
    sampled, again = scores(), scores()
    tolerance = {"silhouette_batch": 0.01, "silhouette_moa": 0.01, "silhouette_batch_scib": 0.01, "kbet": 0.04,
                 "ilisi": 0.04, "knn": 0.04, "batch_classification": 0.05}
    for name, result in sampled.items():
        assert result.value == again[name].value, f"{name}: the sample is not deterministic"
        assert abs(result.value - full[name].value) <= tolerance[name], (name, result.value, full[name].value)
        assert "n_scored" not in full[name].details and "labels_subsampled" not in full[name].details
    for name in ("silhouette_batch", "silhouette_moa", "kbet", "ilisi", "knn", "batch_classification"):
        details = sampled[name].details
        assert details["n_scored"] <= 1000 + 10 and details["subsampled_from"] > details["n_scored"], name
    # ~2,400 treated profiles are sampled, ~600 controls are not.
    assert set(sampled["silhouette_batch_scib"].details["labels_subsampled"]) == {"treated"}
    # kBET / kNN do not flatter themselves on a separated screen either.
    assert full["kbet"].value < 0.9 and full["knn"].value < 0.9


def test_chunked_average_precision_equals_copairs(capped):
    # mAP's chunked implementation is copairs' definition: every query's AP, the mAP and the null's p-values agree.
    x, meta = mid_size_screen(n=1500)
    per_treatment = aggregate_profiles(
        pd.concat([meta, pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])], axis=1)[~meta.Metadata_is_control],
        by=["Metadata_Treatment"], method="median")
    treatment_x = per_treatment.filter(regex="^f").to_numpy()
    runs = {
        "replicate_controls": lambda: replicate_retrieval_map(x, meta, null_size=200),
        "replicate_others": lambda: replicate_retrieval_map(x, meta, negatives="others", null_size=200),
        "moa": lambda: moa_retrieval_map(treatment_x, per_treatment, null_size=200),
    }
    full = {name: run() for name, run in runs.items()}
    capped()
    chunked = {name: run() for name, run in runs.items()}
    for name in runs:
        a, b = full[name], chunked[name]
        assert a.details["average_precision_by"] == "copairs"
        assert b.details["average_precision_by"].startswith("chunked"), name
        assert 0.05 < a.value < 0.95, (name, a.value)  # not a trivial ranking
        assert b.value == pytest.approx(a.value, abs=1e-9), name
        assert b.details["fraction_retrieved"] == a.details["fraction_retrieved"], name
        assert b.details["chance"] == pytest.approx(a.details["chance"], abs=1e-12)
        assert b.details["n_query_profiles"] == a.details["n_query_profiles"] and b.n == a.n
        for group, value in a.details["per_group"].items():
            assert b.details["per_group"][group] == pytest.approx(value, abs=1e-9), (name, group)


def test_small_inputs_keep_the_previous_definitions():
    # Below every cap the rewritten code paths give what the previous code gave (written out here as it was).
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_samples, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import NearestNeighbors
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, meta = mid_size_screen(n=600)
    batches, moas = meta["Metadata_Batch"].to_numpy(), meta["Metadata_moa"].to_numpy()
    # Silhouettes: scikit-learn's, to 1e-12.
    assert silhouette(x, batches).value == pytest.approx(silhouette_score(x, batches, metric="cosine"), abs=1e-12)
    assert "n_scored" not in silhouette(x, batches).details
    per_label = [np.mean(1 - np.abs(silhouette_samples(x[moas == m], batches[moas == m], metric="cosine")))
                 for m in pd.unique(moas)]
    assert silhouette_batch_scib(x, batches, moas).value == pytest.approx(np.mean(per_label), abs=1e-12)
    # kNN identification: the per-query pandas vote it replaced, exactly.
    treatments, treated = meta["Metadata_Treatment"].to_numpy(), ~meta["Metadata_is_control"].to_numpy()
    correct = scored = 0
    for held_out in pd.unique(batches[treated]):
        query = treated & (batches == held_out)
        reference = treated & (batches != held_out)
        distances, rows = NearestNeighbors(n_neighbors=10, metric="cosine").fit(x[reference]).kneighbors(x[query])
        for label, row, weight in zip(treatments[query], rows, np.exp((1 - distances) / 0.1), strict=True):
            votes = pd.Series(weight).groupby(treatments[reference][row], sort=False).sum()
            correct += int(votes.idxmax() == label)
            scored += 1
    knn = knn_identification(x[treated], treatments[treated], batches[treated])
    assert (knn.details["n_correct"], knn.n) == (correct, scored)
    # kBET: the per-row bincount it replaced.
    k = 10
    _, rows = NearestNeighbors(n_neighbors=k, metric="cosine").fit(x).kneighbors(x)
    names, index = np.unique(batches, return_inverse=True)
    observed = np.stack([np.bincount(index[r], minlength=len(names)) for r in rows])
    from scipy.stats import chisquare

    expected = (np.bincount(index) / len(index))[None, :] * k
    assert kbet_acceptance_rate(x, batches, k=k).value == (chisquare(observed, f_exp=expected, axis=1).pvalue >= 0.05).mean()
    # Batch classification: the same pipeline, threads limited or not, the same accuracy.
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    reference = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), x, batches, cv=folds)
    result = batch_classification_accuracy(x, batches)
    assert result.value == pytest.approx(reference.mean(), abs=1e-12) and "n_scored" not in result.details
    # NSCB's "shares no batch" matrix: the set comparison it replaced.
    embeddings, metadata = six_treatments()
    metadata["Metadata_Batch"] = [("W1", "W2"), "W1", "W2", ("W2", "W3"), "W3", "W1"]
    sets = [frozenset([b]) if isinstance(b, str) else frozenset(b) for b in metadata["Metadata_Batch"]]
    similarity = embeddings @ embeddings.T  # unit vectors: cosine
    compounds, moa_of = metadata["Metadata_Compound"].to_numpy(), metadata["Metadata_moa"].to_numpy()
    correct = scored = 0
    for q in range(len(sets)):
        candidates = [c for c in range(len(sets)) if compounds[c] != compounds[q] and sets[q].isdisjoint(sets[c])]
        if any(moa_of[c] == moa_of[q] for c in candidates):
            correct += int(moa_of[max(candidates, key=lambda c: similarity[q, c])] == moa_of[q])
            scored += 1
    nscb = nsc_nscb_accuracy(embeddings, metadata)["nscb"]
    assert (nscb.details["n_correct"], nscb.n) == (correct, scored) and scored >= 3


def test_stratified_sample_keeps_every_stratum_and_its_share():
    from cdcl_hf.metrics import _stratified_sample

    strata = np.array(["a"] * 5000 + ["b"] * 4997 + ["c"] * 3)
    sample = _stratified_sample(strata, 1000, seed=0)
    assert _stratified_sample(strata, 20000) is None
    assert np.array_equal(sample, _stratified_sample(strata, 1000, seed=0)) and np.all(np.diff(sample) > 0)
    counts = pd.Series(strata[sample]).value_counts()
    assert counts["a"] == 500 and counts["b"] == 500 and counts["c"] == 2

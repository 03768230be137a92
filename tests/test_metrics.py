"""Metrics: the BBBC021 anchor, and each metric on a hand-built case whose answer is worked out below."""

import numpy as np
import pandas as pd
import pytest

from cdcl_hf.metrics import (
    batch_classification_accuracy,
    kbet_acceptance_rate,
    knn_identification,
    moa_retrieval_map,
    nsc_nscb_accuracy,
    replicate_retrieval_map,
    silhouette,
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
    wells["Metadata_batch"] = wells["Metadata_Plate"].str.split("_").str[0]  # "Week4_27861" -> "Week4"
    treatments = aggregate_profiles(
        wells, by=["Metadata_Compound", "Metadata_Concentration"], method="median", collect=["Metadata_batch"]
    )
    assert len(treatments) == 103
    features = treatments.filter(regex="^(?!Metadata_)").to_numpy()
    results = nsc_nscb_accuracy(
        features, treatments, moa_column="Metadata_moa", compound_column="Metadata_Compound",
        batch_column="Metadata_batch",
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
            "Metadata_compound": ["cA", "cA", "cB", "cC", "cD", "cE"],
            "Metadata_moa": ["X", "X", "X", "Y", "Y", "Y"],
            "Metadata_batch": list(batches),
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
        nsc_nscb_accuracy(embeddings, metadata.drop(columns="Metadata_batch"))
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
    metadata = pd.DataFrame({"Metadata_treatment": ["A", "A", "B", "B"], "Metadata_is_control": [False] * 4})
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
            "Metadata_treatment": ["A", "A", "B", "B", "DMSO", "DMSO"],
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
        {"Metadata_compound": ["cA", "cA", "cB", "cC", "cD"], "Metadata_moa": ["X", "X", "X", "Y", "Y"]}
    )
    result = moa_retrieval_map(unit_vectors([0, 5, 10, 8, 90]), metadata, null_size=200)
    assert result.n == 2
    assert result.value == pytest.approx(65 / 144)


def test_map_without_controls_is_undefined():
    metadata = pd.DataFrame({"Metadata_treatment": ["A", "A"], "Metadata_is_control": [False, False]})
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

"""Our profile tables in pycytominer (the profiling ecosystem's reference tool): its defaults read them, and its
normalisations give the numbers ours give."""

import numpy as np
import pandas as pd
import pytest

from cdcl_hf.profiling import correct_profiles, feature_columns, metadata_columns, metadata_name

pycytominer = pytest.importorskip("pycytominer", reason="pycytominer is a dev dependency: pip install -e '.[dev]'")


def image_profiles(seed: int = 0) -> pd.DataFrame:
    """Image-level profiles as extract_embeddings writes them: schema columns through metadata_name, emb_* features.

    Two plates with different offsets and scales, four wells each (two DMSO), three images per well.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for plate, (offset, scale) in {"P1": (0.0, 1.0), "P2": (5.0, 3.0)}.items():
        for well, compound in zip(["A01", "A02", "B01", "B02"], ["DMSO", "DMSO", "taxol", "nocodazole"], strict=True):
            for site in range(3):
                rows.append({"plate": plate, "well": well, "site": str(site), "batch": "Week1", "compound": compound,
                             "treatment": compound, "moa": None if compound == "DMSO" else "MT",
                             "is_control": compound == "DMSO",
                             **{f"emb_{i:04d}": offset + scale * rng.normal() for i in range(6)}})
    table = pd.DataFrame(rows)
    return table.rename(columns={c: metadata_name(c) for c in table.columns if not c.startswith("emb_")})


def test_schema_columns_get_cellprofiler_names():
    table = image_profiles()
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Batch", "Metadata_Compound",
            "Metadata_Treatment", "Metadata_moa", "Metadata_is_control"} == set(metadata_columns(table))
    # The BBBC021 CellProfiler profiles spell MoA in lower case; ours must match theirs to be joined.
    assert metadata_name("moa") == "Metadata_moa" and metadata_name("Metadata_Custom") == "Metadata_Custom"


def test_pycytominer_aggregate_with_default_strata_matches_ours():
    from cdcl_hf.profiling import aggregate_profiles

    images = image_profiles()
    features = feature_columns(images)
    theirs = pycytominer.aggregate(images, features=features, operation="median")  # default strata Plate + Well
    assert list(theirs.columns[:2]) == ["Metadata_Plate", "Metadata_Well"]
    ours = aggregate_profiles(images, by=["Metadata_Plate", "Metadata_Well"], method="median")
    merged = ours.merge(theirs, on=["Metadata_Plate", "Metadata_Well"], suffixes=("", "_theirs"))
    assert len(merged) == len(ours) == 8
    for feature in features:
        np.testing.assert_allclose(merged[feature], merged[f"{feature}_theirs"], rtol=0, atol=1e-12)


def _pycytominer_per_plate(profiles: pd.DataFrame, method: str) -> pd.DataFrame:
    """pycytominer.normalize run plate by plate against the plate's controls (it has no per-plate option)."""
    features, meta = feature_columns(profiles), metadata_columns(profiles)
    plates = [
        pycytominer.normalize(plate, features=features, meta_features=meta, method=method,
                              samples="Metadata_is_control == True")
        for _, plate in profiles.groupby("Metadata_Plate", sort=False)
    ]
    return pd.concat(plates).loc[profiles.index]


def test_mad_matches_pycytominer_mad_robustize():
    images = image_profiles()
    ours = correct_profiles(images, "mad")
    theirs = _pycytominer_per_plate(images, "mad_robustize")
    features = feature_columns(images)
    difference = np.abs(ours[features].to_numpy() - theirs[features].to_numpy()).max()
    assert difference <= 1e-12, difference
    # And the table is not trivially unchanged: plate P2's offset of 5 is gone.
    assert abs(ours.loc[images["Metadata_Plate"] == "P2", features].to_numpy().mean()) < 2


def test_zscore_uses_population_std_as_pycytominer_standardize():
    images = image_profiles()
    ours = correct_profiles(images, "zscore")
    theirs = _pycytominer_per_plate(images, "standardize")
    features = feature_columns(images)
    np.testing.assert_allclose(ours[features].to_numpy(), theirs[features].to_numpy(), rtol=0, atol=1e-12)
    # The convention is what makes them agree: the sample std (ddof=1) of 6 controls per plate is sqrt(6/5) larger.
    controls = images[images["Metadata_is_control"] & (images["Metadata_Plate"] == "P1")][features]
    treated = images[~images["Metadata_is_control"] & (images["Metadata_Plate"] == "P1")][features]
    sample_std = (treated - controls.mean()) / controls.std(ddof=1)
    assert not np.allclose(sample_std.to_numpy(), ours.loc[treated.index, features].to_numpy())
    assert "ddof=0" in correct_profiles.__doc__


def test_sphering_is_pycytominer_zca_not_zca_cor():
    rng = np.random.default_rng(1)
    mixing = rng.normal(size=(4, 4)) + np.diag([3.0, 1.0, 0.5, 0.2])
    table = pd.DataFrame(rng.normal(size=(80, 4)) @ mixing * [1.0, 10.0, 0.1, 1.0], columns=[f"emb_{i:04d}" for i in range(4)])
    table.insert(0, "Metadata_is_control", [True] * 60 + [False] * 20)
    table.insert(0, "Metadata_Plate", "P1")
    features, meta = feature_columns(table), metadata_columns(table)
    ours = correct_profiles(table, "sphering", epsilon=1e-12)[features].to_numpy()
    common = {"features": features, "meta_features": meta, "method": "spherize", "spherize_epsilon": 1e-12,
              "samples": "Metadata_is_control == True"}
    zca = pycytominer.normalize(table, spherize_method="ZCA", **common)
    zca_cor = pycytominer.normalize(table, spherize_method="ZCA-cor", **common)
    np.testing.assert_allclose(ours, zca.drop(columns=meta).to_numpy(), atol=1e-8)
    assert not np.allclose(ours, zca_cor.drop(columns=meta).to_numpy(), atol=1e-3)  # the features' scales differ


def test_pycytominer_feature_select_takes_our_feature_list():
    images = image_profiles()
    images["emb_constant"] = 1.0  # no variance: variance_threshold must drop it
    selected = pycytominer.feature_select(images, features=feature_columns(images), operation="variance_threshold")
    assert "emb_constant" not in selected.columns
    assert set(metadata_columns(images)) <= set(selected.columns)
    assert {c for c in selected.columns if c.startswith("emb_")} == set(feature_columns(images)) - {"emb_constant"}

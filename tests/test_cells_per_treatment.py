"""benchmarks/cells_per_treatment_bbbc021.py: NSC / NSCB of treatment profiles made of k drawn cells."""

import numpy as np
import pandas as pd
from benchmark_scripts import load_benchmark


def load_script():
    return load_benchmark("cells_per_treatment_bbbc021")


def cell_table(noise: float, cells_per_treatment: int = 4, seed: int = 0) -> pd.DataFrame:
    """3 MoAs x 2 compounds x 2 concentrations, each treatment in one of 2 batches; cells = MoA direction + noise;
    a few controls that the curve must ignore."""
    rng = np.random.default_rng(seed)
    rows, features = [], []
    for moa in range(3):
        for compound in range(2):
            for concentration in (1, 10):
                batch = f"Week{(compound + concentration) % 2 + 1}"
                for _ in range(cells_per_treatment):
                    direction = np.eye(3)[moa] * 3.0
                    features.append(direction + noise * rng.standard_normal(3))
                    rows.append({"Metadata_Treatment": f"c{moa}{compound}@{concentration}",
                                 "Metadata_Compound": f"c{moa}{compound}", "Metadata_moa": f"moa{moa}",
                                 "Metadata_Batch": batch, "Metadata_is_control": False})
    for _ in range(5):
        features.append(rng.standard_normal(3))
        rows.append({"Metadata_Treatment": "DMSO@0", "Metadata_Compound": "DMSO", "Metadata_moa": "DMSO",
                     "Metadata_Batch": "Week1", "Metadata_is_control": True})
    return pd.concat([pd.DataFrame(rows), pd.DataFrame(features, columns=["f0", "f1", "f2"])], axis=1)


def test_separated_mechanisms_are_found_from_one_cell_on():
    result = load_script().curve(cell_table(noise=0.01), max_cells=3, draws=3, seed=0)
    assert result["n_treatments"] == 12  # controls left out
    assert set(result["cells"]) == {"1", "2", "3"}
    for scores in result["cells"].values():
        assert scores["nsc"]["mean"] == 1.0 and scores["nscb"]["mean"] == 1.0 and scores["nsc"]["n"] == 3


def test_noisy_cells_score_better_when_more_are_pooled():
    result = load_script().curve(cell_table(noise=4.0, cells_per_treatment=8), max_cells=8, draws=40, seed=0)
    one, eight = result["cells"]["1"]["nsc"]["mean"], result["cells"]["8"]["nsc"]["mean"]
    assert 0.0 <= one < eight <= 1.0


def test_treatments_with_too_few_cells_are_left_out():
    table = cell_table(noise=0.01)
    table = table[~((table["Metadata_Treatment"] == "c00@1") & (table.index % 4 != 0))]  # 1 cell left
    assert load_script().curve(table, max_cells=2, draws=1, seed=0)["n_treatments"] == 11

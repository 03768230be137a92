"""benchmarks/tune_bbbc021_crops.py: the variants are well formed, and the preset is what its rule picks."""

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "tuning_bbbc021_crops.json"
PRESET = ROOT / "training" / "configs" / "bbbc021_crops.yaml"


@pytest.fixture(scope="module")
def tune():
    return load_benchmark("tune_bbbc021_crops")


def record(variant, seed, nscb, nsc=0.4, entropy=0.9, trained_by=None, scoring_flags=None):
    return {"variant": variant, "method": "cdcl", "seed": seed, "metrics": {"nsc": nsc, "nscb": nscb},
            "final_teacher_entropy_ratio": entropy, "trained_by": trained_by, "scoring_flags": scoring_flags}


def test_every_scoring_variant_scores_a_trained_variant(tune):
    for name, (trained, flags) in tune.SCORING_VARIANTS.items():
        assert trained in tune.VARIANTS, name
        assert flags and all(isinstance(flag, str) for flag in flags), name


def test_training_settings_parse_flags_as_the_training_cli(tune):
    settings = tune.training_settings(tune.BASE_PRESET, ["--local_crop_scale", "0.4", "0.7", "--only_cross_domain",
                                                         "--num_train_epochs", "45", "--dataloader_num_workers", "3"])
    assert settings["local_crop_scale"] == [0.4, 0.7]
    assert settings["only_cross_domain"] is True and settings["num_train_epochs"] == 45
    assert settings["model_preset"] == "tiny"  # the base preset's, where no flag overrides it
    assert not {"config", "output_dir", "dataloader_num_workers"} & set(settings)


def test_select_preset_takes_the_best_headline_score_of_a_healthy_teacher(tune):
    headline = tune.HEADLINE_SCORING_FLAGS
    runs = [
        # A variant's own (CLS, uncentred) rows do not count, however high.
        *(record("crops_model", seed, nscb=0.9) for seed in (1, 2)),
        *(record("crops_model_cls_mean_center", seed, 0.5, trained_by="crops_model", scoring_flags=headline)
          for seed in (1, 2)),
        # Higher, but its teacher drifted to uniform.
        *(record("epochs45_off_diagonal08_x", seed, 0.7, entropy=0.99, trained_by="epochs45_off_diagonal08",
                 scoring_flags=headline) for seed in (1, 2)),
        # The same NSCB as crops_model: NSC breaks the tie.
        *(record("preset_gain03_cls_mean_center", seed, 0.5, nsc=0.45, trained_by="preset_gain03",
                 scoring_flags=headline) for seed in (1, 2)),
        # Another scoring (TTA) does not count.
        *(record("crops_model_tta_flips", seed, 0.8, trained_by="crops_model",
                 scoring_flags=["--test_time_augmentation", "flips"]) for seed in (1, 2)),
    ]
    chosen = tune.select_preset(runs)
    assert chosen["variant"] == "preset_gain03"
    assert chosen["seeds"] == [1, 2] and chosen["nscb"]["mean"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no variant has models scored with"):
        tune.select_preset(runs[:2])


def test_the_preset_holds_the_settings_its_rule_picks(tune):
    """training/configs/bbbc021_crops.yaml = the tuning base + the flags of the variant the committed results pick."""
    chosen = tune.select_preset(json.loads(RESULTS.read_text())["runs"])
    assert tune.training_settings(PRESET, []) == tune.training_settings(tune.BASE_PRESET, chosen["flags"]), (
        f"the tuning results pick {chosen['variant']} ({' '.join(chosen['flags'])})")
    assert f"**{chosen['variant']}**" in RESULTS.with_suffix(".md").read_text()

"""`benchmarks/run_all.py --quick` runs every benchmark and writes well-formed JSON (correctness, not speed)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _is_spread(value) -> bool:
    return (
        isinstance(value, dict) and set(value) == {"median", "min", "max", "n"} and value["n"] >= 3
        and all(math.isfinite(value[k]) for k in ("median", "min", "max"))
        and value["min"] <= value["median"] <= value["max"]
    )


def _check_machine(result: dict) -> None:
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["torch"] and machine["cpu"] and machine["cores_usable"] >= 1
    assert result["quick"] is True


def test_run_all_quick_writes_well_formed_results(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "run_all.py"), "--quick", "--out_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    written = {p.stem for p in tmp_path.glob("*.json")}
    assert written == {"inference", "inference_compiled", "training_step", "data_path", "pairing", "gpu"}, written

    inference = json.loads((tmp_path / "inference.json").read_text())
    _check_machine(inference)
    assert inference["matmul_peak"]["best_flops"] > 0
    assert {p["attn_implementation"] for p in inference["points"]} == {"sdpa", "eager"}
    for point in inference["points"]:
        assert set(point["models"]) == {"cdcl", "vit", "dinov2", "cdcl_onednn"}
        assert point["faster_baseline"] in ("vit", "dinov2")
        assert _is_spread(point["speedup_vs_faster_baseline"])
        assert _is_spread(point["onednn_speedup_vs_faster_baseline"]) and _is_spread(point["onednn_speedup_vs_cdcl"])
        flops = {m["flops"] for m in point["models"].values()}
        assert len(flops) == 1 and flops.pop() > 0  # identical dimensions: identical FLOPs
        for model in point["models"].values():
            assert _is_spread(model["mfu"]) and _is_spread(model["images_per_s"]) and model["peak_activation_mib"] > 0

    compiled = json.loads((tmp_path / "inference_compiled.json").read_text())
    _check_machine(compiled)
    if not compiled.get("skipped"):  # inductor needs a C++ compiler
        (point,) = compiled["points"]
        assert set(point["images_per_s"]) == {"cdcl", "vit", "cdcl_compiled", "vit_compiled"}
        assert all(_is_spread(s) for s in point["speedup"].values()) and len(point["speedup"]) == 4
        assert set(point["mfu"]) == set(point["images_per_s"]) and all(_is_spread(s) for s in point["mfu"].values())
        assert set(point["busiest_op_compiled"]) == {"cdcl", "vit"}
        # Compiled and eager compute the same embeddings.
        assert max(point["max_abs_diff_compiled_vs_eager"].values()) < 1e-4
        assert "`torch.compile` on the CPU" in done.stdout

    training = json.loads((tmp_path / "training_step.json").read_text())
    _check_machine(training)
    assert training["results"]
    for config in training["results"]:
        assert set(config["runs"]) == {"cdcl", "cdcl_no_cache", "dino", "dino_no_cache", "cdcl_batched_views",
                                       "cdcl_blas"}
        assert _is_spread(config["cdcl_blas_over_cdcl_time"])
        assert _is_spread(config["cdcl_over_dino_time"]) and _is_spread(config["cdcl_batched_views_over_cdcl_time"])
        assert config["runs"]["cdcl_batched_views"]["time_split"]["ms_per_step"]["views"] > 0
        for run in config["runs"].values():
            assert _is_spread(run["images_per_s"]) and _is_spread(run["mfu"]) and run["flops_per_step"] > 0
            fractions = run["time_split"]["fraction"]
            assert abs(sum(fractions.values()) - 1) < 1e-2, fractions
        # The decoded-image cache and batched views change where an image and its views come from, not what the
        # step computes.
        assert config["runs"]["cdcl"]["flops_per_step"] == config["runs"]["cdcl_no_cache"]["flops_per_step"]
        assert config["runs"]["cdcl"]["flops_per_step"] == config["runs"]["cdcl_batched_views"]["flops_per_step"]
        assert config["runs"]["cdcl"]["flops_per_step"] == config["runs"]["cdcl_blas"]["flops_per_step"]

    data_path = json.loads((tmp_path / "data_path.json").read_text())
    _check_machine(data_path)
    rows = data_path["throughput"]
    assert {(r["access"], r["workers"]) for r in rows} >= {("map", 0), ("map", 2), ("streamed", 0), ("streamed", 2)}
    for row in rows:
        assert row["items"] > 0 and _is_spread(row["images_per_s"])
    if any(r["screen"].startswith("crops") for r in rows):  # the real crops (../shared/data) were found
        crops = {(r["access"], r["workers"], r["work"]) for r in rows if r["screen"].startswith("crops")}
        works = ("decode", "decode+views", "decode+batched views")  # per-item views vs cdcl-train --batched_views
        assert crops == {(a, w, k) for a in ("map", "streamed") for w in (0, 2) for k in works}, crops
    kinds = {r["storage"] for r in data_path["storage"]}
    assert kinds == {"png0", "png1", "png3", "png6", "png9", "raw"}
    raw = [r for r in data_path["storage"] if r["storage"] == "raw"]
    assert all(r["fraction_of_raw"] == 1.0 for r in raw)

    pairing = json.loads((tmp_path / "pairing.json").read_text())
    assert [r["items"] for r in pairing["results"]] == [1_000, 10_000, 100_000]
    assert all(r["index_mib"] > 0 and r["per_item_us"] > 0 for r in pairing["results"])
    evaluation = pairing["evaluation"]["results"]
    assert evaluation and "failed" not in evaluation[0], evaluation
    assert evaluation[0]["seconds"]["total"] > 0 and "nsc_nscb_accuracy" in evaluation[0]["seconds"]

    # Without a GPU, bench_gpu --quick runs the same code on the CPU (fp32): a smoke test of the script.
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["quick"] is True and "inference_error" not in gpu and "training_step_error" not in gpu
    for point in gpu["inference"]["points"]:
        assert set(point["models"]) == {"cdcl", "vit", "dinov2"} and _is_spread(point["speedup_vs_faster_baseline"])
    for mode in ("with_loader", "compute"):
        block = gpu["training_step"][mode]
        assert _is_spread(block["cdcl_over_dino_time"]) and block["cdcl"]["flops_per_step"] > 0
        assert _is_spread(block["cdcl_batched_views_over_cdcl_time"])
        assert block["cdcl_batched_views"]["flops_per_step"] == block["cdcl"]["flops_per_step"]
    assert gpu["matmul_peak"]["best_flops"] > 0

    # The README tables are generated from these files.
    assert "| attention |" in done.stdout and "CDCL ÷ DINO" in done.stdout and "| screen |" in done.stdout


def test_decoded_image_cache_gives_identical_items():
    """The speed-up the training-step benchmark measures (pairing.CrossDomainPairDataset's cache) changes nothing."""
    import numpy as np
    import torch

    from cdcl_hf.multicrop import MultiCropAugmentation
    from cdcl_hf.pairing import CrossDomainPairDataset, PartnerIndex

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 4000, (3, 40, 44)).astype(np.uint16)) for _ in range(24)]
    loads = []

    def loader(row):
        loads.append(1)
        return row.float() / 100

    index = PartnerIndex(np.arange(24) % 4, np.arange(24) % 3)
    augmentation = MultiCropAugmentation(resize_to=36, global_size=32, local_size=16, num_local_crops=4)
    plain = CrossDomainPairDataset(images, index, transform=augmentation, seed=3, image_loader=loader)
    cached = CrossDomainPairDataset(images, index, transform=augmentation, seed=3, image_loader=loader,
                                    cache_bytes=2**30)
    for epoch in range(3):
        for idx in range(len(plain)):
            a, b = plain[(epoch, idx)], cached[(epoch, idx)]
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
    loads.clear()
    cached[(5, 0)]
    assert not loads  # every image is in the cache now
    small = CrossDomainPairDataset(images, index, transform=augmentation, image_loader=loader, cache_bytes=1)
    small[(0, 0)]
    assert small._cached_bytes == 0  # over the budget: nothing kept


def test_readme_tables_are_the_committed_results(tmp_path):
    """Every generated README section equals what `make_tables.py --update_readme` renders from benchmarks/results."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import make_tables
    finally:
        sys.path.remove(str(BENCHMARKS))
    readme = BENCHMARKS.parent / "README.md"
    copy = tmp_path / "README.md"
    copy.write_text(readme.read_text())
    assert set(make_tables.update_readme(BENCHMARKS / "results", copy)) == set(make_tables.README_SECTIONS)
    assert copy.read_text() == readme.read_text(), "README tables differ from benchmarks/results: run make_tables.py --update_readme"

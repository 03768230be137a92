"""Markdown tables (README "Performance") from the benchmark JSON files.

    python benchmarks/make_tables.py [RESULTS_DIR]     # default benchmarks/results; prints markdown
    python benchmarks/make_tables.py --update_readme [RESULTS_DIR]   # rewrites the README's generated sections

`--update_readme` replaces the text between each pair of markers `<!-- generated:NAME:start -->` /
`<!-- generated:NAME:end -->` in README.md (sections: `bbbc021_quality`, from methods_bbbc021.json; a quick
(smoke) run's file, or none, gives a line saying the benchmark has not been run yet).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _load(folder: Path, name: str) -> dict | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _spread(s: dict, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def _machine(result: dict) -> str:
    m = result.get("machine", {})
    peak = result.get("matmul_peak", {}).get("best_flops")
    text = (f"{m.get('cpu', '?')}, {m.get('cores_usable', '?')} cores usable, {m.get('torch_threads', '?')} torch "
            f"threads, torch {m.get('torch', '?')}, transformers {m.get('transformers', '?')}, {m.get('device', 'cpu')}")
    if peak:
        text += f"; fp32 matmul peak measured in the run: {peak / 1e9:.0f} GFLOP/s"
        kernels = result["matmul_peak"].get("best_by_kernel")
        if kernels:
            text += " (best of " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in kernels.items()) + ")"
    return text + (" — **quick (smoke) run**" if result.get("quick") else "")


def inference_table(result: dict) -> str:
    lines = [
        f"**Inference** (ViT-S/16 dims, {result['channels']} channels, fp32; {_machine(result)}). Speed-up = time of "
        "the faster of `ViTModel` / `Dinov2Model` ÷ time of `CDCLModel` (> 1: CDCLModel faster), median (min–max) "
        f"of {result['repeats']} interleaved repeats.",
        "",
        "| attention | size | batch | CDCL images/s | speed-up vs faster baseline | vs ViTModel | vs Dinov2Model "
        "| CDCL MFU | CDCL with oneDNN linears (as embedded): images/s, speed-up vs faster baseline, MFU "
        "| peak activations MiB (CDCL / ViT / Dinov2) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        m = p["models"]
        onednn = ""
        if "cdcl_onednn" in m:
            onednn = (f"{m['cdcl_onednn']['images_per_s']['median']:.1f}, "
                      f"{_spread(p['onednn_speedup_vs_faster_baseline'])}, {_spread(m['cdcl_onednn']['mfu'])}")
        lines.append(
            f"| {p['attn_implementation']} | {p['image_size']} | {p['batch']} | {m['cdcl']['images_per_s']['median']:.1f} "
            f"| {_spread(p['speedup_vs_faster_baseline'])} ({p['faster_baseline']}) | {_spread(p['speedup_vs_vit'])} "
            f"| {_spread(p['speedup_vs_dinov2'])} | {_spread(m['cdcl']['mfu'])} | {onednn} "
            f"| {m['cdcl']['peak_activation_mib']:.1f} / {m['vit']['peak_activation_mib']:.1f} / "
            f"{m['dinov2']['peak_activation_mib']:.1f} |"
        )
    return "\n".join(lines)


def compiled_inference_table(result: dict) -> str:
    if result.get("skipped"):
        return f"**`torch.compile` on the CPU**: not measured ({result['skipped']})."
    lines = [
        f"**`torch.compile` on the CPU** (`dynamic=True`, inductor with frozen weights; ViT-S/16 dims, fp32, one core "
        "pinned; "
        f"{_machine(result)}). Speed-up = eager time ÷ compiled time, median (min–max) of {result['repeats']} "
        "interleaved repeats of the four models.",
        "",
        "| attention | size | batch | CDCL compiled vs eager | ViTModel compiled vs eager | CDCL compiled vs ViTModel "
        "compiled | CDCL compiled vs ViTModel eager | MFU CDCL compiled / eager | compile s (CDCL) "
        "| linear kernel (compiled CDCL / ViTModel) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        x = p["speedup"]
        lines.append(
            f"| {p['attn_implementation']} | {p['image_size']} | {p['batch']} | {_spread(x['cdcl_compiled_vs_cdcl'])} "
            f"| {_spread(x['vit_compiled_vs_vit'])} | {_spread(x['cdcl_compiled_vs_vit_compiled'])} "
            f"| {_spread(x['cdcl_compiled_vs_vit'])} | {p['mfu']['cdcl_compiled']['median']:.2f} / "
            f"{p['mfu']['cdcl']['median']:.2f} | {p['compile_s']['cdcl']:.0f} "
            f"| `{p['busiest_op_compiled']['cdcl']}` / `{p['busiest_op_compiled']['vit']}` |"
        )
    return "\n".join(lines)


def training_table(result: dict) -> str:
    lines = [
        f"**Training step** (whole step: data + forward/backward + EMA; {_machine(result)}). Time ratios per "
        "interleaved repeat, median (min–max); `no cache` = the data path before issue 10 (every image and partner "
        "re-read and re-decoded each time it is drawn); `blas` = the linear layers on torch's default kernel "
        "(`--cpu_linear_kernel blas`), the others on oneDNN's (`auto`, the default).",
        "",
        "| configuration | batch | run | images/s | MFU | step time ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        for name, run in r["runs"].items():
            ratio = ""
            if name == "cdcl":
                ratio = _spread(r["cdcl_over_dino_time"]) + " (÷ dino)"
            elif name == "cdcl_no_cache":
                ratio = _spread(r["cdcl_no_cache_over_dino_no_cache_time"]) + " (÷ dino no cache)"
            elif name == "cdcl_blas" and "cdcl_blas_over_cdcl_time" in r:
                ratio = _spread(r["cdcl_blas_over_cdcl_time"]) + " (÷ cdcl)"
            lines.append(f"| {r['config']} | {r['batch_size']} | {name} | {_spread(run['images_per_s'], '{:.3g}')} "
                         f"| {_spread(run['mfu'], '{:.3f}')} | {ratio} |")
    lines += ["", "Time split (ms per step) of the `cdcl` and `dino` runs:", ""]
    parts = None
    for r in result["results"]:
        for name in ("cdcl", "dino", "cdcl_no_cache"):
            split = r["runs"][name]["time_split"]["ms_per_step"]
            if parts is None:
                parts = list(split)
                lines += ["| configuration | run | " + " | ".join(parts) + " |", "|---|---|" + "---|" * len(parts)]
            lines.append(f"| {r['config']} | {name} | " + " | ".join(f"{split[k]:.1f}" for k in parts) + " |")
    return "\n".join(lines)


def data_path_table(result: dict) -> str:
    lines = [
        f"**Data path** (decoded images/s from a saved screen; {_machine(result)}); median (min–max).",
        "",
        "| screen | access | workers | work | images/s |",
        "|---|---|---|---|---|",
    ]
    for r in result["throughput"]:
        lines.append(f"| {r['screen']} | {r['access']} | {r['workers']} | {r['work']} "
                     f"| {_spread(r['images_per_s'], '{:.0f}')} |")
    lines += ["", "| screen | storage | size vs raw | decodes/s (one process) | encode ms/image |", "|---|---|---|---|---|"]
    for r in result["storage"]:
        lines.append(f"| {r['screen']} | {r['storage']} | {r['fraction_of_raw']:.2f} "
                     f"| {_spread(r['decodes_per_s'], '{:.0f}')} | {r['encode_ms_per_image']:.2f} |")
    for r in result.get("row_fetch", []):
        us = r["row_plus_decode_us"]
        lines += ["", f"Row fetch + decode ({r['screen']}): {_spread(us['pil'], '{:.0f}')} µs with the `Image` feature "
                  f"decoding to PIL, {_spread(us['bytes'], '{:.0f}')} µs from the PNG bytes (`decode=False`)."]
    return "\n".join(lines)


def pairing_table(result: dict) -> str:
    lines = [
        "**Partner index** (build, memory, per-item draw) and **evaluation** scaling.",
        "",
        "| items | build s | index MiB | per-item draw µs | vectorised µs/item |",
        "|---|---|---|---|---|",
    ]
    for r in result["results"]:
        mib = r.get("index_mib")
        lines.append(f"| {r['items']:,} | {r['build_s']} | {'' if mib is None else f'{mib:.1f}'} | {r['per_item_us']} "
                     f"| {r['vectorised_per_item_us']} |")
    evaluation = result.get("evaluation")
    if evaluation:
        lines += ["", "| profiles | " + " | ".join(evaluation["stages"]) + " |", "|---|" + "---|" * len(evaluation["stages"])]
        for r in evaluation["results"]:
            if r.get("failed"):
                lines.append(f"| {r['profiles']:,} | {r['failed']} |" + " |" * (len(evaluation["stages"]) - 1))
                continue
            lines.append(f"| {r['profiles']:,} | " + " | ".join(
                "" if r["seconds"].get(s) is None else f"{r['seconds'][s]:.3g} s" for s in evaluation["stages"]) + " |")
        if evaluation.get("note"):
            lines += ["", evaluation["note"]]
    return "\n".join(lines)


def gpu_table(result: dict) -> str:
    m = result["machine"]
    peak = result["matmul_peak"]["best_flops"]
    lines = [
        f"**GPU** ({m.get('gpu', m['device'])}, CUDA {m.get('cuda', '?')}, torch {m['torch']}, transformers "
        f"{m['transformers']}; {result['dtype']}; bf16 matmul peak measured in the run: {peak / 1e12:.0f} TFLOP/s"
        + (" — **quick (smoke) run**" if result.get("quick") else "") + "). Speed-up = time of the faster of "
        "`ViTModel` / `Dinov2Model` ÷ time of `CDCLModel`, median (min–max) of interleaved repeats.",
        "",
    ]
    inference = result.get("inference")
    if inference:
        lines += ["| attention | size | batch | CDCL images/s | speed-up vs faster baseline | CDCL MFU "
                  "| peak activations MiB (CDCL / ViT / Dinov2) |", "|---|---|---|---|---|---|---|"]
        for p in inference["points"]:
            models = p["models"]
            memory = " / ".join(f"{models[k].get('peak_activation_mib', float('nan')):.0f}" for k in ("cdcl", "vit", "dinov2"))
            lines.append(f"| {p['attn_implementation']} | {p['image_size']} | {p['batch']} "
                         f"| {models['cdcl']['images_per_s']['median']:.0f} "
                         f"| {_spread(p['speedup_vs_faster_baseline'])} ({p['faster_baseline']}) "
                         f"| {_spread(models['cdcl']['mfu'], '{:.3f}')} | {memory} |")
    step = result.get("training_step")
    if step:
        lines += ["", f"Training step (ViT-S/16, 2 × 224 px + 6 × 96 px views, batch {step['batch_size']}, "
                  f"mixed precision {step['mixed_precision']}; `with_loader`: {step['argv'][step['argv'].index('--dataloader_num_workers') + 1]} "
                  "data-loader workers decoding and cropping on the CPU; `compute`: one batch re-used):", "",
                  "| mode | method | step ms | images/s | MFU | step time ratio |", "|---|---|---|---|---|---|"]
        ratio_columns = {"cdcl": ("cdcl_over_dino_time", "CDCL ÷ DINO"),
                         "cdcl_batched_views": ("cdcl_batched_views_over_cdcl_time", "÷ CDCL per-item views")}
        for mode in ("with_loader", "compute"):
            block = step[mode]
            for method in ("cdcl", "dino", "cdcl_batched_views"):
                if method not in block:
                    continue
                run = block[method]
                key, label = ratio_columns.get(method, (None, ""))
                ratio = f"{_spread(block[key])} ({label})" if key in block else ""
                name = "cdcl `--batched_views`" if method == "cdcl_batched_views" else method
                lines.append(f"| {mode} | {name} | {_spread(run['step_ms'], '{:.1f}')} "
                             f"| {_spread(run['images_per_s'], '{:.0f}')} | {_spread(run['mfu'], '{:.3f}')} | {ratio} |")
    graphs = result.get("inference_cuda_graphs")
    if graphs:
        lines += ["", "Inference with each model's forward replayed as a CUDA graph (SDPA; `cuda_graph_forward`):", "",
                  "| size | batch | CDCL graph images/s | ÷ CDCL plain forward | speed-up vs faster graphed baseline |",
                  "|---|---|---|---|---|"]
        for p in graphs:
            lines.append(f"| {p['image_size']} | {p['batch']} | {p['images_per_s']['cdcl_graph']['median']:.0f} "
                         f"| {_spread(p['graph_speedup_over_plain'])} "
                         f"| {_spread(p['speedup_vs_faster_graph_baseline'])} ({p['faster_graph_baseline']}) |")
    for part in ("inference", "inference_cuda_graphs", "training_step"):
        if result.get(f"{part}_error"):
            lines += ["", f"{part} failed: `{result[f'{part}_error'].strip().splitlines()[-1]}`"]
    return "\n".join(lines)


# Rows and columns of the README's "Quality on real BBBC021 crops" table (benchmarks/bench_methods_bbbc021.py).
BBBC021_ROWS = (
    ("untrained", "untrained ViT"), ("dino", "dino"), ("dino-cb", "dino-cb"), ("cdcl", "cdcl"),
    ("intensity_stats", "intensity statistics (no model)"), ("pooled_pixels", "8 × 8 pooled pixels (no model)"),
    ("cellprofiler", "CellProfiler (published profiles)"),
)
BBBC021_COLUMNS = (
    ("nsc", "NSC"), ("nscb", "NSCB"), ("replicate_map", "replicate mAP"), ("moa_map", "MoA mAP"),
    ("batch_classification_controls", "batch clf acc, controls ↓"), ("ilisi_controls", "iLISI, controls"),
)
BBBC021_Z_COLUMNS = (
    ("batch_classification_controls", "batch clf acc, z"), ("kbet_controls", "kBET, z"),
    ("ilisi_controls", "iLISI, z"), ("silhouette_batch_controls", "batch silhouette, z"),
)
BBBC021_NOT_RUN = ("*Not run yet: `python benchmarks/bench_methods_bbbc021.py` writes "
                   "`benchmarks/results/methods_bbbc021.json`, then `python benchmarks/make_tables.py "
                   "--update_readme` fills this table.*")


def _mean_sd(stats: dict | None, informative: bool = True) -> str:
    if not stats or stats.get("mean") is None:
        return "n/d"
    text = f"{stats['mean']:.3f}"
    if stats.get("n_seeds", 1) > 1 and not stats.get("deterministic"):
        text += f" ± {stats['std']:.3f}"
    return text if informative else f"({text})"


def _z_with_p(stats: dict | None) -> str:
    p_values = (stats or {}).get("p_per_seed")
    text = _mean_sd(stats)
    return text if not p_values else f"{text} (p {'/'.join(f'{p:.2f}' for _, p in sorted(p_values.items()))})"


def bbbc021_quality_table(result: dict | None) -> str:
    """The README's "Quality on real BBBC021 crops" table from methods_bbbc021.json (a line when there is none,
    or only a quick run's)."""
    if result is None or result.get("quick"):
        return BBBC021_NOT_RUN
    # The headline correction is the benchmark's first (older results files: `none`).
    correction = (result["settings"].get("corrections") or ["none"])[0]
    block = result["summary"][correction]["metrics"]
    machine = result.get("machine", {})
    seeds = result["settings"]["seeds"]
    lines = [
        (f"Trained models embedded with `--pooling {result['settings']['pooling']}`; " if result["settings"].get("pooling")
         else "")
        + f"correction `{correction}`; trained methods: mean ± sample sd over {len(seeds)} seed(s) {seeds}; the baselines "
        "and CellProfiler are deterministic. Values in parentheses are flagged not informative by the metric code. "
        f"Run on {machine.get('cpu', '?')} ({machine.get('cores_usable', '?')} cores usable) in "
        f"{result['total_wall_s'] / 60:.1f} min (machine and wall time from the JSON); full tables, paired "
        "differences and training health in "
        "[benchmarks/results/methods_bbbc021.md](benchmarks/results/methods_bbbc021.md).",
        "",
        "| method | " + " | ".join(title for _, title in BBBC021_COLUMNS) + " |",
        "|---|" + "---|" * len(BBBC021_COLUMNS),
    ]
    for method, label in BBBC021_ROWS:
        if method not in block:
            continue
        cells = []
        for name, _ in BBBC021_COLUMNS:
            flags = [e["metrics"][name].get("informative", True) for r in result["runs"] if r["method"] == method
                     for e in r["evaluations"] if e.get("summary_key", e["correction"]) == correction
                     and name in e["metrics"]]
            cells.append(_mean_sd(block[method].get(name), all(flags)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    paired = result["summary"][correction]["paired_differences"].get("cdcl - dino")
    if paired:
        lines.append("| *cdcl − dino, paired* | " + " | ".join(_mean_sd(paired.get(n)) for n, _ in BBBC021_COLUMNS)
                     + " |")
    z_table = result["summary"][correction].get("z_vs_null")
    if z_table:
        n_controls = next((e["metrics"]["ilisi_controls"].get("n") for r in result["runs"] for e in r["evaluations"]
                           if e.get("summary_key") == correction and "ilisi_controls" in e["metrics"]), "?")
        lines += ["", f"Batch on the {n_controls} control wells against the same scores with their batch labels "
                  "shuffled (z = (value − shuffled mean) / shuffled sd, mean ± sd over seeds; |z| < 2: no batch "
                  "signal the controls can show; batch clf z > 0 or kBET / iLISI z < 0 beyond that: batch present; "
                  "in parentheses each seed's permutation p-value, the share of shuffles with at least as much "
                  "batch):",
                  "", "| method | " + " | ".join(title for _, title in BBBC021_Z_COLUMNS) + " |",
                  "|---|" + "---|" * len(BBBC021_Z_COLUMNS)]
        for method, label in BBBC021_ROWS:
            if method in z_table:
                lines.append(f"| {label} | " + " | ".join(_z_with_p(z_table[method].get(name))
                                                        for name, _ in BBBC021_Z_COLUMNS) + " |")
    heldout = next((key for key in result["summary"] if key.startswith(f"{correction}, ")), None)
    if heldout:
        weeks = result["settings"].get("heldout_batches") or []
        block = result["summary"][heldout]["metrics"]
        columns = BBBC021_COLUMNS[:4]
        lines += ["", f"The same models and baselines scored on the {heldout.split(', ', 1)[1]} alone "
                  f"({', '.join(weeks)}: the half of the screen the preset's tuning never saw):", "",
                  "| method | " + " | ".join(title for _, title in columns) + " |", "|---|" + "---|" * len(columns)]
        for method, label in BBBC021_ROWS:
            if method not in block:
                continue
            cells = []
            for name, _ in columns:
                flags = [e["metrics"][name].get("informative", True) for r in result["runs"] if r["method"] == method
                         for e in r["evaluations"] if e.get("summary_key") == heldout and name in e["metrics"]]
                cells.append(_mean_sd(block[method].get(name), all(flags)))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_SECTIONS = {"bbbc021_quality": lambda folder: bbbc021_quality_table(_load(folder, "methods_bbbc021")),
                   "performance": lambda folder: tables(folder).rstrip("\n")}


def update_readme(folder: str | Path, readme: str | Path = README) -> list[str]:
    """Rewrite every generated section of ``readme`` (between its markers) from the JSON in ``folder``.

    Returns the names of the sections found; a section whose markers are missing is left out (and not added).
    """
    readme = Path(readme)
    text = readme.read_text()
    found = []
    for name, render in README_SECTIONS.items():
        start, end = f"<!-- generated:{name}:start -->", f"<!-- generated:{name}:end -->"
        if start not in text or end not in text:
            continue
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{render(Path(folder))}\n{end}{tail}"
        found.append(name)
    readme.write_text(text)
    return found


def tables(folder: str | Path) -> str:
    folder = Path(folder)
    sections = []
    for name, render in (("inference", inference_table), ("inference_compiled", compiled_inference_table),
                         ("training_step", training_table),
                         ("data_path", data_path_table), ("pairing", pairing_table),
                         ("gpu", gpu_table)):
        result = _load(folder, name)
        if result is not None:
            sections.append(render(result))
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--update_readme"]
    results = arguments[0] if arguments else Path(__file__).parent / "results"
    if "--update_readme" in sys.argv[1:]:
        print(f"updated README sections: {', '.join(update_readme(results)) or 'none (no markers found)'}")
    else:
        print(tables(results), end="")

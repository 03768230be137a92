"""Markdown tables (README "Performance") from the benchmark JSON files.

    python benchmarks/make_tables.py [RESULTS_DIR]     # default benchmarks/results; prints markdown
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


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
    return text + (" — **quick (smoke) run**" if result.get("quick") else "")


def inference_table(result: dict) -> str:
    lines = [
        f"**Inference** (ViT-S/16 dims, {result['channels']} channels, fp32; {_machine(result)}). Speed-up = time of "
        "the faster of `ViTModel` / `Dinov2Model` ÷ time of `CDCLModel` (> 1: CDCLModel faster), median (min–max) "
        f"of {result['repeats']} interleaved repeats.",
        "",
        "| attention | size | batch | CDCL images/s | speed-up vs faster baseline | vs ViTModel | vs Dinov2Model "
        "| CDCL MFU | peak activations MiB (CDCL / ViT / Dinov2) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        m = p["models"]
        lines.append(
            f"| {p['attn_implementation']} | {p['image_size']} | {p['batch']} | {m['cdcl']['images_per_s']['median']:.1f} "
            f"| {_spread(p['speedup_vs_faster_baseline'])} ({p['faster_baseline']}) | {_spread(p['speedup_vs_vit'])} "
            f"| {_spread(p['speedup_vs_dinov2'])} | {_spread(m['cdcl']['mfu'])} "
            f"| {m['cdcl']['peak_activation_mib']:.1f} / {m['vit']['peak_activation_mib']:.1f} / "
            f"{m['dinov2']['peak_activation_mib']:.1f} |"
        )
    return "\n".join(lines)


def training_table(result: dict) -> str:
    lines = [
        f"**Training step** (whole step: data + forward/backward + EMA; {_machine(result)}). Time ratios per "
        "interleaved repeat, median (min–max); `no cache` = the data path before issue 10 (every image and partner "
        "re-read and re-decoded each time it is drawn).",
        "",
        "| configuration | batch | run | images/s | MFU | CDCL ÷ DINO step time |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        for name, run in r["runs"].items():
            ratio = ""
            if name == "cdcl":
                ratio = _spread(r["cdcl_over_dino_time"])
            elif name == "cdcl_no_cache":
                ratio = _spread(r["cdcl_no_cache_over_dino_no_cache_time"]) + " (vs dino no cache)"
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


def tables(folder: str | Path) -> str:
    folder = Path(folder)
    sections = []
    for name, render in (("inference", inference_table), ("training_step", training_table),
                         ("data_path", data_path_table), ("pairing", pairing_table)):
        result = _load(folder, name)
        if result is not None:
            sections.append(render(result))
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    print(tables(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"), end="")

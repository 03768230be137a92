"""Inference: `CDCLModel` against transformers' `ViTModel` and `Dinov2Model` of identical dimensions.

ViT-S/16 (width 384, depth 12, 6 heads, MLP 1536, patch 16), 5 channels, fp32 on CPU, `torch.inference_mode`.
Every model is built with `image_size` equal to the input size (no position-embedding interpolation in any of them)
and pooled as it pools by default. Per (size, batch, attention implementation) the three models run interleaved
round-robin, `repeats` times; the ratio reported per point is `time(faster baseline) / time(CDCLModel)` per repeat
(> 1: CDCLModel is faster), its median and spread. Also: images/s, peak activation memory (tensors alive at once,
weights excluded, counted by a dispatch mode) and MFU = forward FLOPs (torch.utils.flop_counter) / time / the fp32
matmul peak measured in the same run (the better of torch.mm and oneDNN's linear: `common.matmul_peak_flops`).
A fourth arm, `cdcl_onednn`, is CDCLModel as the package embeds eagerly (`cdcl_hf.embedding.inference_forward`: the
linear layers on oneDNN's kernel instead of the BLAS, `cdcl_hf.cpu_kernels`), against the same baselines as transformers
runs them.

Run: python benchmarks/bench_inference.py [--quick] [--out FILE]

`--compiled` instead times `torch.compile(model, dynamic=True)` with inductor's weight freezing (the CPU inference
setting) of CDCLModel and ViTModel against both eager, interleaved, at a few points, the process pinned to one core.
With dynamic shapes the frozen linears run oneDNN's kernel (`mkldnn::_linear_pointwise`); with static shapes they run
MKL's packed GEMM, as fast as eager on an AMD CPU, where MKL takes its AVX2 code (see `common.matmul_peak_flops`). The
kernel that ran is recorded per point (the op with the most CPU time in a profiled forward). Writes
results/inference_compiled.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    PeakTensorMemory,
    best_of,
    interleaved,
    machine,
    matmul_peak_flops,
    ratios,
    summary,
    write_result,
)

VIT_S16 = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536,
           "patch_size": 16}


def build_models(image_size: int, channels: int, attn: str, dims: dict) -> dict[str, torch.nn.Module]:
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    from cdcl_hf import CDCLConfig, CDCLModel

    common = {"image_size": image_size, "num_channels": channels, "layer_norm_eps": 1e-6}
    configs = {
        "cdcl": (CDCLModel, CDCLConfig(**dims, **common), {}),
        "vit": (ViTModel, ViTConfig(**dims, **common), {"add_pooling_layer": False}),
        "dinov2": (Dinov2Model, Dinov2Config(
            hidden_size=dims["hidden_size"], num_hidden_layers=dims["num_hidden_layers"],
            num_attention_heads=dims["num_attention_heads"], mlp_ratio=dims["intermediate_size"] // dims["hidden_size"],
            patch_size=dims["patch_size"], **common,
        ), {}),
    }
    models = {}
    for name, (cls, config, kwargs) in configs.items():
        config._attn_implementation = attn
        models[name] = cls(config, **kwargs).eval()
        assert models[name].config._attn_implementation == attn, (name, models[name].config._attn_implementation)
    return models


def forward_flops(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(pixel_values)
    return int(counter.get_total_flops())


def peak_memory(model: torch.nn.Module, pixel_values: torch.Tensor) -> int:
    with torch.inference_mode(), PeakTensorMemory() as tracker:
        model(pixel_values)
    return tracker.peak


def forward_runner(model: torch.nn.Module, pixel_values: torch.Tensor):
    """A no-argument callable: one inference-mode forward of ``model`` on ``pixel_values`` (what `interleaved` times)."""
    def run():
        with torch.inference_mode():
            model(pixel_values)
    return run


def bench_point(models, image_size, batch, channels, repeats) -> dict:
    from cdcl_hf.embedding import inference_forward

    pixel_values = torch.randn(batch, channels, image_size, image_size)
    runners = {name: forward_runner(m, pixel_values) for name, m in models.items()}
    # CDCLModel as cdcl-embed / cdcl-evaluate run it eagerly: linear layers on oneDNN's kernel (cdcl_hf.cpu_kernels).
    runners["cdcl_onednn"] = forward_runner(inference_forward(models["cdcl"], linear_kernel="onednn"), pixel_values)
    times = interleaved(runners, repeats=repeats, warmup=1)
    out = {"image_size": image_size, "batch": batch, "models": {}}
    for name in runners:
        model = models["cdcl" if name == "cdcl_onednn" else name]
        flops = forward_flops(model, pixel_values)  # the same math whichever kernel runs it
        out["models"][name] = {
            "seconds": summary(times[name], 5),
            "images_per_s": summary([batch / t for t in times[name]], 2),
            "gflops_per_image": round(flops / batch / 1e9, 3),
            "flops": flops,
            "_times": times[name],
            "peak_activation_mib": round(peak_memory(model, pixel_values) / 2**20, 2),
        }

    def speedup(baseline: str, candidate: str) -> dict:
        return summary([b / c for b, c in zip(times[baseline], times[candidate], strict=True)], 3)

    faster = min(("vit", "dinov2"), key=lambda k: statistics.median(times[k]))
    out["faster_baseline"] = faster
    out["speedup_vs_faster_baseline"] = speedup(faster, "cdcl")
    out["speedup_vs_vit"] = speedup("vit", "cdcl")
    out["speedup_vs_dinov2"] = speedup("dinov2", "cdcl")
    out["onednn_speedup_vs_faster_baseline"] = speedup(faster, "cdcl_onednn")
    out["onednn_speedup_vs_cdcl"] = speedup("cdcl", "cdcl_onednn")
    return out


def profile_tables(image_size: int, batch: int, attn: str, channels: int, dims: dict, rows: int = 12) -> str:
    """torch.profiler: the ops taking the most CPU time in CDCLModel and in the two baselines, one forward each."""
    from torch.profiler import ProfilerActivity, profile

    models = build_models(image_size, channels, attn, dims)
    pixel_values = torch.randn(batch, channels, image_size, image_size)
    out = [f"# Inference profile: {image_size} px, batch {batch}, {attn}, fp32 CPU (3 forwards after a warm-up)\n"]
    for name, model in models.items():
        with torch.inference_mode():
            model(pixel_values)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    model(pixel_values)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)
        out.append(f"## {name}\n\n```\n{table}\n```\n")
    return "\n".join(out)


def busiest_op(model: torch.nn.Module, pixel_values: torch.Tensor) -> str:
    """The op with the most self CPU time in one profiled inference forward of ``model``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(pixel_values)
    return max(prof.key_averages(), key=lambda event: event.self_cpu_time_total).key


COMPILED_POINTS = tuple(f"{size},{batch},{attn}" for attn in ("sdpa", "eager") for size in (224, 96)
                        for batch in (1, 8, 32))


def bench_compiled(points: list[str], channels: int, dims: dict, repeats: int, peak_flops: float) -> list[dict]:
    """Eager vs `torch.compile` (frozen weights) for CDCLModel and ViTModel, interleaved, per SIZE,BATCH,ATTN; MFU of
    every arm against ``peak_flops`` (FLOPs counted on the eager model: compiling changes kernels, not the work)."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    results = []
    for point in points:
        size, batch, attn = point.split(",")
        size, batch = int(size), int(batch)
        # Every point compiles the same code objects again (the models' forwards); without a reset dynamo's
        # recompile limit (8 per code object) is reached after a few points and the "compiled" arms run eagerly.
        torch._dynamo.reset()
        eager = {name: model for name, model in build_models(size, channels, attn, dims).items() if name != "dinov2"}
        pixel_values = torch.randn(batch, channels, size, size)
        arms, compile_s, max_abs_diff = dict(eager), {}, {}
        linear_kernel = {}
        for name, model in eager.items():
            compiled = torch.compile(model, dynamic=True)
            start = time.perf_counter()
            with torch.inference_mode():
                out = compiled(pixel_values).last_hidden_state
                compile_s[name] = round(time.perf_counter() - start, 1)
                reference = model(pixel_values).last_hidden_state
            max_abs_diff[name] = float((out - reference).abs().max())
            linear_kernel[name] = busiest_op(compiled, pixel_values)
            arms[f"{name}_compiled"] = compiled
        times = interleaved({name: forward_runner(m, pixel_values) for name, m in arms.items()}, repeats=repeats,
                            warmup=1)
        speedups = {
            "cdcl_compiled_vs_cdcl": ratios(times, "cdcl", "cdcl_compiled"),
            "vit_compiled_vs_vit": ratios(times, "vit", "vit_compiled"),
            "cdcl_compiled_vs_vit_compiled": ratios(times, "vit_compiled", "cdcl_compiled"),
            "cdcl_compiled_vs_vit": ratios(times, "vit", "cdcl_compiled"),
        }
        flops = {name: forward_flops(model, pixel_values) for name, model in eager.items()}
        results.append({
            "image_size": size, "batch": batch, "attn_implementation": attn,
            "images_per_s": {name: summary([batch / t for t in ts], 2) for name, ts in times.items()},
            "mfu": {name: summary([flops[name.removesuffix("_compiled")] / t / peak_flops for t in ts], 3)
                    for name, ts in times.items()},
            "speedup": {name: summary(values, 3) for name, values in speedups.items()},
            "compile_s": compile_s, "max_abs_diff_compiled_vs_eager": max_abs_diff,
            "busiest_op_compiled": linear_kernel,
        })
        print(f"compiled {point}: " + ", ".join(f"{k} {v['median']:.3f}" for k, v in results[-1]["speedup"].items()),
              flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (small model, few points)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "inference.json"))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--profile", default=None, metavar="SIZE,BATCH,ATTN",
                        help="instead: write torch.profiler tables of one point (e.g. 224,1,sdpa) to results/")
    parser.add_argument("--compiled", nargs="*", default=None, metavar="SIZE,BATCH,ATTN",
                        help="instead: eager vs torch.compile at these points (default: the main run's 12; "
                             "--quick: 64,2,sdpa), one core; writes "
                             "results/inference_compiled.json unless --out is given")
    args = parser.parse_args(argv)
    if args.compiled is not None:
        out = args.out if args.out != parser.get_default("out") else str(RESULTS_DIR / "inference_compiled.json")
        from cdcl_hf.embedding import inductor_cpp_compiler

        compiler, found = inductor_cpp_compiler()
        if not found:  # inductor's CPU code needs one; without it there is nothing to measure
            write_result({"benchmark": "inference: torch.compile vs eager", "quick": args.quick, "machine": machine(),
                          "skipped": f"no C++ compiler ({compiler}) for inductor's CPU code", "points": []}, out)
            return
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        torch.set_num_threads(1)
        torch.manual_seed(0)
        dims = {**VIT_S16, "num_hidden_layers": 2} if args.quick else VIT_S16
        points = args.compiled or (["64,2,sdpa"] if args.quick else list(COMPILED_POINTS))
        repeats = args.repeats or (3 if args.quick else 12)
        peak = matmul_peak_flops()
        write_result({
            "benchmark": "inference: torch.compile (inductor, frozen weights) vs eager, CDCLModel and ViTModel, "
                         "fp32 CPU, one core",
            "quick": args.quick, "machine": machine(), "matmul_peak": peak, "dims": dims, "channels": 5,
            "repeats": repeats, "points": bench_compiled(points, 5, dims, repeats, peak["best_flops"]),
        }, out)
        return
    if args.profile:
        size, batch, attn = args.profile.split(",")
        text = profile_tables(int(size), int(batch), attn, 5, VIT_S16)
        out = RESULTS_DIR / f"inference_profile_{size}_{batch}_{attn}.md"
        out.write_text(text)
        print(text[:4000])
        print(f"wrote {out}")
        return
    torch.manual_seed(0)
    channels = 5
    if args.quick:
        dims = {**VIT_S16, "num_hidden_layers": 2}
        sizes, batches, repeats = [64], [2], args.repeats or 3
    else:
        dims = VIT_S16
        sizes, batches, repeats = [224, 96], [1, 8, 32], args.repeats or 5
    peak_start = matmul_peak_flops()
    points = []
    for attn in ("sdpa", "eager"):
        for size in sizes:
            models = build_models(size, channels, attn, dims)
            for batch in batches:
                point = bench_point(models, size, batch, channels, repeats)
                point["attn_implementation"] = attn
                points.append(point)
                print(f"{attn} {size}px b{batch}: cdcl / faster ({point['faster_baseline']}) speed-up "
                      f"{point['speedup_vs_faster_baseline']}, with oneDNN linears "
                      f"{point['onednn_speedup_vs_faster_baseline']}", flush=True)
    peak = best_of(peak_start, matmul_peak_flops())
    for point in points:
        for entry in point["models"].values():
            entry["mfu"] = summary([entry["flops"] / t / peak["best_flops"] for t in entry.pop("_times")], 3)
    write_result({
        "benchmark": "inference: CDCLModel vs ViTModel / Dinov2Model (same dimensions), fp32 CPU",
        "quick": args.quick,
        "machine": machine(),
        "matmul_peak": peak,
        "dims": dims,
        "channels": channels,
        "repeats": repeats,
        "target": "speedup_vs_faster_baseline >= 1.0 at every point; inference MFU >= 0.8",
        "points": points,
    }, args.out)


if __name__ == "__main__":
    main()

"""GPU: inference and the training step in bf16 on CUDA, with MFU against the card's own measured bf16 matmul peak.

Only where a GPU is lent (never in CI): `python benchmarks/bench_gpu.py [--out FILE]`. `--quick` runs the same code
at tiny sizes, on CUDA when present, else on the CPU in fp32 (a smoke test of the script, not a measurement).

Inference: `CDCLModel` vs transformers' `ViTModel` and `Dinov2Model` with identical dimensions (ViT-S/16, 5 channels,
224 and 96 px, batch 1 to 256), weights and inputs in bf16, `torch.inference_mode`, SDPA (PyTorch picks its fused
flash / memory-efficient kernel for bf16 on CUDA) and eager attention. The three models run interleaved round-robin;
each timed call is `inner` forwards followed by a device synchronisation; ratio per repeat = time(faster baseline) /
time(CDCLModel). Peak memory = `torch.cuda.max_memory_allocated` during one forward, minus the weights.

Training step: the real components (`build_train_data`, `build_student_teacher`, `build_objective`, `train_step`)
under `Accelerator(mixed_precision="bf16")`, ViT-S/16 with 2 global 224 px + 6 local 96 px views, `--method cdcl`
vs `--method dino`, interleaved. `compute`: the same batch of views re-used each step (student and teacher forward,
loss, backward, clip, optimizer, EMA: what the GPU does); `with_loader`: batches from the data loader with
`--dataloader_num_workers` worker processes (decode and multi-crop on the CPU), the whole step as a user runs it.
A third run, `cdcl_batched_views` (`--batched_views`), has the workers only decode and cuts each batch's views on the
GPU (`MultiCropAugmentation.crop_batch`); in `compute` it re-cuts the views of the fixed batch every step.
MFU = FLOPs of one step (torch.utils.flop_counter) / step time / the bf16 matmul peak measured in the same run.

CUDA graphs (GPU only): at SDPA, batch 1 / 8 / 32, each model's forward captured once as a CUDA graph and replayed
(`cuda_graph_forward`), interleaved with CDCLModel's plain forward: what launch overhead costs at small batches, and
CDCLModel vs the baselines when none pays it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_inference import VIT_S16, build_models, forward_flops  # noqa: E402
from bench_training_step import _Run  # noqa: E402
from common import RESULTS_DIR, interleaved, machine, ratios, summary, write_result  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: torch.device) -> dict:
    description = {**machine(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        description.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "flash_sdp_enabled": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient_sdp_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        })
    description["platform"] = platform.platform()
    return description


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> dict:
    """FLOP/s of one size x size x size matrix product on random data (best and median of `repeats`)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = _clock(device)
        torch.mm(a, b)
        rates.append(2 * size**3 / start.elapsed())
    return {"best_flops": max(rates), "median_flops": statistics.median(rates), "size": size, "dtype": str(dtype)}


class _clock:
    """Seconds between construction and `elapsed()`: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            import time

            self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        if self.device.type == "cuda":
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        import time

        return time.perf_counter() - self.t0


def repeated_forward(forward, pixel_values: torch.Tensor, inner: int, device: torch.device):
    """A timed call: `inner` forwards on `pixel_values`, then a device synchronisation."""
    def run():
        with torch.inference_mode():
            for _ in range(inner):
                forward(pixel_values)
        synchronize(device)
    return run


def inference(device, dtype, dims, sizes, batches, repeats, inner, peak_flops) -> list[dict]:
    points = []
    channels = 5
    for attn in ("sdpa", "eager"):
        for size in sizes:
            models = {name: model.to(device=device, dtype=dtype)
                      for name, model in build_models(size, channels, attn, dims).items()}
            for batch in batches:
                pixel_values = torch.randn(batch, channels, size, size, device=device, dtype=dtype)

                try:
                    times = interleaved({name: repeated_forward(m, pixel_values, inner, device)
                                         for name, m in models.items()}, repeats=repeats, warmup=2)
                except torch.OutOfMemoryError:
                    print(f"{attn} {size}px b{batch}: out of memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                    continue
                point = {"attn_implementation": attn, "image_size": size, "batch": batch, "models": {}}
                for name, model in models.items():
                    per_forward = [t / inner for t in times[name]]
                    flops = forward_flops(model, pixel_values)
                    entry = {
                        "ms_per_forward": summary([1e3 * t for t in per_forward], 4),
                        "images_per_s": summary([batch / t for t in per_forward], 1),
                        "mfu": summary([flops / t / peak_flops for t in per_forward], 4),
                        "gflops_per_image": round(flops / batch / 1e9, 3),
                    }
                    if device.type == "cuda":
                        weights = torch.cuda.memory_allocated(device)
                        torch.cuda.reset_peak_memory_stats(device)
                        with torch.inference_mode():
                            model(pixel_values)
                        entry["peak_activation_mib"] = round((torch.cuda.max_memory_allocated(device) - weights) / 2**20, 1)
                    point["models"][name] = entry
                faster = min(("vit", "dinov2"), key=lambda k: statistics.median(times[k]))
                point["faster_baseline"] = faster
                point["speedup_vs_faster_baseline"] = summary([b / c for b, c in zip(times[faster], times["cdcl"], strict=True)], 3)
                points.append(point)
                print(f"{attn} {size}px b{batch}: cdcl {point['models']['cdcl']['images_per_s']['median']:.0f} img/s, "
                      f"MFU {point['models']['cdcl']['mfu']['median']:.3f}; cdcl / {faster} speed-up "
                      f"{point['speedup_vs_faster_baseline']['median']:.3f}", flush=True)
            del models
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return points


def cuda_graph_forward(model: torch.nn.Module, example: torch.Tensor):
    """`model`'s forward on inputs shaped like `example`, captured once as a CUDA graph and replayed per call.

    A graph replays the whole forward's kernels with one launch, so what it saves is the per-kernel launch overhead
    of Python and the CUDA driver (what bounds a ViT-S forward at small batches); the maths is unchanged.
    """
    static_input = example.clone()
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream), torch.inference_mode():
        for _ in range(3):  # warm the allocator and any lazy initialisation outside the capture
            model(static_input)
    torch.cuda.current_stream().wait_stream(side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        static_output = model(static_input)

    def forward(pixel_values: torch.Tensor):
        static_input.copy_(pixel_values)
        graph.replay()
        return static_output

    return forward


def inference_cuda_graphs(device, dtype, dims, sizes, batches, repeats, inner) -> list[dict]:
    """SDPA inference with each model's forward replayed as a CUDA graph, beside CDCLModel's plain forward."""
    points = []
    channels = 5
    for size in sizes:
        models = {name: model.to(device=device, dtype=dtype)
                  for name, model in build_models(size, channels, "sdpa", dims).items()}
        for batch in batches:
            pixel_values = torch.randn(batch, channels, size, size, device=device, dtype=dtype)
            forwards = {f"{name}_graph": cuda_graph_forward(model, pixel_values) for name, model in models.items()}
            forwards["cdcl_plain"] = models["cdcl"]
            outputs = {name: forward(pixel_values).last_hidden_state for name, forward in forwards.items()}
            # The graph must compute what the plain forward computes.
            graph_error = (outputs["cdcl_graph"].float() - outputs["cdcl_plain"].float()).abs().max().item()
            times = interleaved({name: repeated_forward(f, pixel_values, inner, device) for name, f in forwards.items()},
                                repeats=repeats, warmup=2)
            point = {"attn_implementation": "sdpa", "image_size": size, "batch": batch,
                     "max_abs_difference_graph_vs_plain": graph_error,
                     "images_per_s": {name: summary([batch * inner / t for t in times[name]], 1) for name in times}}
            faster = min(("vit_graph", "dinov2_graph"), key=lambda k: statistics.median(times[k]))
            point["faster_graph_baseline"] = faster
            point["speedup_vs_faster_graph_baseline"] = summary(ratios(times, faster, "cdcl_graph"), 3)
            point["graph_speedup_over_plain"] = summary(ratios(times, "cdcl_plain", "cdcl_graph"), 3)
            points.append(point)
            print(f"cuda graphs sdpa {size}px b{batch}: cdcl graph {point['images_per_s']['cdcl_graph']['median']:.0f} "
                  f"img/s, {point['graph_speedup_over_plain']['median']:.2f}x its plain forward; cdcl / {faster} "
                  f"{point['speedup_vs_faster_graph_baseline']['median']:.3f}", flush=True)
            del forwards, outputs
        del models
        torch.cuda.empty_cache()
    return points


def _render_screen_part(path: str, num_images: int, image_size: int, seed: int) -> None:
    from cdcl_hf.synthetic_screen import config_for_num_images, synthetic_screen_dataset

    config = config_for_num_images(num_images, image_size=image_size, num_channels=5, seed=seed)
    synthetic_screen_dataset(config).save_to_disk(path)


def render_screen(path: Path, num_images: int, image_size: int, images_per_part: int = 96) -> int:
    """A synthetic screen of about `num_images` images at `path`, rendered in parallel parts; returns its length.

    The renderer takes ~0.3 s per 224 px image on one core, so parts of `images_per_part` (each its own seed: own
    compounds and batch effects) render in separate processes and are concatenated.
    """
    from concurrent.futures import ProcessPoolExecutor

    from datasets import concatenate_datasets, load_from_disk

    parts = max(1, round(num_images / images_per_part))
    part_paths = [str(path.parent / f"{path.name}-part{i}") for i in range(parts)]
    with ProcessPoolExecutor(max_workers=min(parts, os.cpu_count() or 1)) as pool:
        list(pool.map(_render_screen_part, part_paths, [num_images // parts] * parts, [image_size] * parts,
                      range(parts)))
    screen = concatenate_datasets([load_from_disk(p) for p in part_paths])
    screen.save_to_disk(str(path))
    return len(screen)


def training_step(device, mixed_precision, common_argv, steps, repeats, peak_flops) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision)
    runs = {}
    with contextlib.redirect_stderr(io.StringIO()):
        for name, extra in (("cdcl", ["--method", "cdcl"]), ("dino", ["--method", "dino"]),
                            ("cdcl_batched_views", ["--method", "cdcl", "--batched_views"])):
            torch.manual_seed(0)
            runs[name] = _Run(accelerator, [*common_argv, *extra], cache=True)
    batch_size = runs["cdcl"].batch_size

    def candidate(run):
        def go():
            for _ in range(steps):
                run.step()
            synchronize(device)
        return go

    result = {"argv": common_argv, "mixed_precision": mixed_precision, "batch_size": batch_size,
              "steps_per_repeat": steps}
    # The whole step with the data loader's workers (as a user runs it); then the compute alone on one fixed batch.
    for mode in ("with_loader", "compute"):
        if mode == "compute":
            for run in runs.values():
                run.batches = itertools.repeat(next(run.batches))
        times = interleaved({k: candidate(r) for k, r in runs.items()}, repeats=repeats, warmup=1)
        flops = {k: r.step_flops() for k, r in runs.items()}
        block = {}
        for k in runs:
            step_s = [t / steps for t in times[k]]
            block[k] = {"step_ms": summary([1e3 * t for t in step_s], 3),
                        "images_per_s": summary([batch_size / t for t in step_s], 1),
                        "flops_per_step": flops[k],
                        "mfu": summary([flops[k] / t / peak_flops for t in step_s], 4)}
        block["cdcl_over_dino_time"] = summary(ratios(times, "cdcl", "dino"), 3)
        block["cdcl_batched_views_over_cdcl_time"] = summary(ratios(times, "cdcl_batched_views", "cdcl"), 3)
        result[mode] = block
        print(f"training step ({mode}): cdcl {block['cdcl']['step_ms']['median']:.1f} ms "
              f"(MFU {block['cdcl']['mfu']['median']:.3f}), dino {block['dino']['step_ms']['median']:.1f} ms, "
              f"cdcl/dino {block['cdcl_over_dino_time']['median']:.3f}, batched views / per-item "
              f"{block['cdcl_batched_views_over_cdcl_time']['median']:.3f}", flush=True)
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes; runs on the CPU (fp32) without a GPU")
    parser.add_argument("--out", default=str(RESULTS_DIR / "gpu.json"))
    parser.add_argument("--workers", type=int, default=None,
                        help="data-loader workers for the with_loader step (default 8 on a GPU, 2 on the CPU)")
    parser.add_argument("--only", choices=("inference", "cuda_graphs", "training_step"), default=None)
    parser.add_argument("--step_batch_size", type=int, default=32, help="per-GPU batch of the training step")
    parser.add_argument("--step_images", type=int, default=None,
                        help="images of the training step's synthetic screen (default: 2 batches per loader worker)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device, dtype, mixed_precision = torch.device("cuda"), torch.bfloat16, "bf16"
    elif args.quick:
        device, dtype, mixed_precision = torch.device("cpu"), torch.float32, "no"
    else:
        parser.error("no CUDA device: this benchmark measures a GPU (use --quick for a CPU smoke run)")
    if args.workers is None:
        args.workers = 8 if device.type == "cuda" else 2
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak_size = 8192 if device.type == "cuda" else 512
    peak_start = matmul_peak(device, dtype, peak_size)
    result = {"benchmark": "GPU: inference and training step, bf16 on CUDA", "quick": args.quick,
              "machine": device_description(device), "dtype": str(dtype)}
    if args.quick:
        dims = {**VIT_S16, "num_hidden_layers": 2}
        sizes, batches, repeats, inner = [64], [2], 3, 2
    else:
        dims = VIT_S16
        sizes, batches, repeats, inner = [224, 96], [1, 8, 32, 128, 256], 5, 10
    result["matmul_peak"] = {"start": peak_start, "note": "MFU uses the start-of-run measurement"}
    # Each part is written as soon as it is done, and a failing part is recorded, so one lease yields what it can.
    # The training step first: it is what a lease is most wanted for.
    if args.only in (None, "training_step"):
        with tempfile.TemporaryDirectory() as tmp, recorded(result, "training_step", args.out):
            batch_size = 8 if args.quick else args.step_batch_size
            # A pass must hold several batches per worker: each worker builds whole batches, so with fewer batches
            # than workers most workers idle and the step waits for one worker's batch (what an earlier run timed).
            num_images = args.step_images or (64 if args.quick else 2 * args.workers * batch_size)
            screen = Path(tmp) / "screen"
            result_screen = render_screen(screen, num_images, image_size=32 if args.quick else 224)
            argv_step = ["--max_train_steps", "100000", "--output_dir", str(Path(tmp) / "unused"), "--seed", "0",
                         "--dataset_name", str(screen), "--dataloader_num_workers", str(args.workers),
                         "--mixed_precision", mixed_precision, "--per_device_train_batch_size", str(batch_size)]
            if not args.quick:
                argv_step += ["--model_preset", "vit-small-patch16", "--global_crop_size", "224",
                              "--local_crop_size", "96", "--num_local_crops", "6", "--out_dim", "4096",
                              "--head_hidden_dim", "2048", "--head_bottleneck_dim", "256"]
            steps = max(1, result_screen // batch_size)  # one pass over the screen per timed repeat
            result["training_step"] = training_step(device, mixed_precision, argv_step, steps, 5,
                                                    peak_start["best_flops"])
            result["training_step"]["screen_images"] = result_screen
    if args.only in (None, "inference"):
        with recorded(result, "inference", args.out):
            result["inference"] = {"dims": dims, "channels": 5, "repeats": repeats, "forwards_per_repeat": inner,
                                   "points": inference(device, dtype, dims, sizes, batches, repeats, inner,
                                                       peak_start["best_flops"])}
    if args.only in (None, "cuda_graphs") and device.type == "cuda":
        with recorded(result, "inference_cuda_graphs", args.out):
            result["inference_cuda_graphs"] = inference_cuda_graphs(device, dtype, dims, sizes, [1, 8, 32], repeats,
                                                                    inner)
    peak_end = matmul_peak(device, dtype, peak_size)
    result["matmul_peak"] = {"best_flops": max(peak_start["best_flops"], peak_end["best_flops"]),
                             "measurements": [peak_start, peak_end],
                             "note": "MFU uses the start-of-run measurement"}
    write_result(result, args.out)


@contextlib.contextmanager
def recorded(result: dict, part: str, out: str):
    try:
        yield
    except Exception as error:  # noqa: BLE001 - a benchmark part failing must not lose the others' numbers
        import traceback

        result[f"{part}_error"] = "".join(traceback.format_exception(error))[-4000:]
        print(f"{part} failed: {error!r}", flush=True)
    write_result(result, out)


if __name__ == "__main__":
    main()

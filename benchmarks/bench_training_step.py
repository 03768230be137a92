"""The whole CDCL / DINO training step, with its time split across the parts, and its MFU.

Uses the real training components (`cdcl_hf.training.data.build_train_data`, `components`, `step.train_step`), so
it measures what `cdcl-train` runs. Per configuration (tiny preset on the real BBBC021 crops; ViT-S/16 with 2 global
224 px + 6 local 96 px views on a synthetic 5-channel screen) it builds five runs in one process:
- `cdcl`: `--method cdcl`, the data path as shipped (decoded-image cache on);
- `cdcl_no_cache`: the same with the decoded-image cache off (the code before issue 10: every image and every
  partner decoded from its PNG planes each time it is drawn);
- `dino`, `dino_no_cache`: `--method dino` (partner = the image itself, decoded once), with and without the cache;
- `cdcl_batched_views`: `cdcl` with `--batched_views` (the loader yields prepared pairs; the views of each batch are
  cut at once with `MultiCropAugmentation.crop_batch`, as `training.loop` does, and timed as `views`);
- `cdcl_blas`: `cdcl` with `--cpu_linear_kernel blas` (the linear layers on torch's default kernel, the BLAS, instead of
  oneDNN's: `cdcl_hf.cpu_kernels`),
and times `steps` steps of each, interleaved round-robin, `repeats` times; the ratios are per repeat.
The split (decode, views = multi-crop augmentation, collate+pairing = rest of the loader, teacher forward, student
forward, loss, backward + clip = rest of the step, optimizer, EMA) comes from timers wrapped around those calls.
Every run's step runs under its `--cpu_linear_kernel`, as `training.loop` does. MFU = FLOPs of one step
(torch.utils.flop_counter, counted on torch's own linear) / step time / the fp32 matmul peak measured in the same run
(the better of torch.mm and oneDNN's linear: `common.matmul_peak_flops`).

Run: python benchmarks/bench_training_step.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from cdcl_hf.cpu_kernels import cpu_linear_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    best_of,
    interleaved,
    machine,
    matmul_peak_flops,
    ratios,
    summary,
    write_result,
)

SHARED_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021_crops"


class _Timers:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.enabled = True

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed


class _Run:
    """One training run (data, student, teacher, optimizer, objective) that can be stepped and timed."""

    def __init__(self, accelerator, argv: list[str], cache: bool):
        import cdcl_hf.training.step as step_module
        from cdcl_hf.training.arguments import parse_args
        from cdcl_hf.training.components import (
            TrainingSchedules,
            build_objective,
            build_optimizer,
            build_student_teacher,
        )
        from cdcl_hf.training.data import build_train_data

        self.step_module = step_module
        self.args = parse_args(argv)
        self.accelerator = accelerator
        self.timers = _Timers()
        data = build_train_data(self.args, accelerator)
        dataset = data.dataloader.dataset
        if not cache:
            dataset.cache_bytes = 0
        dataset.image_loader = self.timers.wrap("decode", dataset.image_loader)
        dataset.load_image = self.timers.wrap("load", dataset.load_image)
        dataset.transform = self.timers.wrap("views", dataset.transform)
        student, teacher = build_student_teacher(self.args, data.num_channels, data.channel_names)
        teacher.to(accelerator.device)
        optimizer = build_optimizer(student, self.args)
        student, optimizer, dataloader = accelerator.prepare(student, optimizer, data.dataloader)
        self.schedules = TrainingSchedules.for_run(self.args, dataloader)
        self.objective = build_objective(self.args, data.num_domains, self.schedules, accelerator)
        teacher.forward = self.timers.wrap("teacher_forward", teacher.forward)
        student.forward = self.timers.wrap("student_forward", student.forward)
        self.objective.forward = self.timers.wrap("loss", self.objective.forward)
        optimizer.step = self.timers.wrap("optimizer", optimizer.step)
        self.student, self.teacher, self.optimizer, self.dataloader = student, teacher, optimizer, dataloader
        self.batch_size = self.args.per_device_train_batch_size
        # --batched_views: the loader yields prepared pairs and the views are cut per batch, as training.loop does.
        self.batched_views = data.augmentation if self.args.batched_views else None
        self.global_step = 0
        self.batches = self._batches()
        student.train()

    def _batches(self):
        for epoch in itertools.count():
            self.dataloader.set_epoch(epoch)
            yield from self.dataloader

    def _next_batch(self) -> dict:
        batch = next(self.batches)
        if self.batched_views is not None:
            from cdcl_hf.training.data import cut_batch_views

            start = time.perf_counter()
            generator = torch.Generator(device=batch["image"].device).manual_seed(self.global_step)
            batch = cut_batch_views(batch, self.batched_views, generator)
            if self.timers.enabled:
                self.timers.seconds["views"] += time.perf_counter() - start
        return batch

    def step(self) -> None:
        start = time.perf_counter()
        batch = self._next_batch()
        self.timers.seconds["data"] += time.perf_counter() - start
        start = time.perf_counter()
        update = self.step_module.update_teacher_ema
        self.step_module.update_teacher_ema = self.timers.wrap("ema", update)
        try:
            with cpu_linear_kernel(self.args.cpu_linear_kernel, self.accelerator.device):
                self.step_module.train_step(
                    self.accelerator, batch, self.student, self.teacher, self.objective, self.optimizer, self.schedules,
                    self.global_step % self.schedules.max_train_steps, self.args.max_grad_norm,
                    self.args.freeze_last_layer_epochs,
                )
        finally:
            self.step_module.update_teacher_ema = update
        self.timers.seconds["step"] += time.perf_counter() - start
        self.global_step += 1

    def step_flops(self) -> int:
        from torch.utils.flop_counter import FlopCounterMode

        self.timers.enabled = False
        batch = self._next_batch()
        # Without the kernel context: the counter knows the FLOPs of aten's linear, not of oneDNN's op; the math is
        # the same whichever kernel runs it.
        counter = FlopCounterMode(display=False)
        with counter:
            self.step_module.train_step(
                self.accelerator, batch, self.student, self.teacher, self.objective, self.optimizer, self.schedules,
                self.global_step % self.schedules.max_train_steps, self.args.max_grad_norm,
                self.args.freeze_last_layer_epochs,
            )
        self.global_step += 1
        self.timers.enabled = True
        return int(counter.get_total_flops())

    def split(self, steps: int) -> dict:
        """Milliseconds per step spent in each part, over the `steps` timed steps, and their fractions."""
        s = self.timers.seconds
        total = s["data"] + s["step"]
        parts = {
            "row_fetch": s["load"] - s["decode"],
            "decode": s["decode"],
            "views": s["views"],
            "collate_and_pairing": s["data"] - s["load"] - s["views"],
            "teacher_forward": s["teacher_forward"],
            "student_forward": s["student_forward"],
            "loss": s["loss"],
            "optimizer": s["optimizer"],
            "ema": s["ema"],
        }
        parts["backward_clip_other"] = s["step"] - sum(
            parts[k] for k in ("teacher_forward", "student_forward", "loss", "optimizer", "ema")
        )
        return {
            "ms_per_step": {k: round(1e3 * v / steps, 3) for k, v in parts.items()},
            "fraction": {k: round(v / total, 4) for k, v in parts.items()},
        }


def _build_real_screen(folder: Path) -> str:
    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    build_screen_dataset(folder_source(SHARED_CROPS / "metadata.csv", image_root=SHARED_CROPS / "images"), output_dir=folder)
    return str(folder)


def bench_config(name: str, common_argv: list[str], steps: int, repeats: int, warmup_steps: int) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    runs = {}
    with contextlib.redirect_stderr(io.StringIO()):
        for run_name, method, cache, extra in (
            ("cdcl", "cdcl", True, []), ("cdcl_no_cache", "cdcl", False, []), ("dino", "dino", True, []),
            ("dino_no_cache", "dino", False, []), ("cdcl_batched_views", "cdcl", True, ["--batched_views"]),
            ("cdcl_blas", "cdcl", True, ["--cpu_linear_kernel", "blas"]),
        ):
            torch.manual_seed(0)
            runs[run_name] = _Run(accelerator, [*common_argv, "--method", method, *extra], cache)
    for run in runs.values():  # warm-up: first epoch fills the cache, allocator warms up
        for _ in range(warmup_steps):
            run.step()
        run.timers.seconds.clear()

    def candidate(run):
        return lambda: [run.step() for _ in range(steps)]

    times = interleaved({k: candidate(r) for k, r in runs.items()}, repeats=repeats, warmup=0)
    batch = runs["cdcl"].batch_size
    flops = {k: r.step_flops() for k, r in runs.items()}
    result = {"config": name, "argv": common_argv, "batch_size": batch, "steps_per_repeat": steps,
              "warmup_steps": warmup_steps, "runs": {}}
    for k, run in runs.items():
        step_s = [t / steps for t in times[k]]
        result["runs"][k] = {
            "step_seconds": summary(step_s),
            "images_per_s": summary([batch / t for t in step_s], 2),
            "flops_per_step": flops[k],
            "_step_seconds": step_s,
            "time_split": run.split(steps * repeats),
        }
    result["cdcl_over_dino_time"] = summary(ratios(times, "cdcl", "dino"), 3)
    result["cdcl_no_cache_over_dino_time"] = summary(ratios(times, "cdcl_no_cache", "dino"), 3)
    result["cdcl_no_cache_over_dino_no_cache_time"] = summary(ratios(times, "cdcl_no_cache", "dino_no_cache"), 3)
    result["cdcl_over_cdcl_no_cache_time"] = summary(ratios(times, "cdcl", "cdcl_no_cache"), 3)
    result["cdcl_batched_views_over_cdcl_time"] = summary(ratios(times, "cdcl_batched_views", "cdcl"), 3)
    result["cdcl_blas_over_cdcl_time"] = summary(ratios(times, "cdcl_blas", "cdcl"), 3)
    print(f"{name}: cdcl/dino {result['cdcl_over_dino_time']}, without the cache "
          f"{result['cdcl_no_cache_over_dino_no_cache_time']}, blas/onednn {result['cdcl_blas_over_cdcl_time']}",
          flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny sizes, few steps)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "training_step.json"))
    parser.add_argument("--only", default=None, help="run only the configurations whose name contains this")
    args = parser.parse_args(argv)
    peak_start = matmul_peak_flops()
    configs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = ["--max_train_steps", "100000", "--output_dir", str(tmp / "unused"), "--seed", "0"]
        if SHARED_CROPS.is_dir():
            screen = _build_real_screen(tmp / "bbbc021")
            tiny = [*base, "--dataset_name", screen, "--domain_column", "batch", "--model_preset", "tiny",
                    "--resize_to", "64"]
            if args.quick:
                configs.append(("tiny/bbbc021-crops", [*tiny, "--per_device_train_batch_size", "16"], 2, 3, 2))
            else:
                # 31 batches of 32 per epoch: warm up one epoch (the cache fills), then time whole epochs' worth.
                configs.append(("tiny/bbbc021-crops", [*tiny, "--per_device_train_batch_size", "32"], 10, 7, 31))
        else:
            print(f"{SHARED_CROPS} not found: skipping the real-crop configuration")
        synthetic = [*base, "--dataset_name", "synthetic", "--synthetic_num_channels", "5"]
        if args.quick:
            configs.append(("tiny/synthetic-5ch", [*synthetic, "--synthetic_num_images", "64",
                                                   "--per_device_train_batch_size", "8"], 1, 3, 1))
        else:
            vits = [*synthetic, "--synthetic_num_images", "64", "--synthetic_image_size", "256",
                    "--model_preset", "vit-small-patch16", "--global_crop_size", "224", "--local_crop_size", "96",
                    "--num_local_crops", "6", "--out_dim", "4096", "--head_hidden_dim", "2048",
                    "--head_bottleneck_dim", "256", "--per_device_train_batch_size", "4"]
            configs.append(("vit-s16/synthetic-5ch", vits, 1, 5, 1))
        configs = [c for c in configs if args.only is None or args.only in c[0]]
        results = [bench_config(*config) for config in configs]
    peak = best_of(peak_start, matmul_peak_flops())
    for result in results:
        for run in result["runs"].values():
            run["mfu"] = summary([run["flops_per_step"] / t / peak["best_flops"] for t in run.pop("_step_seconds")])
    write_result({
        "benchmark": "training step (cdcl vs dino), time split, MFU",
        "quick": args.quick,
        "machine": machine(),
        "matmul_peak": peak,
        "target": "cdcl step time <= 1.15x dino step time; MFU >= 0.5 for ViT-S/16",
        "results": results,
    }, args.out)


if __name__ == "__main__":
    main()

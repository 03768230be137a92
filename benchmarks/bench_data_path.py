"""The data path: decoded (and augmented) images/s from a saved screen dataset, and the storage alternatives.

Two screens, each saved with the package's builder (`save_to_disk`, 2 shards so 2 stream workers each get one):
- the 1,000 real BBBC021 crops (68x68x3 uint16, /work/shared/data) via `build_screen_dataset(folder_source(...))`;
- a few synthetic 1024x1280x5 uint16 fields (smooth background + blobs + shot noise) via `dataset_from_arrays`.
Each is read map-style (`load_screen`, shuffled) and streamed (`load_screen(streaming=True)`), with 0 and 2
DataLoader workers; per item the worker does `decode_image` (PNG planes -> uint16 array -> float tensor) and, in the
`decode+views` rows, the multi-crop views `cdcl-train` cuts with its default settings. The `decode+batched views` rows
are `cdcl-train --batched_views`: the workers decode and collate batches of 32, and the main process cuts the same views
for the whole batch at once (`MultiCropAugmentation.crop_batch`), as the training loop does. A pass's time
counts from the first item asked for to the last received; workers are persistent and the timed passes follow an
untimed one, so worker start-up is left out (it is reported on its own). Candidates run round-robin, `repeats`
times; images/s median and spread.

Storage: per image (one crop / one field), the stored size and the decode time of each channel plane as PNG at
zlib levels 0, 1, 3 (the schema's default, `screen_data.PNG_COMPRESS_LEVEL`), 6, 9 and as raw little-endian arrays,
plus the cost of fetching a row from the arrow table with and without the `Image` feature's decoding.

Run: python benchmarks/bench_data_path.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS_DIR, interleaved, machine, summary, write_result  # noqa: E402

SHARED_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "bbbc021_crops"


def _decode(row):
    from cdcl_hf.image_io import decode_image

    return torch.from_numpy(decode_image(row["image"]).astype(np.float32))


class _DecodeViews:
    """Picklable per-item work: decode, and optionally the training's multi-crop views."""

    def __init__(self, views: bool):
        from cdcl_hf.training.arguments import parse_args
        from cdcl_hf.training.data import _multicrop_augmentation

        # The views `cdcl-train` cuts with its default settings (2 global 32 px + 4 local 16 px).
        self.augmentation = _multicrop_augmentation(parse_args([])) if views else None

    def __call__(self, row):
        image = _decode(row)
        if self.augmentation is None:
            return image.shape[0]
        out = self.augmentation(image, generator=torch.Generator().manual_seed(0))
        return out["global_crops"].shape[0]


class _DecodeBatch:
    """Picklable per-batch work in the workers for batched views: decode each item, stack them."""

    def __call__(self, rows):
        return torch.stack([_decode(row) for row in rows])


class _BatchedViews:
    """The main process's work per batch with `--batched_views`: the views of the whole batch at once."""

    def __init__(self):
        from cdcl_hf.training.arguments import parse_args
        from cdcl_hf.training.data import _multicrop_augmentation

        self.augmentation = _multicrop_augmentation(parse_args([]))

    def __call__(self, images):
        out = self.augmentation.crop_batch(images, generator=torch.Generator().manual_seed(0))
        return out["global_crops"].shape[0]


BATCHED_VIEWS_BATCH = 32  # as cdcl-train's default --per_device_train_batch_size


def _synthetic_fields(count: int, height: int, width: int, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    fields = np.empty((count, channels, height, width), np.uint16)
    for i in range(count):
        for c in range(channels):
            signal = np.full((height, width), 400.0, np.float32)
            for _ in range(40):  # cells: smooth blobs
                y, x, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 30)
                signal += rng.uniform(500, 4000) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
            fields[i, c] = np.clip(rng.poisson(signal), 0, 65535)
    return fields


def _build_fields_screen(folder: Path, count: int, shape: tuple[int, int, int]) -> Path:
    from cdcl_hf.screen_data import dataset_from_arrays

    channels, height, width = shape
    fields = _synthetic_fields(count, height, width, channels)
    metadata = pd.DataFrame({
        "plate": [f"P{i % 2}" for i in range(count)], "well": [f"A{i:02d}" for i in range(count)],
        "site": ["1"] * count, "batch": [f"B{i % 2}" for i in range(count)],
        "compound": ["DMSO" if i % 2 else "taxol" for i in range(count)], "concentration": [0.0] * count,
        "is_control": [bool(i % 2) for i in range(count)],
    })
    dataset_from_arrays(fields, metadata).save_to_disk(str(folder), num_shards=2)
    return folder


def _build_crops_screen(folder: Path, limit: int | None) -> Path:
    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    metadata = SHARED_CROPS / "metadata.csv"
    if limit is not None:  # a smoke run: the first `limit` crops
        table = pd.read_csv(metadata, dtype=str, keep_default_na=False)
        metadata = folder.parent / "crops_subset.csv"
        table.head(limit).to_csv(metadata, index=False)
    build_screen_dataset(folder_source(metadata, image_root=SHARED_CROPS / "images"), output_dir=folder, num_shards=2)
    return folder


def _loader(folder: Path, streamed: bool, workers: int, work: str, limit: int | None):
    from cdcl_hf.screen_data import load_screen

    screen = load_screen(str(folder), streaming=streamed)
    if not streamed and limit is not None:
        screen = screen.select(range(min(limit, len(screen))))
    sampler = None if streamed else torch.utils.data.RandomSampler(screen, generator=torch.Generator().manual_seed(0))
    if work == "decode+batched views":
        return torch.utils.data.DataLoader(screen, batch_size=BATCHED_VIEWS_BATCH, sampler=sampler, num_workers=workers,
                                           collate_fn=_DecodeBatch(), persistent_workers=workers > 0)
    return torch.utils.data.DataLoader(screen, batch_size=None, sampler=sampler, num_workers=workers,
                                       collate_fn=_DecodeViews(work == "decode+views"), persistent_workers=workers > 0)


def _pass(loader, views: _BatchedViews | None) -> int:
    """Items through one pass of `loader`, with the main process's batched `views` when given."""
    if views is not None:
        return sum(views(images) for images in loader)
    return sum(1 for _ in loader)


def bench_throughput(name: str, folder: Path, repeats: int, views_too: bool, limit: int | None) -> list[dict]:
    candidates, loaders, startup = {}, {}, {}
    works = ("decode", "decode+views", "decode+batched views") if views_too else ("decode",)
    for streamed in (False, True):
        for workers in (0, 2):
            for work in works:
                key = f"{'streamed' if streamed else 'map'}/w{workers}/{work}"
                loader = _loader(folder, streamed, workers, work, limit)
                views = _BatchedViews() if work == "decode+batched views" else None
                start = time.perf_counter()
                count = _pass(loader, views)  # untimed pass: starts the workers, warms the page cache
                startup[key] = time.perf_counter() - start
                loaders[key] = (loader, count)
                candidates[key] = (lambda loader=loader, views=views: _pass(loader, views))
    times = interleaved(candidates, repeats=repeats, warmup=0)
    rows = []
    for key, (_unused, count) in loaders.items():
        layout, workers, work = key.split("/")
        rows.append({
            "screen": name, "access": layout, "workers": int(workers[1:]), "work": work, "items": count,
            "images_per_s": summary([count / t for t in times[key]], 1),
            "first_pass_s_incl_worker_start": round(startup[key], 3),
        })
        print(f"{name} {key}: {rows[-1]['images_per_s']}")
    loaders.clear()  # shuts the persistent workers down
    candidates.clear()
    return rows


def _png_planes(array: np.ndarray, level: int) -> list[bytes]:
    from PIL import Image

    out = []
    for plane in array:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(plane)).save(buffer, format="PNG", compress_level=level)
        out.append(buffer.getvalue())
    return out


def _decode_png_planes(planes: list[bytes]) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in planes])


def bench_storage(name: str, images: list[np.ndarray], repeats: int) -> list[dict]:
    """Stored bytes and decode time per image for PNG levels and raw arrays (interleaved)."""
    encoded = {f"png{level}": [_png_planes(a, level) for a in images] for level in (0, 1, 3, 6, 9)}
    encode_s = {}
    for level in (0, 1, 3, 6, 9):
        start = time.perf_counter()
        _png_planes(images[0], level)
        encode_s[f"png{level}"] = time.perf_counter() - start
    encoded["raw"] = [[np.ascontiguousarray(a).astype("<u2").tobytes()] for a in images]
    shape = images[0].shape

    def decoder(kind):
        if kind == "raw":
            return lambda: [np.frombuffer(p[0], "<u2").reshape(shape) for p in encoded["raw"]]
        return lambda: [_decode_png_planes(p) for p in encoded[kind]]

    for kind in encoded:
        if kind != "raw":
            assert np.array_equal(_decode_png_planes(encoded[kind][0]), images[0])
    times = interleaved({k: decoder(k) for k in encoded}, repeats=repeats, warmup=1)
    raw_bytes = images[0].nbytes
    rows = []
    for kind in encoded:
        size = np.mean([sum(len(p) for p in planes) for planes in encoded[kind]])
        per_image = [t / len(images) for t in times[kind]]
        rows.append({
            "screen": name, "storage": kind, "bytes_per_image": int(size), "fraction_of_raw": round(size / raw_bytes, 3),
            "decode_us_per_image": summary([1e6 * t for t in per_image], 1),
            "decodes_per_s": summary([1 / t for t in per_image], 1),
            "encode_ms_per_image": round(1e3 * encode_s.get(kind, 0.0), 3) if kind != "raw" else 0.0,
        })
        print(f"{name} storage {kind}: {rows[-1]['fraction_of_raw']} of raw, {rows[-1]['decodes_per_s']['median']}/s")
    return rows


def bench_row_fetch(name: str, folder: Path, repeats: int, count: int) -> dict:
    """Seconds per row fetched from the arrow table: the `Image` feature decoding to PIL, vs its bytes only."""
    import datasets

    from cdcl_hf.screen_data import load_screen

    screen = load_screen(str(folder))
    raw = screen.cast_column("image", datasets.Sequence(datasets.Image(decode=False)))
    items = list(range(min(count, len(screen))))
    times = interleaved({
        "pil": lambda: [_decode(screen[i]) for i in items],
        "bytes": lambda: [_decode(raw[i]) for i in items],
    }, repeats=repeats, warmup=1)
    return {
        "screen": name,
        "row_plus_decode_us": {k: summary([1e6 * t / len(items) for t in v], 1) for k, v in times.items()},
        "pil_over_bytes_time": summary([a / b for a, b in zip(times["pil"], times["bytes"], strict=True)], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run (few items, few repeats)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "data_path.json"))
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else 5
    field_count = 2 if args.quick else 6
    field_shape = (5, 256, 320) if args.quick else (5, 1024, 1280)
    throughput, storage, row_fetch = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if SHARED_CROPS.is_dir():
            crops = _build_crops_screen(tmp / "crops", limit=200 if args.quick else None)
            throughput += bench_throughput("crops 68x68x3", crops, repeats, views_too=True, limit=None)
            from cdcl_hf.screen_data import load_screen

            screen = load_screen(str(crops))
            sample = [_decode(screen[i]).numpy().astype(np.uint16) for i in range(20 if args.quick else 100)]
            storage += bench_storage("crops 68x68x3", sample, repeats)
            row_fetch.append(bench_row_fetch("crops 68x68x3", crops, repeats, 50 if args.quick else 500))
        else:
            print(f"{SHARED_CROPS} not found: skipping the real crops")
        label = f"fields {field_shape[1]}x{field_shape[2]}x{field_shape[0]}"
        fields = _build_fields_screen(tmp / "fields", field_count, field_shape)
        throughput += bench_throughput(label, fields, repeats, views_too=False, limit=None)
        storage += bench_storage(label, list(_synthetic_fields(2, field_shape[1], field_shape[2], field_shape[0])),
                                 repeats)
    write_result({
        "benchmark": "data path: decoded images/s from a saved screen; storage alternatives",
        "quick": args.quick,
        "machine": machine(),
        "target": ">= 1000 crops/s on 2 cores (68x68x3 crops)",
        "throughput": throughput,
        "storage": storage,
        "row_fetch": row_fetch,
    }, args.out)


if __name__ == "__main__":
    main()

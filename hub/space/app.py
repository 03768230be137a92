"""CDCL microscopy embeddings: a Gradio demo (a Hugging Face Space; `cdcl-push-space` publishes this folder).

Upload one multi-channel image (TIFF, NPY, PNG), one file per channel, or pick an example; the app shows a channel
composite, the image's embedding (download as .npy / .csv), the nearest reference treatments and their mechanisms of
action, and a 2-D map (PCA) of the references with the image placed on it. Fields larger than the model's input are
tiled, not resized.

Settings (environment variables; on a Space, set them under Settings -> Variables):

    CDCL_MODEL      the model: a Hub repo id or a local checkpoint folder. Default: the first entry of `models:` in
                    this folder's README.md front matter.
    CDCL_REVISION   the model's branch, tag or commit (default: main).
    CDCL_PROFILES   the reference profiles: a profile parquet written by `cdcl-evaluate` with this model
                    (profiles_well.parquet or profiles_image.parquet: `Metadata_*` columns + `emb_*` features; not
                    profiles_evaluated.parquet, whose features are corrected per plate). Default: profiles.parquet
                    beside this file, if there is one.
    CDCL_REFERENCE_LABEL  the metadata column references are grouped by (default: Metadata_Treatment).

Run locally: `pip install -r requirements.txt && CDCL_MODEL=org/cdcl-vit python app.py`.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

matplotlib.use("Agg")  # no display on a Space
import matplotlib.pyplot as plt  # noqa: E402

try:  # on the Space: the pipeline file cdcl-push-space copies beside this one
    from pipeline_cdcl import CDCLMicroscopyPipeline, channels_first, load_image, read_channels
except ImportError:  # in a checkout of cdcl-hf
    from cdcl_hf.pipeline_cdcl import CDCLMicroscopyPipeline, channels_first, load_image, read_channels

APP_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = APP_DIR / "examples"
IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
METADATA_PREFIX, FEATURE_PREFIX = "Metadata_", "emb_"
# CellProfiler / pycytominer names (cdcl-evaluate writes them); the lower-case ones of profiles written before it did.
LABEL_COLUMNS = ("Metadata_Treatment", "Metadata_Compound", "Metadata_moa", "Metadata_treatment", "Metadata_compound")
MOA_COLUMN = "Metadata_moa"
NEIGHBOURS = 5
# Colours of channels 0, 1, 2, ... in the composite (additive): the usual DNA-blue first, then green, red, ...
PALETTE = np.array([(0.1, 0.4, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)])
PALETTE_NAMES = ("blue", "green", "red", "magenta", "yellow", "cyan")
MIN_DISPLAY = 256  # pixels: crops smaller than this are shown enlarged


class UploadError(ValueError):
    """A problem with what the user uploaded or typed; shown to them as is."""


# ---- settings ------------------------------------------------------------------------------------------------


def default_model() -> str | None:
    """The model the app shows: `CDCL_MODEL`, else the first `models:` entry of this folder's README front matter."""
    if os.environ.get("CDCL_MODEL"):
        return os.environ["CDCL_MODEL"]
    readme = APP_DIR / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if text.startswith("---"):
            front_matter = yaml.safe_load(text.split("---", 2)[1]) or {}
            models = front_matter.get("models") or []
            if models:
                return str(models[0])
    return None


def default_profiles() -> Path | None:
    if os.environ.get("CDCL_PROFILES"):
        return Path(os.environ["CDCL_PROFILES"])
    bundled = APP_DIR / "profiles.parquet"
    return bundled if bundled.is_file() else None


# ---- references ----------------------------------------------------------------------------------------------


@dataclass
class References:
    """Reference profiles grouped by a label (treatment), with their 2-D PCA map."""

    table: pd.DataFrame  # one row per label: label, moa (may be missing), n (profiles averaged)
    features: np.ndarray  # (labels, dim), the median profile of each label
    label_column: str
    mean: np.ndarray  # PCA centre
    axes: np.ndarray  # (2, dim) principal axes

    @classmethod
    def from_parquet(cls, path: str | os.PathLike, label_column: str | None = None) -> References:
        """Read a `cdcl-evaluate` profile parquet and take the median profile of each label.

        Args:
            path (`str` or `os.PathLike`): The parquet (`Metadata_*` columns + `emb_*` features).
            label_column (`str`, *optional*): The column to group by; default: the first of Metadata_Treatment,
                Metadata_Compound, Metadata_moa the table has.

        Raises:
            ValueError: The file holds no embedding features or no label column.
        """
        profiles = pd.read_parquet(path)
        feature_columns = [c for c in profiles.columns if str(c).startswith(FEATURE_PREFIX)]
        if not feature_columns:
            raise ValueError(
                f"reference profiles {path} have no {FEATURE_PREFIX}* feature columns; pass a profile parquet written "
                "by cdcl-evaluate (profiles_well.parquet or profiles_image.parquet)"
            )
        candidates = [label_column] if label_column else [c for c in LABEL_COLUMNS if c in profiles.columns]
        if not candidates or candidates[0] not in profiles.columns:
            raise ValueError(
                f"reference profiles {path} have no label column {label_column or list(LABEL_COLUMNS)}; their metadata "
                f"columns are {[c for c in profiles.columns if str(c).startswith(METADATA_PREFIX)]}"
            )
        label = candidates[0]
        profiles = profiles.dropna(subset=[label])
        rows, features = [], []
        for value, group in profiles.groupby(label, sort=True):
            moas = group[MOA_COLUMN].dropna().astype(str) if MOA_COLUMN in group else pd.Series([], dtype=str)
            moa = Counter(moas).most_common(1)[0][0] if len(moas) else ""
            rows.append({"label": str(value), "moa": moa, "n": len(group)})
            features.append(np.median(group[feature_columns].to_numpy(np.float64), axis=0))
        matrix = np.stack(features)
        mean = matrix.mean(axis=0)
        # The two leading principal axes of the reference profiles (needs at least 2 distinct references).
        _, _, vt = np.linalg.svd(matrix - mean, full_matrices=False)
        axes = vt[:2] if vt.shape[0] >= 2 else np.vstack([vt, np.zeros_like(vt)])[:2]
        return cls(pd.DataFrame(rows), matrix, label, mean, axes)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def nearest(self, embedding: np.ndarray, k: int = NEIGHBOURS) -> pd.DataFrame:
        """The `k` references most cosine-similar to `embedding`, best first."""
        unit = self.features / np.linalg.norm(self.features, axis=1, keepdims=True).clip(1e-12)
        similarity = unit @ (embedding / max(np.linalg.norm(embedding), 1e-12))
        order = np.argsort(-similarity)[:k]
        # Lower case whatever the column's spelling (Metadata_Treatment, Metadata_treatment): the header is a word.
        name = self.label_column.removeprefix(METADATA_PREFIX).lower()
        return pd.DataFrame({
            "rank": np.arange(1, len(order) + 1),
            name: self.table["label"].to_numpy()[order],
            "MoA": self.table["moa"].to_numpy()[order],
            "cosine similarity": np.round(similarity[order], 4),
            "profiles": self.table["n"].to_numpy()[order],
        })

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(vectors) - self.mean) @ self.axes.T

    def map_image(self, embedding: np.ndarray, nearest_label: str) -> np.ndarray:
        """The references' 2-D PCA map, coloured by MoA, with the query as a star; an RGB array."""
        points, query = self.project(self.features), self.project(embedding)[0]
        figure, axis = plt.subplots(figsize=(8.5, 5.5), dpi=100)
        moas = self.table["moa"].replace("", "unknown")
        for index, moa in enumerate(sorted(moas.unique())):
            chosen = (moas == moa).to_numpy()
            axis.scatter(points[chosen, 0], points[chosen, 1], s=28, alpha=0.8, label=moa, color=plt.cm.tab20(index % 20))
        axis.scatter([query[0]], [query[1]], marker="*", s=320, color="black", edgecolor="white", label="your image",
                     zorder=5)
        best = int(np.flatnonzero(self.table["label"].to_numpy() == nearest_label)[0])
        axis.annotate(f"nearest: {nearest_label}", points[best], xytext=(6, 6), textcoords="offset points", fontsize=8)
        axis.set_xlabel("PC 1")
        axis.set_ylabel("PC 2")
        axis.set_title("Reference profiles (PCA) and your image")
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over
        figure.tight_layout()
        figure.canvas.draw()
        image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
        plt.close(figure)
        return image


# ---- images --------------------------------------------------------------------------------------------------


def composite(pixels: np.ndarray | Image.Image) -> np.ndarray:
    """An 8-bit RGB picture of a (C, H, W) image: each channel stretched (0.5-99.5 percentile) and coloured; a small
    image (a single-cell crop) is enlarged by the largest whole factor (pixel replication) that keeps it within
    `MIN_DISPLAY` pixels."""
    if isinstance(pixels, Image.Image):
        return _enlarge(np.asarray(pixels.convert("RGB")))
    planes = pixels.astype(np.float32)
    low = np.percentile(planes, 0.5, axis=(1, 2), keepdims=True)
    high = np.percentile(planes, 99.5, axis=(1, 2), keepdims=True)
    scaled = np.clip((planes - low) / np.maximum(high - low, 1e-6), 0, 1)
    colours = PALETTE[np.arange(len(planes)) % len(PALETTE)]
    rgb = np.einsum("chw,ck->hwk", scaled, colours)
    return _enlarge((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def _enlarge(rgb: np.ndarray) -> np.ndarray:
    factor = max(1, MIN_DISPLAY // max(rgb.shape[:2]))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else rgb


def synthetic_example(num_channels: int, size: int, seed: int = 0) -> np.ndarray:
    """A (size, size, C) uint16 image of blurry "cells" (a bright nucleus channel, broader others); made, not measured."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(600.0, 40.0, size=(num_channels, size, size))
    for _ in range(max(3, size * size // 900)):
        y, x = rng.uniform(0, size, 2)
        for channel in range(num_channels):
            radius = rng.uniform(3, 5) if channel == 0 else rng.uniform(6, 11)
            image[channel] += rng.uniform(3000, 12000) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * radius**2))
    return np.moveaxis(np.clip(image, 0, 65535).astype(np.uint16), 0, -1)


def parse_statistics(text: str | None, name: str, num_channels: int) -> list[float] | None:
    """`"1200, 900, 3000"` -> floats (one per channel); empty -> None."""
    if text is None or not str(text).strip():
        return None
    try:
        values = [float(part) for part in str(text).replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise UploadError(f"{name}: expected {num_channels} comma-separated numbers, got {text!r}") from None
    if len(values) != num_channels:
        raise UploadError(f"{name}: expected {num_channels} numbers (one per channel), got {len(values)}: {text!r}")
    return values


# ---- the app -------------------------------------------------------------------------------------------------


def _paths(files) -> list[str]:
    """The uploaded files' paths (Gradio gives paths, or objects with a `name`, one or a list)."""
    if not files:
        return []
    return [str(getattr(f, "name", f)) for f in (files if isinstance(files, list | tuple) else [files])]


class Demo:
    """The model, its microscopy pipeline and the reference profiles; `embed` answers one upload."""

    def __init__(self, model: str, profiles: str | os.PathLike | None = None, revision: str | None = None,
                 label_column: str | None = None):
        device = 0 if torch.cuda.is_available() else -1
        network = AutoModel.from_pretrained(model, revision=revision, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(model, revision=revision, trust_remote_code=True)
        self.model_name = model
        self.pipeline = CDCLMicroscopyPipeline(model=network, image_processor=processor, device=device)
        self.num_channels = self.pipeline.num_channels
        names = getattr(processor, "channel_names", None) or getattr(network.config, "channel_names", None)
        self.channel_names = [str(n) for n in names] if names else [f"channel {c}" for c in range(self.num_channels)]
        self.references = References.from_parquet(profiles, label_column) if profiles else None
        self.output_dir = Path(tempfile.mkdtemp(prefix="cdcl-space-"))
        self.example_dir = self.output_dir / "examples"
        self.example_dir.mkdir()
        self.examples = self._examples()
        if self.references is not None:
            dim = self.pipeline(str(self.examples[0][0])).shape[0]
            if dim != self.references.dim:
                raise ValueError(
                    f"the reference profiles have {self.references.dim} features but {model} embeds into {dim}; "
                    "use profiles that cdcl-evaluate wrote with this model"
                )

    def _examples(self) -> list[list[str]]:
        """Bundled example files (examples/ beside the app), and a synthetic one made for this model."""
        size = max(self.pipeline.input_size) * 2  # larger than the input: shows the tiling
        path = self.example_dir / f"synthetic_{self.num_channels}ch_{size}px.npy"
        np.save(path, synthetic_example(self.num_channels, size))
        bundled = sorted(p for p in EXAMPLES_DIR.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if EXAMPLES_DIR.is_dir() else []
        return [[str(p)] for p in bundled] + [[str(path)]]

    def read(self, files: list[str]) -> tuple[object, str]:
        """The upload as the pipeline's input and as pixels for the composite, and a description."""
        if len(files) == 1:
            pixels = load_image(files[0], what=Path(files[0]).name)
            if not isinstance(pixels, Image.Image):
                pixels = channels_first(np.asarray(pixels), self.num_channels, what=Path(files[0]).name)
            return pixels, Path(files[0]).name
        ordered = sorted(files, key=lambda f: Path(f).name)
        if len(ordered) != self.num_channels:
            raise UploadError(
                f"got {len(ordered)} files; the model expects {self.num_channels} channels "
                f"({', '.join(self.channel_names)}): upload one multi-channel file, or one file per channel"
            )
        pixels = read_channels(ordered, self.num_channels)
        mapping = ", ".join(f"{Path(f).name} -> {n}" for f, n in zip(ordered, self.channel_names, strict=True))
        return pixels, f"one file per channel, in name order: {mapping}"

    def embed(self, files, tile, tile_size, tile_stride, image_mean, image_std):
        """Answer one upload: composite, summary, neighbours, map, downloads. A bad upload raises `gr.Error`."""
        try:
            return self._embed(files, tile, tile_size, tile_stride, image_mean, image_std)
        except (UploadError, ValueError, TypeError, OSError) as error:
            # What the user sent is the problem: say what, in one line, not a traceback, naming their files (not the
            # server's upload folder).
            message = " ".join(str(error).split())
            for path in _paths(files):
                message = message.replace(path, Path(path).name)
            raise gr.Error(message, title="Cannot embed this upload", print_exception=False) from None

    def _embed(self, files, tile, tile_size, tile_stride, image_mean, image_std):
        if not files:
            raise UploadError("upload an image first (a multi-channel TIFF / NPY / PNG, or one file per channel)")
        pixels, description = self.read(_paths(files))
        options = {"return_tiles": True}
        if isinstance(pixels, np.ndarray):
            options["channel_axis"] = "first"  # read() brought it to (C, H, W)
        options["tile_size"] = (int(tile_size) if tile_size else "auto") if tile else None
        if tile and tile_stride:
            options["tile_stride"] = int(tile_stride)
        mean = parse_statistics(image_mean, "plate mean", self.num_channels)
        std = parse_statistics(image_std, "plate std", self.num_channels)
        if (mean is None) != (std is None):
            raise UploadError("give both the plate mean and the plate std (one number per channel), or neither")
        if mean is not None:
            options.update(image_mean=mean, image_std=std)
        result = self.pipeline(pixels, **options)
        embedding = result["embedding"]

        height, width = result["image_size"]
        shape = f"{self.num_channels} x {height} x {width}"
        tiles = len(result["tile_offsets"])
        how = (f"{tiles} tiles of {result['tile_size'][0]} x {result['tile_size'][1]} px, averaged" if tiles > 1
               else "one input (resized by the image processor)")
        colours = ", ".join(f"{n}: {PALETTE_NAMES[c % len(PALETTE_NAMES)]}" for c, n in enumerate(self.channel_names))
        summary = [
            f"**{description}** ({shape}) -> {how} -> a {embedding.shape[0]}-dimensional embedding.",
            f"Composite colours: {colours}.",
        ]
        neighbours, map_image = None, None
        if self.references is not None:
            neighbours = self.references.nearest(embedding)
            best = neighbours.iloc[0]
            label = neighbours.columns[1]
            summary.append(
                f"Nearest reference {label}: **{best[label]}** (MoA: {best['MoA'] or 'unknown'}, cosine "
                f"{best['cosine similarity']:.3f})."
            )
            map_image = self.references.map_image(embedding, best[label])
        else:
            summary.append("No reference profiles are configured (CDCL_PROFILES), so there are no neighbours.")
        return composite(pixels), "\n\n".join(summary), neighbours, map_image, self._downloads(embedding, description)

    def _downloads(self, embedding: np.ndarray, description: str) -> list[str]:
        folder = Path(tempfile.mkdtemp(dir=self.output_dir))
        np.save(folder / "embedding.npy", embedding.astype(np.float32))
        row = pd.DataFrame([embedding], columns=[f"{FEATURE_PREFIX}{i:04d}" for i in range(embedding.shape[0])])
        row.insert(0, "image", description)
        row.to_csv(folder / "embedding.csv", index=False)
        return [str(folder / "embedding.npy"), str(folder / "embedding.csv")]


def build_demo(model: str | None = None, profiles: str | os.PathLike | None = None) -> tuple[gr.Blocks, Demo]:
    """The Gradio app and its state.

    Args:
        model (`str`, *optional*): Hub repo id or folder; default: `CDCL_MODEL` / the README's `models:` entry.
        profiles (`str` or `os.PathLike`, *optional*): Reference profile parquet; default: `CDCL_PROFILES` /
            profiles.parquet beside the app.

    Returns:
        `tuple[gr.Blocks, Demo]`: The app (launch it with `allowed_paths=[demo.output_dir]`) and its state.
    """
    model = model or default_model()
    if not model:
        raise SystemExit("no model: set CDCL_MODEL to a Hub repo id or a checkpoint folder")
    try:
        demo = Demo(model, profiles if profiles is not None else default_profiles(), os.environ.get("CDCL_REVISION"),
                    os.environ.get("CDCL_REFERENCE_LABEL"))
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot start the demo for the model {model!r} (CDCL_MODEL / README models:): {error}") from None
    with gr.Blocks(title="CDCL microscopy embeddings") as blocks:
        gr.Markdown(
            f"# CDCL microscopy embeddings\nModel: `{demo.model_name}` ({demo.num_channels} channels: "
            f"{', '.join(demo.channel_names)}; input {demo.pipeline.input_size[0]} px). Upload one multi-channel image "
            "(TIFF / NPY / PNG; raw 8- or 16-bit intensities) or one file per channel (taken in file-name order). "
            "Fields larger than the model's input are tiled, not resized."
        )
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Image file(s)", file_count="multiple", type="filepath")
                with gr.Accordion("Options", open=False):
                    tile = gr.Checkbox(value=True, label="Tile fields larger than the model's input (else resize)")
                    tile_size = gr.Number(value=0, precision=0, minimum=0, label="Tile size (0: the model's input)")
                    tile_stride = gr.Number(value=0, precision=0, minimum=0, label="Tile stride (0: the tile size)")
                    image_mean = gr.Textbox(label="Plate mean, one number per channel (optional)")
                    image_std = gr.Textbox(label="Plate std, one number per channel (optional)")
                button = gr.Button("Embed", variant="primary")
                gr.Examples(examples=demo.examples, inputs=[files], label="Examples")
            with gr.Column():
                picture = gr.Image(label="Channel composite", type="numpy", interactive=False)
                summary = gr.Markdown()
                downloads = gr.File(label="Embedding (.npy, .csv)", file_count="multiple", interactive=False)
        with gr.Row():
            neighbours = gr.Dataframe(label="Nearest reference treatments", interactive=False)
            projection = gr.Image(label="Reference map (PCA)", type="numpy", interactive=False)
        button.click(
            demo.embed,
            inputs=[files, tile, tile_size, tile_stride, image_mean, image_std],
            outputs=[picture, summary, neighbours, projection, downloads],
            api_name="embed",
        )
    return blocks, demo


if __name__ == "__main__":
    app, state = build_demo()
    app.launch(allowed_paths=[str(state.output_dir)])

"""The serving files of a published checkpoint: the microscopy pipeline (custom pipeline, remote code) and the
Inference Endpoints handler, on a custom `CDCLModel` checkpoint and on a stock `Dinov2Model` one."""

import ast
import base64
import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fresh_process import WITHOUT_CDCL_HF
from PIL import Image
from transformers import Dinov2Config, Dinov2Model, pipeline

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.pipeline_cdcl import TASK
from cdcl_hf.pipeline_cdcl import tile_offsets as shipped_tile_offsets
from cdcl_hf.profiling import tile_offsets as profiling_tile_offsets
from cdcl_hf.serving import CUSTOM_PIPELINES, SERVING_REQUIREMENTS, SHIPPED_SOURCES, write_serving_files

NUM_CHANNELS = 3
INPUT_SIZE = 32
# Raw 16-bit intensities, as BBBC021 stores them; the processor normalises with these per-channel statistics.
MEAN, STD = [3000.0, 2500.0, 4000.0], [900.0, 700.0, 1500.0]
REPO_ROOT = Path(__file__).resolve().parents[1]


def make_processor():
    return CDCLImageProcessor(
        num_channels=NUM_CHANNELS, size=INPUT_SIZE, normalization="per_channel", image_mean=MEAN, image_std=STD,
        channel_names=["DNA", "Tubulin", "Actin"],
    )


def export(folder: Path, model) -> Path:
    model.save_pretrained(folder)
    make_processor().save_pretrained(folder)
    write_serving_files(folder)
    return folder


@pytest.fixture(scope="module")
def cdcl_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return export(tmp_path_factory.mktemp("cdcl"), CDCLModel(CDCLConfig.from_preset("tiny", num_channels=NUM_CHANNELS)))


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory):
    """A stock Dinov2Model (no custom model code) with the CDCL image processor as custom code."""
    torch.manual_seed(1)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=INPUT_SIZE,
        patch_size=8, num_channels=NUM_CHANNELS,
    )
    folder = export(tmp_path_factory.mktemp("dinov2"), Dinov2Model(config))
    # A published 3-channel stock export's preprocessor_config.json also describes a stock ViTImageProcessor (the
    # publisher merges these fields in); with trust_remote_code its auto_map must still give the CDCL processor.
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    processor_config.update(image_processor_type="ViTImageProcessor", do_rescale=True, rescale_factor=65535 / 255,
                            do_normalize=True, resample=2, do_convert_rgb=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor_config, indent=2))
    return folder


@pytest.fixture(params=["cdcl", "dinov2"])
def checkpoint(request):
    return request.getfixturevalue({"cdcl": "cdcl_checkpoint", "dinov2": "stock_checkpoint"}[request.param])


def reference(checkpoint: Path):
    """The checkpoint's model and its CDCL image processor, loaded with the installed package (no pipeline)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(checkpoint).eval()
    return model, CDCLImageProcessor.from_pretrained(checkpoint)


def embed_directly(model, processor, images, **processor_kwargs) -> np.ndarray:
    """Pooled embeddings of (C, H, W) arrays or PIL images, processor + model, no pipeline."""
    if not isinstance(images[0], Image.Image):
        processor_kwargs["input_data_format"] = "channels_first"
    with torch.no_grad():
        pixel_values = processor(list(images), return_tensors="pt", **processor_kwargs)["pixel_values"]
        return model(pixel_values=pixel_values).pooler_output.numpy()


def random_field(seed: int, height: int = INPUT_SIZE, width: int = INPUT_SIZE) -> np.ndarray:
    """(C, H, W) uint16 with per-channel levels near the processor's statistics."""
    rng = np.random.default_rng(seed)
    levels = np.asarray(MEAN)[:, None, None]
    return np.clip(rng.normal(levels, np.asarray(STD)[:, None, None], size=(NUM_CHANNELS, height, width)), 0, 65535).astype(
        np.uint16
    )


# ---- the export folder -----------------------------------------------------------------------------------------


def test_write_serving_files_registers_the_pipeline(cdcl_checkpoint):
    config = json.loads((cdcl_checkpoint / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config["custom_pipelines"][TASK]["impl"] == "pipeline_cdcl.CDCLMicroscopyPipeline"
    # The model's own entries are kept.
    assert config["auto_map"] == {"AutoConfig": "configuration_cdcl.CDCLConfig", "AutoModel": "modeling_cdcl.CDCLModel"}
    assert config["num_channels"] == NUM_CHANNELS
    for name, source in SHIPPED_SOURCES.items():
        assert (cdcl_checkpoint / name).read_bytes() == source.read_bytes()
    assert (cdcl_checkpoint / "requirements.txt").read_text().split() == list(SERVING_REQUIREMENTS)

    before = {path.name: path.read_bytes() for path in cdcl_checkpoint.iterdir()}
    assert write_serving_files(cdcl_checkpoint) == ["pipeline_cdcl.py", "handler.py", "requirements.txt", "config.json"]
    assert {path.name: path.read_bytes() for path in cdcl_checkpoint.iterdir()} == before  # idempotent


def test_write_serving_files_refusals(tmp_path, cdcl_checkpoint):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_serving_files(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        write_serving_files(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"custom_pipelines": {TASK: {"impl": "other.Pipeline"}}}))
    with pytest.raises(ValueError, match="already registers 'other.Pipeline'"):
        write_serving_files(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an object"):
        write_serving_files(tmp_path)


def test_serving_requirements_follow_the_package_floor():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    transformers_pin = next(r for r in SERVING_REQUIREMENTS if r.startswith("transformers"))
    assert f'"{transformers_pin}"' in pyproject


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or "").split(".")[0])
    return modules


@pytest.mark.parametrize("name", sorted(SHIPPED_SOURCES))
def test_shipped_files_are_self_contained(name):
    """Users load these where cdcl-hf is not installed: third-party imports are those requirements.txt names."""
    allowed_third_party = {"numpy", "torch", "PIL", "tifffile", "transformers"}
    third_party = imported_modules(SHIPPED_SOURCES[name]) - set(sys.stdlib_module_names)
    assert third_party <= allowed_third_party, third_party


def test_shipped_tile_offsets_agree_with_profiling():
    for length in range(1, 70):
        for tile in range(1, length + 1):
            for stride in range(1, tile + 4):
                assert shipped_tile_offsets(length, tile, stride) == profiling_tile_offsets(length, tile, stride)
    for function in (shipped_tile_offsets, profiling_tile_offsets):
        with pytest.raises(ValueError, match="larger than the image side"):
            function(10, 11, 5)


# ---- the pipeline in a fresh process without cdcl_hf --------------------------------------------------------------

FRESH_PROCESS = WITHOUT_CDCL_HF + textwrap.dedent(
    """
    import base64, importlib.util, json, sys

    import numpy as np
    from transformers import pipeline

    checkpoint, inputs_dir, output_file = sys.argv[1:4]
    embed = pipeline(model=checkpoint, trust_remote_code=True)  # the task comes from config.json
    assert type(embed).__module__.startswith("transformers_modules"), type(embed).__module__
    assert embed.task == "microscopy-feature-extraction", embed.task
    d = inputs_dir + "/"
    channel_files = [d + f"c{c}.png" for c in range(3)]
    results = {
        "tif_path": embed(d + "field.tif"),
        "npy_path": embed(d + "field.npy"),
        "array": embed(np.load(d + "field.npy")),
        "channels": embed({"channels": channel_files}),
        "batch": np.stack(embed([d + "field.tif", channel_files, d + "small.npy"])),
        "plate": embed(d + "field.tif", image_mean=[1000.0, 1000.0, 1000.0], image_std=[500.0, 400.0, 300.0]),
    }
    spec = importlib.util.spec_from_file_location("handler", checkpoint + "/handler.py")
    handler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler_module)
    handler = handler_module.EndpointHandler(checkpoint)
    response = handler({"inputs": base64.b64encode(open(d + "field.tif", "rb").read()).decode()})
    results["handler"] = np.asarray(response["embedding"], dtype=np.float32)
    assert "cdcl_hf" not in sys.modules
    np.savez(output_file, **results)
    """
)


def test_pipeline_without_the_package_gives_the_model_embeddings(checkpoint, tmp_path):
    field = random_field(0)  # (C, H, W), the model's input size: processed whole
    small = random_field(1, 24, 20)  # smaller than the input: resized by the processor, as without the pipeline
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    tifffile.imwrite(inputs / "field.tif", np.moveaxis(field, 0, -1))  # (H, W, C) TIFF
    np.save(inputs / "field.npy", field)  # (C, H, W) array
    np.save(inputs / "small.npy", np.moveaxis(small, 0, -1))
    for channel in range(NUM_CHANNELS):
        Image.fromarray(field[channel]).save(inputs / f"c{channel}.png")  # 16-bit greyscale PNG per channel
    assert Image.open(inputs / "c0.png").mode.startswith("I;16")

    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(checkpoint), str(inputs), str(tmp_path / "out.npz")],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")

    model, processor = reference(checkpoint)
    expected = embed_directly(model, processor, [field])[0]
    for key in ("tif_path", "npy_path", "array", "channels", "handler"):
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(
        out["batch"], embed_directly(model, processor, [field, field, small]), rtol=1e-5, atol=1e-6
    )
    plate = embed_directly(model, processor, [field], image_mean=[1000.0] * 3, image_std=[500.0, 400.0, 300.0])[0]
    np.testing.assert_allclose(out["plate"], plate, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plate, expected, atol=1e-3)  # the plate's statistics were used


# ---- tiling a full-size field ---------------------------------------------------------------------------------

FIELD_SHAPE = (1224, 1088)  # >= 1024 on both sides; 1224 is no multiple of the 32-px input: the last tile is flush


def bbbc021_field(shared_data: Path, seed: int) -> np.ndarray:
    """A (3, 1224, 1088) uint16 field assembled from 18 x 16 real 68 x 68 BBBC021 crops."""
    files = sorted((shared_data / "bbbc021_crops" / "images").glob("*.npy"))
    rows, columns = FIELD_SHAPE[0] // 68, FIELD_SHAPE[1] // 68
    chosen = np.random.default_rng(seed).choice(len(files), size=rows * columns, replace=False)
    crops = [np.load(files[i]) for i in chosen]
    assert crops[0].shape == (68, 68, 3) and crops[0].dtype == np.uint16
    grid = np.stack(crops).reshape(rows, columns, 68, 68, 3)
    return np.moveaxis(grid.transpose(0, 2, 1, 3, 4).reshape(rows * 68, columns * 68, 3), -1, 0)


def synthetic_field(seed: int) -> np.ndarray:
    """A (3, 1224, 1088) uint16 field of bright blobs ("cells") on a noisy background."""
    rng = np.random.default_rng(seed)
    height, width = FIELD_SHAPE
    field = rng.normal(np.asarray(MEAN)[:, None, None], 200.0, size=(3, height, width))
    for _ in range(300):
        y, x, radius = rng.integers(0, height), rng.integers(0, width), rng.uniform(5, 15)
        reach = int(4 * radius)  # the blob is ~0 beyond this: only its window is touched
        rows = slice(max(0, y - reach), min(height, y + reach))
        columns = slice(max(0, x - reach), min(width, x + reach))
        yy, xx = np.mgrid[rows, columns]
        blob = np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * radius**2))
        field[:, rows, columns] += blob[None] * rng.uniform(2000, 20000, size=(3, 1, 1))
    return np.clip(field, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module", params=["bbbc021", "synthetic"])
def full_fields(request):
    if request.param == "bbbc021":
        shared = request.getfixturevalue("shared_data_dir")  # skips, saying why, without ../shared/data
        return bbbc021_field(shared, 0)
    return synthetic_field(0)


@pytest.fixture(scope="module")
def local_pipeline(cdcl_checkpoint):
    return pipeline(task=TASK, model=str(cdcl_checkpoint), trust_remote_code=True, device="cpu")


def test_the_pipeline_is_remote_code(cdcl_checkpoint, local_pipeline):
    # Loaded from the checkpoint's pipeline_cdcl.py as a dynamic module, only when the user trusts the code.
    assert type(local_pipeline).__module__.startswith("transformers_modules")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline(task=TASK, model=str(cdcl_checkpoint))


def test_tiling_covers_a_full_field_and_is_stable(local_pipeline, cdcl_checkpoint, full_fields):
    field = full_fields
    assert field.shape == (3, *FIELD_SHAPE) and field.dtype == np.uint16
    result = local_pipeline(np.moveaxis(field, 0, -1), return_tiles=True)  # (H, W, C), as a TIFF reader gives it

    # Tiles of the model's input size, non-overlapping, the last one flush with each edge, covering every pixel.
    assert result["tile_size"] == (INPUT_SIZE, INPUT_SIZE) and result["image_size"] == FIELD_SHAPE
    rows = profiling_tile_offsets(FIELD_SHAPE[0], INPUT_SIZE, INPUT_SIZE)
    columns = profiling_tile_offsets(FIELD_SHAPE[1], INPUT_SIZE, INPUT_SIZE)
    assert result["tile_offsets"] == [(top, left) for top in rows for left in columns]
    covered = np.zeros(FIELD_SHAPE, dtype=bool)
    for top, left in result["tile_offsets"]:
        assert 0 <= top <= FIELD_SHAPE[0] - INPUT_SIZE and 0 <= left <= FIELD_SHAPE[1] - INPUT_SIZE
        covered[top : top + INPUT_SIZE, left : left + INPUT_SIZE] = True
    assert covered.all()
    assert rows[-1] == FIELD_SHAPE[0] - INPUT_SIZE and columns[-1] == FIELD_SHAPE[1] - INPUT_SIZE

    # Each tile embedding is the model's embedding of exactly those pixels; the field's is their mean.
    model, processor = reference(cdcl_checkpoint)
    picked = [0, len(columns) - 1, len(result["tile_offsets"]) // 2, len(result["tile_offsets"]) - 1]
    crops = [field[:, t : t + INPUT_SIZE, left : left + INPUT_SIZE] for t, left in (result["tile_offsets"][i] for i in picked)]
    np.testing.assert_allclose(result["tile_embeddings"][picked], embed_directly(model, processor, crops), atol=1e-5)
    np.testing.assert_allclose(result["embedding"], result["tile_embeddings"].mean(axis=0), rtol=1e-6)

    # Stable: the same field gives the same embedding; a shifted tiling (overlapping tiles, other offsets) only a
    # slightly different one: a small fraction of how much single tiles differ from the field's mean, and of the
    # embedding's norm.
    again = local_pipeline(np.moveaxis(field, 0, -1))
    np.testing.assert_array_equal(again, result["embedding"])
    shifted = local_pipeline(field, tile_stride=INPUT_SIZE - 5, batch_size=256)
    shift_change = np.linalg.norm(shifted - result["embedding"])
    tile_spread = np.linalg.norm(result["tile_embeddings"] - result["embedding"], axis=1).mean()
    assert 0 < shift_change < 0.05 * tile_spread, (shift_change, tile_spread)
    assert shift_change < 0.02 * np.linalg.norm(result["embedding"])
    cosine = shifted @ result["embedding"] / np.linalg.norm(shifted) / np.linalg.norm(result["embedding"])
    assert cosine > 0.999

    # Tiling is not resizing: the whole field squeezed into one input gives a far more different embedding.
    resized = local_pipeline(field, tile_size=None)
    assert np.linalg.norm(resized - result["embedding"]) > 10 * shift_change


def test_explicit_tiles_and_inputs(local_pipeline):
    field = random_field(3, 100, 70)
    result = local_pipeline(field, tile_size=48, tile_stride=40, return_tiles=True)
    assert result["tile_offsets"] == [(top, left) for top in (0, 40, 52) for left in (0, 22)]
    assert result["tile_size"] == (48, 48) and result["tile_embeddings"].shape == (6, 64)
    # A side shorter than the tile: the tile spans it.
    narrow = local_pipeline(random_field(4, 100, 20), return_tiles=True)
    assert narrow["tile_size"] == (32, 20) and [left for _, left in narrow["tile_offsets"]] == [0] * 4
    # A 4-D array is a batch; a tensor works as an array.
    batch = local_pipeline(np.stack([random_field(5), random_field(6)]))
    assert len(batch) == 2
    np.testing.assert_allclose(local_pipeline(torch.from_numpy(random_field(5).astype(np.int32))), batch[0], atol=1e-6)
    # Each image of a batch may carry its own plate's statistics.
    plate = {"image_mean": [1000.0, 1000.0, 1000.0], "image_std": [400.0, 400.0, 400.0]}
    mixed = local_pipeline([{"image": random_field(5), **plate}, random_field(5)])
    np.testing.assert_allclose(mixed[0], local_pipeline(random_field(5), **plate), atol=1e-6)
    np.testing.assert_allclose(mixed[1], batch[0], atol=1e-6)
    assert not np.allclose(mixed[0], mixed[1], atol=1e-3)


@pytest.mark.parametrize(
    "inputs, kwargs, message",
    [
        (np.zeros((32, 32, 5), np.uint16), {}, r"expects 3 channels, \(H, W, 3\) or \(3, H, W\), but got an array of shape \(32, 32, 5\)"),
        (np.zeros((32, 32), np.uint16), {}, "got one channel of shape"),
        ({"channels": [np.zeros((8, 8))] * 2}, {}, "got 2 per-channel files/planes, but the model expects 3"),
        ({"channels": [np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((9, 8))]}, {}, "differ in size"),
        ("/no/such/file.tif", {}, "does not exist"),
        (b"not an image at all", {}, "are not a readable NPY, TIFF or PNG file"),
        (np.zeros((32, 32, 3)), {"tile_size": 0}, "tile_size must be a positive integer, got 0"),
        (np.zeros((32, 32, 3)), {"image_mean": [1.0, 2.0, 3.0]}, "pass both image_mean and image_std"),
        (np.zeros((32, 32, 3)), {"image_mean": [1, 2], "image_std": [1, 2]}, r"one value per channel \(3\), got 2"),
        (np.zeros((32, 32, 3)), {"tile": 3}, r"unexpected argument\(s\) \['tile'\]"),
        ([], {}, "empty list"),
        ({"image": np.zeros((3, 8, 8)), "pixels": 1}, {}, "exactly one of 'image' or 'channels'"),
    ],
)
def test_pipeline_refusals_say_what_is_wrong(local_pipeline, inputs, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        local_pipeline(inputs, **kwargs)


# ---- the Endpoint handler -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def handler_and_reference(cdcl_checkpoint):
    """The shipped handler.py, loaded from the checkpoint as Inference Endpoints load it, and the reference model."""
    spec = importlib.util.spec_from_file_location("shipped_handler", cdcl_checkpoint / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(cdcl_checkpoint)), reference(cdcl_checkpoint)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def file_bytes(write) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def test_handler_rgb_png(handler_and_reference):
    handler, (model, processor) = handler_and_reference
    rgb = Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(40, 40, 3), dtype=np.uint8))
    response = handler({"inputs": b64(file_bytes(lambda f: rgb.save(f, format="PNG")))})
    assert set(response) == {"embedding", "dim", "tiles"}, response
    # An RGB rendering is mapped to the model's channels and standardised per image (the processor's rule), and
    # being larger than the input it is tiled: the mean of its tiles' embeddings.
    tiles = [rgb.crop((left, top, left + 32, top + 32)) for top in (0, 8) for left in (0, 8)]
    np.testing.assert_allclose(response["embedding"], embed_directly(model, processor, tiles).mean(axis=0), atol=1e-5)
    assert response["dim"] == 64 and response["tiles"] == 4
    # The toolkit hands image/png bodies over as PIL images or bytes: same answer.
    assert np.allclose(handler({"inputs": rgb})["embedding"], response["embedding"], atol=1e-6)
    json.dumps(response)  # plain JSON types


def test_handler_multichannel_payloads(handler_and_reference):
    handler, (model, processor) = handler_and_reference
    field = random_field(8)
    expected = embed_directly(model, processor, [field])[0]
    hwc = np.moveaxis(field, 0, -1)
    payloads = {
        "tiff": b64(file_bytes(lambda f: tifffile.imwrite(f, hwc))),
        "npy": b64(file_bytes(lambda f: np.save(f, field))),
        "data-url npy": "data:application/octet-stream;base64," + b64(file_bytes(lambda f: np.save(f, hwc))),
        "nested list (H, W, C)": hwc.tolist(),
        "nested list (C, H, W)": field.tolist(),
        "png per channel": [b64(file_bytes(lambda f, c=c: Image.fromarray(field[c]).save(f, format="PNG"))) for c in range(3)],
    }
    for name, inputs in payloads.items():
        response = handler(json.loads(json.dumps({"inputs": inputs})))  # what survives a JSON request body
        assert "error" not in response, (name, response)
        np.testing.assert_allclose(response["embedding"], expected, rtol=1e-5, atol=1e-6, err_msg=name)

    plate = {"image_mean": [1000.0, 1100.0, 1200.0], "image_std": [300.0, 300.0, 300.0]}
    response = handler({"inputs": payloads["npy"], "parameters": plate})
    np.testing.assert_allclose(response["embedding"], embed_directly(model, processor, [field], **plate)[0], atol=1e-5)

    big = random_field(9, 80, 56)
    response = handler({"inputs": b64(file_bytes(lambda f: np.save(f, big))),
                        "parameters": {"tile_size": 32, "tile_stride": 24, "return_tiles": True}})
    assert response["tiles"] == 3 * 2 and response["tile_size"] == [32, 32] and response["image_size"] == [80, 56]
    assert response["tile_offsets"] == [[0, 0], [0, 24], [24, 0], [24, 24], [48, 0], [48, 24]]
    assert np.asarray(response["tile_embeddings"]).shape == (6, 64)
    json.dumps(response)


def _garbage_png():
    return b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


@pytest.mark.parametrize(
    "payload, expected",
    [
        (["not", "a", "dict"], "must be a JSON object"),
        ({"image": "abc"}, "has no 'inputs' field"),
        ({"inputs": "abc", "extra": 1}, r"unknown field\(s\) \['extra'\]"),
        ({"inputs": "this is not base64!"}, "not valid base64"),
        ({"inputs": ""}, "is empty"),
        ({"inputs": b64(b"hello world, not an image")}, "are not a readable NPY, TIFF or PNG file"),
        ({"inputs": _garbage_png()}, "are not a readable NPY, TIFF or PNG file"),
        ({"inputs": [[1, 2, 3], [4, 5]]}, "ragged nested list"),
        ({"inputs": [[[1, None, 3]] * 4] * 4}, "numbers only"),
        ({"inputs": [[["a", "b", "c"]] * 4] * 4}, "mixes base64 strings|numbers only"),
        ({"inputs": np.zeros((16, 16, 5)).tolist()}, r"expects 3 channels, .* got an array of shape \(16, 16, 5\)"),
        ({"inputs": np.zeros((2, 16, 16, 3)).tolist()}, r"one image per request: expected .* got a 4-D"),
        ({"inputs": [1.0, 2.0, 3.0]}, r"got an array of shape \(3,\)"),
        ({"inputs": []}, "empty list"),
        ({"inputs": [b64(b"x"), b64(b"y")]}, "got 2 per-channel files/planes, but the model expects 3"),
        ({"inputs": 42}, "unsupported form: expected"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": [1]}, "parameters must be an object"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": {"tile": 8}}, r"unknown parameter\(s\) \['tile'\]"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": {"tile_size": "big"}},
         "tile_size must be a positive integer, got 'big'"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": {"image_mean": [1, 2], "image_std": [1, 2]}},
         r"one value per channel \(3\), got 2"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": {"image_mean": [1, 2, 3], "image_std": [1, 0, 1]}},
         "image_std must be finite and positive"),
        ({"inputs": np.zeros((16, 16, 3)).tolist(), "parameters": {"image_mean": "low", "image_std": [1, 1, 1]}},
         "image_mean must be a list of numbers"),
    ],
)
def test_handler_bad_payloads_get_a_json_error(handler_and_reference, payload, expected):
    handler, _ = handler_and_reference
    response = handler(payload)
    assert set(response) == {"error"}, response
    assert isinstance(response["error"], str) and "Traceback" not in response["error"]
    assert __import__("re").search(expected, response["error"]), response["error"]
    json.dumps(response)

"""Older transformers releases load a checkpoint saved with the current code, where cdcl-hf is not installed.

Each test installs one transformers release (`pip install --target`, into pytest's cache folder, reused across runs)
and loads, in a fresh interpreter that puts that release first on `sys.path` and cannot import `cdcl_hf`, a tiny
checkpoint saved here with the current code: `AutoModel.from_pretrained(..., trust_remote_code=True)` must give the
same embeddings. Needs the package registry (pip); marked slow.

What was found (torch 2.13 CPU, no torchvision):

* The model loads and gives identical embeddings from transformers 5.0.0 on (5.0, 5.1, 5.2, 5.3, 5.4, 5.5, 5.10,
  5.16, 5.17, 5.18, 5.20, 5.22, 5.23 and 5.24 were tried; 4.57.6 works as well).
* `AutoImageProcessor.from_pretrained(..., trust_remote_code=True)` works without torchvision in 5.0-5.3 and from
  5.18 on; 5.4.0-5.17.x refuse it ("AutoImageProcessor requires the Torchvision library"). On those releases the
  checkpoint's processor class still loads through
  `transformers.dynamic_module_utils.get_class_from_dynamic_module("image_processing_cdcl.CDCLImageProcessor", path)`.
* The installed package (`import cdcl_hf`) needs more than the checkpoint: its `__init__` registers the image
  processor with `AutoImageProcessor.register(..., image_processor_classes=...)` (5.4.0 on), and AutoImageProcessor
  must be usable without torchvision (5.18.0 on). `pyproject.toml`'s lower bound is that floor;
  `test_the_package_imports_at_its_declared_floor` checks it.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from fresh_process import WITHOUT_CDCL_HF

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
# The oldest release that loads a saved checkpoint, and one from the range whose AutoImageProcessor needs torchvision.
CHECKPOINT_MIN_VERSION = "5.0.0"
TORCHVISION_GATED_VERSION = "5.17.0"
NUM_CHANNELS = 5


def declared_floor() -> str:
    """The X of `transformers>=X,<6` in pyproject.toml."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    match = re.search(r'"transformers>=([0-9.]+),<6"', text)
    assert match, "pyproject.toml should declare transformers>=X,<6"
    # "5.23" -> "5.23.0", as transformers.__version__ spells it.
    parts = match.group(1).split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


@pytest.fixture(scope="module")
def transformers_release(request, tmp_path_factory):
    """A function: version -> folder holding that transformers release and its dependencies (not torch)."""
    cache = getattr(request.config, "cache", None)

    def install(version: str) -> Path:
        name = f"transformers-{version}"
        folder = cache.mkdir(name) if cache is not None else tmp_path_factory.mktemp(name)
        if list(folder.glob(f"transformers-{version}.dist-info")):
            return folder
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--target",
                str(folder),
                f"transformers=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, (
            f"pip could not install transformers=={version}:\n{result.stderr[-3000:]}"
        )
        return folder

    return install


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with the image processor, saved with the current code, and its expected outputs."""
    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    config = CDCLConfig.from_preset("tiny", num_channels=NUM_CHANNELS, drop_path_rate=0.1, pooling="cls+mean")
    model = CDCLModel(config).eval()
    model.save_pretrained(directory)
    processor = CDCLImageProcessor(num_channels=NUM_CHANNELS, size=32)
    processor.save_pretrained(directory)

    images = np.random.default_rng(0).integers(0, 20000, size=(3, 40, 40, NUM_CHANNELS), dtype=np.uint16)
    np.save(directory / "images.npy", images)
    pixels = processor(list(images), return_tensors="pt")["pixel_values"]
    larger = torch.nn.functional.interpolate(pixels, size=(48, 48))  # interpolated position embeddings
    np.save(directory / "pixels.npy", pixels.numpy())
    np.save(directory / "larger.npy", larger.numpy())
    with torch.no_grad():
        np.save(directory / "expected.npy", model(pixels).pooler_output.numpy())
        np.save(directory / "expected_larger.npy", model(larger).pooler_output.numpy())
    return directory


# Runs with the old release first on sys.path, where importing cdcl_hf is impossible. Prints one JSON line.
REMOTE_LOADER = WITHOUT_CDCL_HF + textwrap.dedent(
    """
    import json
    import sys

    import numpy as np
    import torch
    import transformers
    from transformers import AutoImageProcessor, AutoModel
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    checkpoint = sys.argv[1]
    report = {"version": transformers.__version__, "transformers_file": transformers.__file__}
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    report["model_module"] = type(model).__module__
    report["parameter_names"] = sorted(model.state_dict())
    with torch.no_grad():
        for name in ("pixels", "larger"):
            pixels = torch.from_numpy(np.load(f"{checkpoint}/{name}.npy"))
            np.save(f"{checkpoint}/got_{name}_{transformers.__version__}.npy", model(pixels).pooler_output.numpy())

    images = list(np.load(f"{checkpoint}/images.npy"))
    try:
        processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
        report["auto_image_processor"] = "loaded"
    except ImportError as error:
        report["auto_image_processor"] = "refused: " + " ".join(str(error).split())[:300]
        processor_class = get_class_from_dynamic_module("image_processing_cdcl.CDCLImageProcessor", checkpoint)
        processor = processor_class.from_pretrained(checkpoint)
    report["processor_module"] = type(processor).__module__
    pixels = processor(images, return_tensors="pt")["pixel_values"].numpy()
    report["pixels_equal"] = bool(np.array_equal(pixels, np.load(f"{checkpoint}/pixels.npy")))
    assert "cdcl_hf" not in sys.modules
    print(json.dumps(report))
    """
)


def run_with_release(release: Path, code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": str(release),
        "HF_MODULES_CACHE": str(cwd / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONNOUSERSITE": "1",
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    "version, auto_image_processor",
    [
        (CHECKPOINT_MIN_VERSION, "loaded"),
        (TORCHVISION_GATED_VERSION, "refused"),
        ("declared floor", "loaded"),
    ],
)
def test_old_release_loads_the_checkpoint(
    transformers_release, checkpoint, tmp_path, version, auto_image_processor
):
    version = declared_floor() if version == "declared floor" else version
    release = transformers_release(version)
    result = run_with_release(release, REMOTE_LOADER, str(checkpoint), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    assert report["version"] == version and report["transformers_file"].startswith(str(release))
    assert report["model_module"].startswith("transformers_modules")
    assert report["processor_module"].startswith("transformers_modules")
    assert report["parameter_names"] == sorted(
        CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5)).state_dict()
    )
    for name in ("pixels", "larger"):
        np.testing.assert_array_equal(
            np.load(checkpoint / f"got_{name}_{version}.npy"),
            np.load(checkpoint / ("expected.npy" if name == "pixels" else "expected_larger.npy")),
        )
    # Without torchvision, 5.4.0-5.17.x refuse AutoImageProcessor; the processor class loads all the same.
    assert report["auto_image_processor"].startswith(auto_image_processor), report["auto_image_processor"]
    if auto_image_processor == "refused":
        assert "Torchvision" in report["auto_image_processor"]
    assert report["pixels_equal"]


PACKAGE_IMPORT = textwrap.dedent(
    """
    import json
    import sys

    import torch
    import transformers
    from transformers import AutoModel

    import cdcl_hf
    from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
    from cdcl_hf.convert_vit import cdcl_model_from_vit_checkpoint  # noqa: F401

    checkpoint = sys.argv[1]
    model = AutoModel.from_pretrained(checkpoint).eval()
    assert type(model) is CDCLModel, type(model)
    processor = CDCLImageProcessor.from_pretrained(checkpoint)
    torch.manual_seed(0)
    fresh = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5, drop_path_rate=0.1, pooling="cls+mean"))
    print(json.dumps({"version": transformers.__version__, "package": cdcl_hf.__file__}))
    torch.save(fresh.state_dict(), sys.argv[2])
    """
)


def test_the_package_imports_at_its_declared_floor(transformers_release, checkpoint, tmp_path):
    version = declared_floor()
    release = transformers_release(version)
    environment_path = os.pathsep.join([str(release), str(REPO_ROOT)])
    result = subprocess.run(
        [sys.executable, "-c", PACKAGE_IMPORT, str(checkpoint), str(tmp_path / "fresh.pt")],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": environment_path, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["version"] == version
    # The same seed gives the same initial weights under the old release as under the installed one.
    torch.manual_seed(0)
    expected = CDCLModel(
        CDCLConfig.from_preset("tiny", num_channels=5, drop_path_rate=0.1, pooling="cls+mean")
    )
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    for name, value in expected.state_dict().items():
        assert torch.equal(fresh[name], value), name

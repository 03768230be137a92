"""The checkpoint carries its own code: it loads where cdcl-hf is not installed, and through `pipeline`."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from fresh_process import WITHOUT_CDCL_HF
from PIL import Image
from transformers import pipeline

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

NUM_CHANNELS = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=NUM_CHANNELS)).save_pretrained(directory)
    CDCLImageProcessor(num_channels=NUM_CHANNELS, size=32).save_pretrained(directory)
    return directory


def test_checkpoint_ships_its_code_and_auto_map(checkpoint):
    assert {"configuration_cdcl.py", "modeling_cdcl.py", "image_processing_cdcl.py"} <= {
        p.name for p in checkpoint.iterdir()
    }
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cdcl.CDCLConfig",
        "AutoModel": "modeling_cdcl.CDCLModel",
    }
    processor_config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoImageProcessor": "image_processing_cdcl.CDCLImageProcessor"}


def shipped_imports(source_file) -> set[str]:
    """Modules a shipped file imports (relative ones with their leading dots)."""
    modules = set()
    for node in ast.walk(ast.parse(source_file.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." * node.level + (node.module or ""))
    return modules


def test_shipped_model_code_is_self_contained(checkpoint):
    """The model code in a checkpoint uses only public transformers APIs, so that its parameter names and behaviour
    do not depend on the transformers release that loads it (transformers' ViT modules were renamed within 5.x)."""
    imports = shipped_imports(checkpoint / "modeling_cdcl.py")
    assert imports == {
        "math",
        "collections.abc",
        "torch",
        "transformers.activations",
        "transformers.modeling_layers",
        "transformers.modeling_outputs",
        "transformers.modeling_utils",
        ".configuration_cdcl",
    }, imports
    assert shipped_imports(checkpoint / "configuration_cdcl.py") == {"transformers"}


# Runs in a fresh interpreter where importing cdcl_hf is impossible, as on a machine without the package.
REMOTE_LOADER = WITHOUT_CDCL_HF + textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch
    from transformers import AutoImageProcessor, AutoModel

    checkpoint, images_file, output_file = sys.argv[1:4]
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    assert "cdcl_hf" not in sys.modules
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    with torch.no_grad():
        embeddings = model(**processor(list(np.load(images_file)), return_tensors="pt")).pooler_output
    np.save(output_file, embeddings.numpy())
    """
)


def test_fresh_process_without_the_package_loads_the_checkpoint(checkpoint, tmp_path):
    images = np.random.default_rng(0).integers(0, 20000, size=(3, 40, 40, NUM_CHANNELS), dtype=np.uint16)
    np.save(tmp_path / "images.npy", images)
    environment = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_LOADER, str(checkpoint), str(tmp_path / "images.npy"), str(tmp_path / "out.npy")],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    model = CDCLModel.from_pretrained(checkpoint).eval()
    processor = CDCLImageProcessor.from_pretrained(checkpoint)
    with torch.no_grad():
        expected = model(**processor(list(images), return_tensors="pt")).pooler_output.numpy()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_image_feature_extraction_pipeline(checkpoint):
    extractor = pipeline("image-feature-extraction", model=str(checkpoint), trust_remote_code=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, size=(48, 48, 3), dtype=np.uint8))
    tokens = np.asarray(extractor(rgb))
    assert tokens.shape == (1, 1 + 16, 64)
    pooled = np.asarray(extractor(rgb, pool=True))
    assert pooled.shape == (1, 64)
    np.testing.assert_allclose(pooled[0], tokens[0, 0], rtol=1e-5, atol=1e-6)

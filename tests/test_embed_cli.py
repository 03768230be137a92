"""hub/embed_images.py: the README's demo command and embedding image files with a saved checkpoint."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import torch

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel

SCRIPT = Path(__file__).resolve().parents[1] / "hub" / "embed_images.py"


def test_demo_prints_the_embedding_shape():
    result = subprocess.run([sys.executable, str(SCRIPT), "--demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "embeddings of shape (4, 64)" in result.stdout


def test_embeds_npy_and_tiff_files_with_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3)).save_pretrained(tmp_path / "model")
    CDCLImageProcessor(num_channels=3, size=32).save_pretrained(tmp_path / "model")
    image = np.random.default_rng(0).integers(0, 4000, size=(3, 50, 50), dtype=np.uint16)
    np.save(tmp_path / "a.npy", image)
    tifffile.imwrite(tmp_path / "b.tif", image, photometric="minisblack")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tmp_path / "model"), "--images", str(tmp_path / "a.npy"),
         str(tmp_path / "b.tif"), "--output", str(tmp_path / "embeddings.npy")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    embeddings = np.load(tmp_path / "embeddings.npy")
    assert embeddings.shape == (2, 64)
    np.testing.assert_array_equal(embeddings[0], embeddings[1])

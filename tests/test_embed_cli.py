"""The embedding command (cdcl_hf.commands.embed, run as hub/embed_images.py) and pooled_embedding."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.commands import embed
from cdcl_hf.cpu_kernels import onednn_linear_available
from cdcl_hf.embedding import pooled_embedding

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


# ---- in-process: cdcl_hf.commands.embed.main -------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3)).save_pretrained(path)
    CDCLImageProcessor(num_channels=3, size=32).save_pretrained(path)
    return path


def test_dihedral_test_time_augmentation_embeds_turned_images_alike(checkpoint, tmp_path):
    image = np.random.default_rng(1).integers(0, 4000, size=(3, 40, 40), dtype=np.uint16)
    np.save(tmp_path / "as_stored.npy", image)
    np.save(tmp_path / "turned.npy", np.ascontiguousarray(np.rot90(image, 1, axes=(1, 2))))
    files = ["--images", str(tmp_path / "as_stored.npy"), str(tmp_path / "turned.npy")]
    embed.main(["--model", str(checkpoint), *files, "--output", str(tmp_path / "plain.npy")])
    embed.main(["--model", str(checkpoint), *files, "--output", str(tmp_path / "dihedral.npy"),
                "--test_time_augmentation", "dihedral"])
    plain, dihedral = np.load(tmp_path / "plain.npy"), np.load(tmp_path / "dihedral.npy")
    assert not np.allclose(plain[0], plain[1], atol=1e-3)
    np.testing.assert_allclose(dihedral[0], dihedral[1], atol=1e-5)


def test_the_cpu_linear_kernels_give_the_same_embeddings(checkpoint, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(2).integers(0, 4000, size=(3, 40, 40), dtype=np.uint16))
    for kernel in ("blas", "onednn" if onednn_linear_available() else "auto"):
        embed.main(["--model", str(checkpoint), "--images", str(tmp_path / "a.npy"), "--output",
                    str(tmp_path / f"{kernel}.npy"), "--cpu_linear_kernel", kernel])
    blas, other = (np.load(path) for path in sorted(tmp_path.glob("*.npy")) if path.name != "a.npy")
    np.testing.assert_allclose(other, blas, atol=1e-5)


def test_pooling_cls_mean_appends_the_mean_patch_token(checkpoint, tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(3).integers(0, 4000, size=(3, 40, 40), dtype=np.uint16))
    for pooling in ("cls", "cls+mean"):
        embed.main(["--model", str(checkpoint), "--images", str(tmp_path / "a.npy"), "--output",
                    str(tmp_path / f"{pooling}.npy"), "--pooling", pooling])
    cls_token, both = np.load(tmp_path / "cls.npy"), np.load(tmp_path / "cls+mean.npy")
    assert both.shape == (1, 2 * cls_token.shape[1])
    np.testing.assert_allclose(both[:, : cls_token.shape[1]], cls_token, atol=1e-5)


def test_compile_without_a_compiler_is_one_clear_line(checkpoint, tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((3, 32, 32), np.uint16))
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(SystemExit) as exit_:
        embed.main(["--model", str(checkpoint), "--images", str(tmp_path / "a.npy"), "--output",
                    str(tmp_path / "out.npy"), "--compile"])
    line = str(exit_.value.code)  # a message as the exit code: printed on stderr, exit status 1
    assert line.startswith("cdcl-embed: error:") and "C++ compiler" in line and "no-such-c++-compiler" in line
    assert len(line.splitlines()) == 1
    assert not (tmp_path / "out.npy").exists()


def test_16_bit_png_pgm_and_per_channel_files_keep_their_values(checkpoint, tmp_path, capsys):
    image = np.random.default_rng(1).integers(0, 65536, size=(3, 40, 40), dtype=np.uint16)
    image[0, 0, 0], image[0, 0, 1] = 0, 65535
    np.save(tmp_path / "a.npy", image)
    channels = []
    for index, plane in enumerate(image):
        Image.fromarray(plane).save(tmp_path / f"a_{index}.png")
        Image.fromarray(plane).save(tmp_path / f"a_{index}.pgm")  # Pillow reads 16-bit PGM as int32 "I"
        channels.append(tmp_path / f"a_{index}.png")
    pgm = [tmp_path / f"a_{index}.pgm" for index in range(3)]

    read = dict(embed.read_images([tmp_path / "a.npy"], [channels, pgm]))
    assert len(read) == 3
    for pixels in read.values():
        assert pixels.dtype == np.uint16
        np.testing.assert_array_equal(pixels, image)

    code = embed.main(["--model", str(checkpoint), "--images", str(tmp_path / "a.npy"),
                       "--channel_files", *map(str, channels), "--channel_files", *map(str, pgm),
                       "--batch_size", "2", "--output", str(tmp_path / "emb")])  # np.save's rule: .npy is added
    assert code == 0, capsys.readouterr().err
    assert "embedded 3 images -> embeddings of shape (3, 64)" in capsys.readouterr().out
    embeddings = np.load(tmp_path / "emb.npy")
    assert embeddings.dtype == np.float32 and embeddings.shape == (3, 64)
    np.testing.assert_allclose(embeddings[1:], embeddings[[0, 0]], rtol=1e-5, atol=1e-6)
    # Each row names its file(s): one .npy, then the two channel groups (their files joined by ";").
    rows = pd.read_csv(tmp_path / "emb.files.csv", dtype=str)
    assert rows["file"].tolist() == [str(tmp_path / "a.npy"), ";".join(map(str, channels)), ";".join(map(str, pgm))]
    assert sorted(p.name for p in tmp_path.iterdir() if "emb" in p.name or p.name.startswith(".")) == [
        "emb.files.csv", "emb.npy"]  # no partial file left


def test_unreadable_or_mismatched_images_fail_naming_the_file(checkpoint, tmp_path, capsys):
    good = np.random.default_rng(2).integers(0, 4000, size=(3, 32, 32), dtype=np.uint16)
    np.save(tmp_path / "good.npy", good)
    encoded = io.BytesIO()
    Image.fromarray(good[0]).save(encoded, format="PNG")
    (tmp_path / "cut.png").write_bytes(encoded.getvalue()[:100])
    np.save(tmp_path / "five.npy", np.zeros((5, 32, 32), dtype=np.uint16))

    for bad, message in [("cut.png", r"cannot read image file .*cut\.png"), ("five.npy", r"five\.npy: 5 channels")]:
        with pytest.raises(SystemExit) as exit_info:
            embed.main(["--model", str(checkpoint), "--images", str(tmp_path / "good.npy"), str(tmp_path / bad),
                        "--output", str(tmp_path / "emb.npy")])
        assert re.search(f"^cdcl-embed: error: .*{message}", str(exit_info.value.code))
        assert not [p for p in tmp_path.iterdir() if "emb" in p.name or p.name.startswith(".")]  # no partial file


def test_images_are_read_while_embedding_not_all_first():
    torch.manual_seed(0)
    model = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=2))
    processor = CDCLImageProcessor(num_channels=2, size=32)
    consumed = []

    def images():
        for index in range(7):
            consumed.append(index)
            yield f"image {index}", np.full((2, 40, 40), index, dtype=np.uint16)

    seen = []
    for batch in embed.embed_images(model, processor, images(), batch_size=3):
        seen.append((len(batch), len(consumed)))
    assert seen == [(3, 3), (3, 6), (1, 7)]  # at most one batch of images is held at a time


# ---- pooled_embedding ------------------------------------------------------------------------------


def test_pooled_embedding():
    tensor = torch.randn(4, 8)
    assert torch.equal(pooled_embedding(tensor), tensor)
    hidden = torch.randn(4, 5, 8)
    pooled = torch.randn(4, 8)
    assert torch.equal(pooled_embedding(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)), pooled)
    assert torch.equal(pooled_embedding(BaseModelOutput(last_hidden_state=hidden)), hidden[:, 0])  # the CLS token
    assert torch.equal(pooled_embedding(BaseModelOutputWithPooling(last_hidden_state=hidden)), hidden[:, 0])
    assert torch.equal(pooled_embedding({"pooler_output": pooled}), pooled)
    cnn = torch.randn(4, 8, 1, 1)  # e.g. ResNet's pooler_output
    assert pooled_embedding(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=cnn)).shape == (4, 8)
    with pytest.raises(TypeError, match="neither pooler_output nor last_hidden_state"):
        pooled_embedding((hidden, pooled))

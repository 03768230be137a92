"""Embed microscopy images with a CDCL checkpoint and print (or save) the embeddings.

    python hub/embed_images.py --model org/cdcl-vit --images a.npy b.tif --output embeddings.npy
    python hub/embed_images.py --demo      # a tiny untrained 5-channel model on random 16-bit images
"""

import argparse
from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import cdcl_hf  # noqa: F401  (registers the CDCL classes with the Auto classes)
from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel


def read_image(path: Path) -> np.ndarray:
    """An image file as an array with its original dtype (.npy, .tif/.tiff, or any format PIL reads)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path)
    if suffix in (".tif", ".tiff"):
        return tifffile.imread(path)
    return np.asarray(Image.open(path))


def embed(model, processor, images: list, batch_size: int = 32) -> np.ndarray:
    """Pooled embeddings of `images`, batch by batch, without gradients."""
    model.eval()
    embeddings = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            inputs = processor(images[start : start + batch_size], return_tensors="pt").to(model.device)
            embeddings.append(model(**inputs).pooler_output.float().cpu().numpy())
    return np.concatenate(embeddings)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id")
    parser.add_argument("--images", nargs="*", type=Path, default=[], help="image files (.npy, .tif, .png)")
    parser.add_argument("--output", type=Path, help="write the embeddings here (.npy)")
    parser.add_argument("--demo", action="store_true", help="tiny untrained model on random 5-channel images")
    args = parser.parse_args()

    if args.demo:
        torch.manual_seed(0)
        model = CDCLModel(CDCLConfig.from_preset("tiny", num_channels=5))
        processor = CDCLImageProcessor(num_channels=5, size=32)
        images = list(np.random.default_rng(0).integers(0, 40000, size=(4, 96, 96, 5), dtype=np.uint16))
    else:
        if not args.model or not args.images:
            parser.error("give --model and --images, or --demo")
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True)
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
        images = [read_image(path) for path in args.images]

    embeddings = embed(model, processor, images)
    print(f"embedded {len(images)} images -> embeddings of shape {embeddings.shape}")
    if args.output:
        np.save(args.output, embeddings)


if __name__ == "__main__":
    main()

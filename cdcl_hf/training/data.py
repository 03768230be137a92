"""Training data: the screen, its normalisation, partner pairing and multi-crop views, as one DataLoader."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from ..image_io import decode_image
from ..methods import get_method
from ..multicrop import MultiCropAugmentation, PreparePair
from ..normalization import PlateNormalization
from ..pairing import CrossDomainPairDataset, CrossDomainPairIterableDataset, EpochIndexSampler, PartnerIndex
from ..screen_data import load_screen, screen_channel_names
from ..synthetic_screen import synthetic_screen_from_args

__all__ = ["TrainData", "load_training_screen", "build_train_data", "collate_prepared_pairs", "cut_batch_views"]

logger = get_logger(__name__)

# Decoded, normalised images kept in memory by a map-style run (shared out among the data-loader workers): a
# small screen (e.g. 1,000 68x68x3 crops = 55 MB) is then decoded once, not once per image and once per partner
# draw in every epoch (benchmarks/bench_training_step.py). Items are identical with or without it.
IMAGE_CACHE_BYTES = 512 * 2**20


@dataclass
class TrainData:
    r"""
    Everything the loop and the export need to know about the training data.

    Args:
        dataloader (`torch.utils.data.DataLoader`): Batches of views (`global_crops`, `local_crops`) with `domain`,
            `partner_domain` and `pair_case` per item; with `--batched_views` the prepared images (`image`,
            `partner_image`) instead, whose views the loop cuts per batch (`augmentation.crop_batch`).
        augmentation (`MultiCropAugmentation`): The view recipe (its `view_sources()` feed the losses).
        normalization (`PlateNormalization`): The intensity normalisation images were trained with.
        num_channels (`int`), channel_names (`list[str]`): The screen's channels, in order.
        num_domains (`int`): Domains (teacher centres) of the screen.
        num_images (`int`, *optional*): Images of a map-style screen (`None` when streaming).
        partner_index (`PartnerIndex`, *optional*): The pairing index of a map-style screen.
    """

    dataloader: torch.utils.data.DataLoader
    augmentation: MultiCropAugmentation
    normalization: PlateNormalization
    num_channels: int
    channel_names: list[str]
    num_domains: int
    num_images: int | None = None
    partner_index: PartnerIndex | None = None


def load_training_screen(args: argparse.Namespace) -> Any:
    """The screen `--dataset_name` names: the built-in synthetic one, a folder, or a Hub dataset (maybe streamed)."""
    if args.dataset_name == "synthetic":
        if args.streaming:
            raise SystemExit("--streaming is for screens on disk or the Hub, not the synthetic screen")
        return synthetic_screen_from_args(args)
    return load_screen(
        args.dataset_name, split=args.dataset_split, streaming=args.streaming, revision=args.dataset_revision
    )


def _check_columns(screen: Any, args: argparse.Namespace) -> None:
    for flag, column in (("label", args.label_column), ("domain", args.domain_column)):
        if column not in screen.column_names:
            raise SystemExit(f"--{flag}_column {column!r} is not a column of the screen; columns: {screen.column_names}")


def _multicrop_augmentation(args: argparse.Namespace) -> MultiCropAugmentation:
    return MultiCropAugmentation(
        global_size=args.global_crop_size,
        global_scale=tuple(args.global_crop_scale),
        local_size=args.local_crop_size,
        local_scale=tuple(args.local_crop_scale),
        num_local_crops=args.num_local_crops,
        resize_to=args.resize_to,
        gain_std=args.gain_std,
        offset_std=args.offset_std,
        blur_prob=args.blur_prob,
        noise_std=args.noise_std,
    )


def collate_prepared_pairs(items: list[dict[str, Any]]) -> dict[str, Any]:
    """`--batched_views`: a batch of prepared pairs, whose views are cut together, so all its images share one size."""
    shapes = sorted({tuple(item[key].shape) for item in items for key in ("image", "partner_image")})
    if len(shapes) > 1:
        raise ValueError(
            f"--batched_views needs the images of a batch to share one size, got {shapes}; give --resize_to (for "
            "images of one aspect ratio) or train without --batched_views"
        )
    return torch.utils.data.default_collate(items)


def cut_batch_views(
    batch: dict[str, Any], augmentation: MultiCropAugmentation, generator: torch.Generator
) -> dict[str, Any]:
    """`--batched_views`: a batch of prepared pairs (`image`, `partner_image`) -> the same batch with their views
    (`global_crops`, `local_crops`) in their place, cut at once on the images' device. The input is left unchanged."""
    views = augmentation.crop_batch(batch["image"], batch["partner_image"], generator=generator)
    return {**{k: v for k, v in batch.items() if k not in ("image", "partner_image")}, **views}


def _partner_index(screen: Any, args: argparse.Namespace) -> PartnerIndex:
    try:
        index = PartnerIndex.from_table(
            screen, label_column=args.label_column, domain_column=args.domain_column, policy=args.single_domain_policy
        )
    except ValueError as error:
        raise SystemExit(f"cannot pair the screen's images for --method {args.method}: {error}") from error
    if get_method(args.method).cross_domain_pairs and index.counts["items_cross_domain"] == 0:
        raise SystemExit(
            f"no image has a partner with the same {args.label_column!r} in another {args.domain_column!r} "
            f"({index.num_domains} domain(s)), so --method {args.method} would learn nothing beyond DINO; "
            "choose another --domain_column / --label_column, or --method dino"
        )
    logger.info(f"partner index: {index.state_summary()}")
    return index


def build_train_data(args: argparse.Namespace, accelerator: Accelerator) -> TrainData:
    """Load the screen, compute its normalisation, pair its images and wrap it all in a DataLoader."""
    screen = load_training_screen(args)
    num_channels = decode_image(next(iter(screen))["image"]).shape[0]
    channel_names = screen_channel_names(screen)
    _check_columns(screen, args)
    with accelerator.main_process_first():  # the first process computes and caches the plate statistics
        normalization = PlateNormalization.from_screen(screen, args.normalization)
    augmentation = _multicrop_augmentation(args)
    # --batched_views: the workers only load and prepare the pair; the loop cuts the views of a whole batch at once.
    transform = PreparePair(augmentation) if args.batched_views else augmentation
    collate_fn = collate_prepared_pairs if args.batched_views else None  # None: torch's default
    pairing_mode = get_method(args.method).pairing_mode

    if args.streaming:
        # Centre ids must agree across processes and runs: take them from one pass over the metadata column.
        domain_names = sorted({str(row[args.domain_column]) for row in screen.select_columns([args.domain_column])})
        # One stream for all processes: accelerate's prepare dispatches its batches to the processes.
        dataset = CrossDomainPairIterableDataset(
            screen,
            label_column=args.label_column,
            domain_column=args.domain_column,
            transform=transform,
            mode=pairing_mode,
            seed=args.seed,
            buffer_size=args.shuffle_buffer_size,
            policy=args.single_domain_policy,
            domain_to_id={name: i for i, name in enumerate(domain_names)},
            image_loader=normalization.load_normalized,
        )
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=args.per_device_train_batch_size, num_workers=args.dataloader_num_workers,
            drop_last=True, collate_fn=collate_fn,
        )
        return TrainData(dataloader, augmentation, normalization, num_channels, channel_names, len(domain_names))

    partner_index = _partner_index(screen, args)
    dataset = CrossDomainPairDataset(
        screen,
        partner_index,
        transform=transform,
        mode=pairing_mode,
        seed=args.seed,
        image_loader=normalization.load_normalized,
        cache_bytes=IMAGE_CACHE_BYTES // max(1, args.dataloader_num_workers),
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size,
        sampler=EpochIndexSampler(len(dataset), seed=args.seed),
        num_workers=args.dataloader_num_workers,
        drop_last=True,
        collate_fn=collate_fn,
        # The sampler hands each worker the epoch with every index, so workers can live across epochs and keep
        # their decoded-image caches (restarted workers would decode every image again each epoch).
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=accelerator.device.type == "cuda",
    )
    return TrainData(
        dataloader, augmentation, normalization, num_channels, channel_names, partner_index.num_domains,
        num_images=len(screen), partner_index=partner_index,
    )

"""Command-line arguments of `cdcl-train` / `training/train.py`, presets, and what a run stores of them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from ..cli import (
    CommandParser,
    add_debug_argument,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from ..cpu_kernels import LINEAR_KERNEL_HELP, LINEAR_KERNELS, cpu_linear_kernel
from ..methods import METHODS
from ..normalization import NORMALIZATION_MODES
from ..stock_export import EXPORT_FORMATS
from ..synthetic_screen import add_synthetic_screen_arguments

__all__ = [
    "LATER_SETTINGS_DEFAULTS",
    "RESUME_FREE_SETTINGS",
    "SECRET_ARGUMENTS",
    "build_parser",
    "parse_args",
    "serializable_arguments",
    "changed_resume_settings",
]

# Settings a resumed run may change: where and how often it writes, logs and stops, and how fast it computes. Every
# other setting fixes what a checkpoint's tensors mean, the data order or the schedules, so resuming with another
# value is refused, naming the setting.
RESUME_FREE_SETTINGS = (
    "config",
    "output_dir",
    "overwrite_output_dir",
    "resume_from_checkpoint",
    "stop_after_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "logging_steps",
    "report_to",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "hub_export_format",
    "dataloader_num_workers",
    "gradient_checkpointing",
    "mixed_precision",
    "cpu_linear_kernel",
    "debug",
)

# Never written to training_args.json, trackers, logs or pushed files.
SECRET_ARGUMENTS = ("hub_token",)

# Settings added after runs were already stored, with the value every earlier run had: a run stored without one of
# them is compared as if it had stored that value, so it can still be resumed.
LATER_SETTINGS_DEFAULTS = {"batched_views": False}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="cdcl-train",
        description="Train CDCL (or DINO, the baseline) on a high-content screen with Accelerate.",
        epilog="Launch with `accelerate launch training/train.py ...` (or `accelerate launch -m cdcl_hf.commands.train`) "
        "for several processes; `cdcl-train ...` runs one.",
    )
    parser.add_argument("--config", type=Path, help="YAML/JSON preset (training/configs/); flags given here win")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default="synthetic", help='screen folder, Hub dataset id, or "synthetic"')
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--dataset_revision", default=None)
    data.add_argument("--streaming", action="store_true", help="stream the screen (needs --max_train_steps)")
    data.add_argument("--shuffle_buffer_size", type=positive_int, default=1000, help="streaming: pairing / shuffle buffer")
    data.add_argument("--label_column", default="treatment", help="the biological condition partners share")
    data.add_argument("--domain_column", default="plate", help="the nuisance grouping partners differ in")
    data.add_argument(
        "--single_domain_policy",
        default="same_domain",
        choices=["same_domain", "self", "drop", "error"],
        help="labels imaged in one domain only: partner from the same domain (authors), itself, drop, or stop",
    )
    data.add_argument(
        "--normalization",
        default="plate_controls",
        choices=NORMALIZATION_MODES,
        help="intensity normalisation: per plate from its controls / all its images, or per image",
    )
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    add_synthetic_screen_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--model_preset", default="tiny", help="tiny | vit-crops-patch8 | vit-small-crops-patch8 | vit-small-patch16 | vit-base-patch16")
    model.add_argument("--init_from_vit", default=None, help="3-channel ViT/DeiT/DINO checkpoint to start from")
    model.add_argument("--pooling", default="cls", choices=["cls", "mean", "cls+mean"])
    model.add_argument("--drop_path_rate", type=probability, default=0.1, help="student only")
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--out_dim", type=positive_int, default=256)
    model.add_argument("--head_hidden_dim", type=positive_int, default=512)
    model.add_argument("--head_bottleneck_dim", type=positive_int, default=128)
    model.add_argument("--head_layers", type=positive_int, default=3)
    model.add_argument("--freeze_last_layer_epochs", type=non_negative_int, default=1)

    method = parser.add_argument_group("method")
    method.add_argument(
        "--method", default="cdcl", choices=list(METHODS),
        help="; ".join(f"{name}: {m.summary}" for name, m in METHODS.items()),
    )
    method.add_argument("--only_cross_domain", action="store_true", help="drop same-image teacher/student pairs")
    method.add_argument("--dino_weight", type=non_negative_float, default=None, help="default: the method's (cdcl 0.25, else 1)")
    method.add_argument("--cross_correlation_weight", type=non_negative_float, default=None, help="default: the method's (cdcl 0.75)")
    method.add_argument("--off_diagonal_weight", type=probability, default=0.5, help="authors: 0.95 (see configs)")
    method.add_argument("--center_momentum", type=probability, default=0.9)
    method.add_argument("--student_temp", type=positive_float, default=0.1)
    method.add_argument("--warmup_teacher_temp", type=positive_float, default=0.04)
    method.add_argument("--teacher_temp", type=positive_float, default=0.04)
    method.add_argument("--warmup_teacher_temp_epochs", type=positive_int, default=2)
    method.add_argument("--momentum_teacher", type=probability, default=0.95)
    method.add_argument("--momentum_teacher_end", type=probability, default=0.995)

    views = parser.add_argument_group("views")
    views.add_argument("--resize_to", type=positive_int, default=None, help="resize images before cropping (authors: 256)")
    views.add_argument("--global_crop_size", type=positive_int, default=32)
    views.add_argument("--global_crop_scale", type=positive_float, nargs=2, default=(0.9, 1.1))
    views.add_argument("--num_local_crops", type=non_negative_int, default=4)
    views.add_argument("--local_crop_size", type=positive_int, default=16)
    views.add_argument("--local_crop_scale", type=positive_float, nargs=2, default=(0.3, 0.5))
    views.add_argument("--gain_std", type=non_negative_float, default=0.1)
    views.add_argument("--offset_std", type=non_negative_float, default=0.1)
    views.add_argument("--blur_prob", type=probability, default=0.0)
    views.add_argument("--noise_std", type=non_negative_float, default=0.0)
    views.add_argument(
        "--batched_views", action="store_true",
        help="cut the views per batch on the training device (one grid_sample per view size) instead of per item in "
        "the data-loader workers: for GPU training or CPU-bound loaders. Views differ numerically (see docs)",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--num_train_epochs", type=positive_int, default=4)
    optim.add_argument("--max_train_steps", type=positive_int, default=None, help="overrides the epoch count")
    optim.add_argument("--steps_per_epoch", type=positive_int, default=None, help="streaming: optimizer steps per epoch")
    optim.add_argument("--per_device_train_batch_size", type=positive_int, default=32)
    optim.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    optim.add_argument("--learning_rate", type=positive_float, default=7e-4, help="peak lr after warm-up (not batch-scaled)")
    optim.add_argument("--min_learning_rate", type=non_negative_float, default=1e-5)
    optim.add_argument("--warmup_epochs", type=non_negative_float, default=1.0)
    optim.add_argument("--weight_decay", type=non_negative_float, default=4e-3)
    optim.add_argument("--weight_decay_end", type=non_negative_float, default=1e-2)
    optim.add_argument("--max_grad_norm", type=non_negative_float, default=3.0, help="global gradient-norm clip; 0 disables")
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate config")
    optim.add_argument(
        "--cpu_linear_kernel", default="auto", choices=LINEAR_KERNELS, help=LINEAR_KERNEL_HELP,
    )
    optim.add_argument("--seed", type=non_negative_int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=Path, default=Path("outputs/cdcl-tiny-synthetic"))
    run.add_argument("--overwrite_output_dir", action="store_true")
    run.add_argument("--checkpointing_steps", type=positive_int, default=100)
    run.add_argument("--checkpoints_total_limit", type=non_negative_int, default=2)
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoints/step_<n> folder')
    run.add_argument("--stop_after_steps", type=positive_int, default=None, help="stop early (schedules still span the run)")
    run.add_argument("--logging_steps", type=positive_int, default=10)
    run.add_argument("--report_to", default="none", help="none | tensorboard | trackio | wandb | all")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None)
    run.add_argument("--hub_token", default=None, help="default: your `hf auth login` token or HF_TOKEN; never saved")
    run.add_argument("--hub_private_repo", action="store_true", help="create the Hub repo private (a new repo only)")
    run.add_argument(
        "--hub_export_format", default="auto", choices=EXPORT_FORMATS,
        help="pushed weights: a stock Dinov2Model, loadable without trust_remote_code (dinov2; auto picks it when the "
        "config allows) or the custom-code CDCL model (cdcl). The local output folder always holds the CDCL model",
    )
    add_debug_argument(run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The run's settings: defaults, then the `--config` preset, then the flags given."""
    parser = build_parser()
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.config is not None:
        preset = yaml.safe_load(preliminary.config.read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(preset) - known)
        if unknown:
            parser.error(f"{preliminary.config}: unknown setting(s) {unknown}")
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    for action in parser._actions:  # preset values bypass argparse's type checks: check them the same way
        value = getattr(args, action.dest, None)
        if action.type is None or value is None or isinstance(value, str) or action.dest == "config":
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            try:
                action.type(str(item))
            except argparse.ArgumentTypeError as error:
                parser.error(f"{preliminary.config}: {action.dest}: {error}")
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length)")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    try:
        cpu_linear_kernel(args.cpu_linear_kernel)  # refuses onednn on a torch build without it, before any work
    except RuntimeError as error:
        parser.error(str(error))
    return args


def serializable_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved arguments as JSON-able values, as stored in training_args.json (secrets left out)."""
    values = {}
    for key, value in vars(args).items():
        if key in SECRET_ARGUMENTS:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        values[key] = value
    return values


def changed_resume_settings(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`"name: stored -> current"` for every setting a resume may not change (see `RESUME_FREE_SETTINGS`)."""
    names = sorted((set(stored) | set(current)) - set(RESUME_FREE_SETTINGS) - set(SECRET_ARGUMENTS))
    stored = {**LATER_SETTINGS_DEFAULTS, **stored}
    return [f"{name}: {stored.get(name)!r} -> {current.get(name)!r}" for name in names if stored.get(name) != current.get(name)]

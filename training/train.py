"""Train CDCL (or plain DINO, as the baseline) on a high-content screen with Accelerate.

    accelerate launch training/train.py                                   # tiny model, built-in synthetic screen
    accelerate launch training/train.py --config training/configs/bbbc021.yaml --dataset_name DIR_OR_HUB_ID \
        --output_dir out/bbbc021
    accelerate launch training/train.py ... --resume_from_checkpoint latest

Methods (one loop, so they compare fairly):
  dino     both global views from the same image (the baseline that learns the batch);
  dino-cb  global views from two images of the same label in different domains;
  cdcl     dino-cb + one teacher centre per domain + the cross-correlation term.

The output folder holds the EMA teacher's backbone (the embedding model) with its image processor and custom
code, loadable with `AutoModel.from_pretrained(output_dir, trust_remote_code=True)`, plus `training_args.json`,
`train_log.jsonl` and `checkpoints/step_<n>/` for resuming.
"""

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.dino_head import DINOHead, MultiCropModel, cancel_last_layer_gradients, make_teacher
from cdcl_hf.losses import CDCLObjective, teacher_domains_from_batch
from cdcl_hf.multicrop import (
    MultiCropAugmentation,
    PlateNormalizer,
    ScreenImageLoader,
    per_image_normalizer,
    stack_views,
)
from cdcl_hf.pairing import (
    CrossDomainPairDataset,
    CrossDomainPairIterableDataset,
    EpochIndexSampler,
    PartnerIndex,
    count_pair_cases,
)
from cdcl_hf.schedules import (
    apply_optimizer_schedules,
    cosine_schedule,
    param_groups_for_adamw,
    teacher_temperature_schedule,
    update_teacher_ema,
)
from cdcl_hf.screen_data import decode_image, load_screen, plate_statistics, screen_channel_names
from cdcl_hf.synthetic_screen import add_synthetic_screen_arguments, synthetic_screen_from_args

logger = get_logger(__name__)

# Arguments that change what a checkpoint's tensors mean; resuming with different values is refused.
ARCHITECTURE_ARGUMENTS = (
    "method",
    "model_preset",
    "init_from_vit",
    "pooling",
    "out_dim",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "head_layers",
    "global_crop_size",
    "num_local_crops",
    "local_crop_size",
    "label_column",
    "domain_column",
    "normalization",
    "dataset_name",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "synthetic_num_images",
    "synthetic_image_size",
    "synthetic_num_channels",
    "synthetic_batch_effect_strength",
    "synthetic_plates_per_treatment",
    "synthetic_seed",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML/JSON preset (training/configs/); flags given here win")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default="synthetic", help='screen folder, Hub dataset id, or "synthetic"')
    data.add_argument("--dataset_split", default="train")
    data.add_argument("--dataset_revision", default=None)
    data.add_argument("--streaming", action="store_true", help="stream the screen (needs --max_train_steps)")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="streaming: pairing / shuffle buffer")
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
        choices=["plate_controls", "plate_all", "per_image"],
        help="intensity normalisation: per plate from its controls / all its images, or per image",
    )
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    add_synthetic_screen_arguments(parser)

    model = parser.add_argument_group("model")
    model.add_argument("--model_preset", default="tiny", help="tiny | vit-small-patch16 | vit-base-patch16")
    model.add_argument("--init_from_vit", default=None, help="3-channel ViT/DeiT/DINO checkpoint to start from")
    model.add_argument("--pooling", default="cls", choices=["cls", "mean", "cls+mean"])
    model.add_argument("--drop_path_rate", type=float, default=0.1, help="student only")
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument("--out_dim", type=int, default=256)
    model.add_argument("--head_hidden_dim", type=int, default=512)
    model.add_argument("--head_bottleneck_dim", type=int, default=128)
    model.add_argument("--head_layers", type=int, default=3)
    model.add_argument("--freeze_last_layer_epochs", type=int, default=1)

    method = parser.add_argument_group("method")
    method.add_argument("--method", default="cdcl", choices=["dino", "dino-cb", "cdcl"])
    method.add_argument("--only_cross_domain", action="store_true", help="drop same-image teacher/student pairs")
    method.add_argument("--dino_weight", type=float, default=None, help="default: 0.25 for cdcl, 1 otherwise")
    method.add_argument("--cross_correlation_weight", type=float, default=None, help="default: 0.75 for cdcl")
    method.add_argument("--off_diagonal_weight", type=float, default=0.5, help="authors: 0.95 (see configs)")
    method.add_argument("--center_momentum", type=float, default=0.9)
    method.add_argument("--student_temp", type=float, default=0.1)
    method.add_argument("--warmup_teacher_temp", type=float, default=0.04)
    method.add_argument("--teacher_temp", type=float, default=0.04)
    method.add_argument("--warmup_teacher_temp_epochs", type=int, default=2)
    method.add_argument("--momentum_teacher", type=float, default=0.95)
    method.add_argument("--momentum_teacher_end", type=float, default=0.995)

    views = parser.add_argument_group("views")
    views.add_argument("--resize_to", type=int, default=None, help="resize images before cropping (authors: 256)")
    views.add_argument("--global_crop_size", type=int, default=32)
    views.add_argument("--global_crop_scale", type=float, nargs=2, default=(0.9, 1.1))
    views.add_argument("--num_local_crops", type=int, default=4)
    views.add_argument("--local_crop_size", type=int, default=16)
    views.add_argument("--local_crop_scale", type=float, nargs=2, default=(0.3, 0.5))
    views.add_argument("--gain_std", type=float, default=0.1)
    views.add_argument("--offset_std", type=float, default=0.1)
    views.add_argument("--blur_prob", type=float, default=0.0)
    views.add_argument("--noise_std", type=float, default=0.0)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--num_train_epochs", type=int, default=4)
    optim.add_argument("--max_train_steps", type=int, default=None, help="overrides the epoch count")
    optim.add_argument("--steps_per_epoch", type=int, default=None, help="streaming: optimizer steps per epoch")
    optim.add_argument("--per_device_train_batch_size", type=int, default=32)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=7e-4, help="peak lr after warm-up (not batch-scaled)")
    optim.add_argument("--min_learning_rate", type=float, default=1e-5)
    optim.add_argument("--warmup_epochs", type=float, default=1.0)
    optim.add_argument("--weight_decay", type=float, default=4e-3)
    optim.add_argument("--weight_decay_end", type=float, default=1e-2)
    optim.add_argument("--max_grad_norm", type=float, default=3.0, help="global gradient-norm clip; 0 disables")
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: accelerate config")
    optim.add_argument("--seed", type=int, default=0)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=Path, default=Path("outputs/cdcl-tiny-synthetic"))
    run.add_argument("--overwrite_output_dir", action="store_true")
    run.add_argument("--checkpointing_steps", type=int, default=100)
    run.add_argument("--checkpoints_total_limit", type=int, default=2)
    run.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoints/step_<n> folder')
    run.add_argument("--stop_after_steps", type=int, default=None, help="stop early (schedules still span the run)")
    run.add_argument("--logging_steps", type=int, default=10)
    run.add_argument("--report_to", default="none", help="none | tensorboard | trackio | wandb | all")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None)
    run.add_argument("--hub_token", default=None)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
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
    if args.streaming and args.max_train_steps is None:
        parser.error("--streaming needs --max_train_steps (a stream has no known length)")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    return args


def comparable_arguments(args: argparse.Namespace) -> dict:
    """The resolved arguments as JSON-able values, as stored in training_args.json."""
    values = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        values[key] = value
    return values


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse to mix two runs in one folder."""
    previous_args_file = args.output_dir / "training_args.json"
    if not previous_args_file.is_file():
        return
    if args.resume_from_checkpoint is not None:
        previous = json.loads(previous_args_file.read_text())
        current = comparable_arguments(args)
        changed = [k for k in ARCHITECTURE_ARGUMENTS if previous.get(k) != current.get(k)]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise SystemExit(
                f"cannot resume: {args.output_dir} holds a run with different settings ({details}). "
                "Resume with the original settings, or start a new run in another --output_dir."
            )
        return
    if args.overwrite_output_dir:
        shutil.rmtree(args.output_dir)
        return
    raise SystemExit(
        f"{args.output_dir} already holds a training run (training_args.json). Pass --resume_from_checkpoint latest "
        "to continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
    )


def load_training_screen(args: argparse.Namespace):
    if args.dataset_name == "synthetic":
        if args.streaming:
            raise SystemExit("--streaming is for screens on disk or the Hub, not the synthetic screen")
        return synthetic_screen_from_args(args)
    return load_screen(
        args.dataset_name, split=args.dataset_split, streaming=args.streaming, revision=args.dataset_revision
    )


def find_checkpoint(args: argparse.Namespace) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        if not (path / "training_state.json").is_file():
            raise SystemExit(f"{path} is not a checkpoint folder (no training_state.json)")
        return path
    candidates = sorted(
        (args.output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])
    )
    complete = [p for p in candidates if (p / "training_state.json").is_file()]
    if not complete:
        logger.warning(f"no checkpoint in {args.output_dir / 'checkpoints'}; starting from scratch")
        return None
    return complete[-1]


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, position: dict) -> None:
    """accelerate's state (model, optimizer, teacher, centres, RNGs) + our position in training, written last.

    `position` = {"global_step", "data_pass", "batches_done_in_pass"}: a pass is one sweep over the data (an epoch
    of a map-style screen, one read of a stream), so a resumed run continues with the very next batch."""
    global_step = position["global_step"]
    checkpoint = args.output_dir / "checkpoints" / f"step_{global_step}"
    accelerator.save_state(str(checkpoint))
    if accelerator.is_main_process:
        # training_state.json marks the checkpoint complete: a crash mid-save leaves a folder resume ignores.
        (checkpoint / "training_state.json").write_text(json.dumps(position))
        if args.checkpoints_total_limit:
            finished = sorted(
                (p for p in checkpoint.parent.glob("step_*") if (p / "training_state.json").is_file()),
                key=lambda p: int(p.name.split("_")[1]),
            )
            for old in finished[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def parameter_fingerprint(module: torch.nn.Module) -> float:
    """A float that differs between replicas whose weights differ (sum of |w| weighted by position)."""
    total = 0.0
    for position, parameter in enumerate(module.parameters(), start=1):
        total += position * parameter.detach().double().abs().sum().item()
    return total


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "runs")),
    )
    if accelerator.is_main_process:
        check_output_dir(args)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    # ---- data: screen, per-plate statistics, partner index, multi-crop views ----
    screen = load_training_screen(args)
    first_row = next(iter(screen))
    num_channels = decode_image(first_row["image"]).shape[0]
    channel_names = screen_channel_names(screen)
    for column in (args.label_column, args.domain_column):
        if column not in screen.column_names:
            raise SystemExit(f"--{'label' if column == args.label_column else 'domain'}_column {column!r} is not a "
                             f"column of the screen; columns: {screen.column_names}")

    if args.normalization == "per_image":
        image_loader = ScreenImageLoader(normalizer=per_image_normalizer)
        processor_stats = {"normalization": "per_image"}
    else:
        with accelerator.main_process_first():
            statistics = plate_statistics(screen, source="controls" if args.normalization == "plate_controls" else "all")
        image_loader = ScreenImageLoader(normalizer=PlateNormalizer(statistics))
        # Inference on a new plate: the processor's default is the average plate; pass the plate's own
        # statistics per call (image_mean / image_std) to reproduce training exactly.
        processor_stats = {
            "normalization": "per_channel",
            "image_mean": np.mean([s.mean for s in statistics.values()], axis=0).tolist(),
            "image_std": np.mean([s.std for s in statistics.values()], axis=0).tolist(),
        }

    augmentation = MultiCropAugmentation(
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
    pairing_mode = "same_image" if args.method == "dino" else "cross_domain"

    if args.streaming:
        # Centre ids must agree across processes and runs: take them from one pass over the metadata column.
        domain_names = sorted({str(row[args.domain_column]) for row in screen.select_columns([args.domain_column])})
        # One stream for all processes: accelerate's prepare dispatches its batches to the processes.
        train_dataset = CrossDomainPairIterableDataset(
            screen,
            label_column=args.label_column,
            domain_column=args.domain_column,
            transform=augmentation,
            mode=pairing_mode,
            seed=args.seed,
            buffer_size=args.shuffle_buffer_size,
            policy=args.single_domain_policy,
            domain_to_id={name: i for i, name in enumerate(domain_names)},
            image_loader=image_loader,
        )
        num_domains = len(domain_names)
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset, batch_size=args.per_device_train_batch_size, num_workers=args.dataloader_num_workers,
            drop_last=True,
        )
    else:
        try:
            partner_index = PartnerIndex.from_table(
                screen, label_column=args.label_column, domain_column=args.domain_column, policy=args.single_domain_policy
            )
        except ValueError as error:
            raise SystemExit(f"cannot pair the screen's images for --method {args.method}: {error}") from error
        if args.method != "dino" and partner_index.counts["items_cross_domain"] == 0:
            raise SystemExit(
                f"no image has a partner with the same {args.label_column!r} in another {args.domain_column!r} "
                f"({partner_index.num_domains} domain(s)), so --method {args.method} would learn nothing beyond DINO; "
                "choose another --domain_column / --label_column, or --method dino"
            )
        logger.info(f"partner index: {partner_index.state_summary()}", main_process_only=True)
        train_dataset = CrossDomainPairDataset(
            screen, partner_index, transform=augmentation, mode=pairing_mode, seed=args.seed, image_loader=image_loader
        )
        num_domains = partner_index.num_domains
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=EpochIndexSampler(len(train_dataset), seed=args.seed),
            num_workers=args.dataloader_num_workers,
            drop_last=True,
        )

    # ---- model: student backbone + DINO head, EMA teacher ----
    if args.init_from_vit:
        backbone = CDCLModel.from_vit_checkpoint(
            args.init_from_vit, num_channels=num_channels, drop_path_rate=args.drop_path_rate, pooling=args.pooling,
            channel_names=channel_names,
        )
    else:
        backbone = CDCLModel(
            CDCLConfig.from_preset(
                args.model_preset,
                num_channels=num_channels,
                channel_names=channel_names,
                image_size=args.global_crop_size,
                drop_path_rate=args.drop_path_rate,
                pooling=args.pooling,
            )
        )
    if args.gradient_checkpointing:
        backbone.activation_checkpointing_enable()
    head = DINOHead(
        backbone.config.pooled_size,
        args.out_dim,
        hidden_dim=args.head_hidden_dim,
        bottleneck_dim=args.head_bottleneck_dim,
        nlayers=args.head_layers,
    )
    student = MultiCropModel(backbone, head)
    teacher = make_teacher(student)

    optimizer = torch.optim.AdamW(param_groups_for_adamw(student, args.weight_decay), lr=args.learning_rate)
    if accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    ):
        # Sharded parameters would make every rank's EMA teacher average only its own shard of the student.
        raise SystemExit(
            "the EMA teacher needs the full student parameters on every process; FSDP and DeepSpeed ZeRO-3 shard "
            "them. Use DDP (MULTI_GPU) or DeepSpeed ZeRO-1/2 in `accelerate config` (a ViT-S/B fits on one GPU)."
        )
    student, optimizer, train_dataloader = accelerator.prepare(student, optimizer, train_dataloader)
    teacher.to(accelerator.device)

    # ---- schedules, per optimizer step ----
    if args.streaming:
        steps_per_epoch = args.steps_per_epoch or args.max_train_steps
    else:
        steps_per_epoch = len(train_dataloader) // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise SystemExit(
                f"the screen gives {len(train_dataloader)} batches per process, fewer than one optimizer step "
                f"({args.gradient_accumulation_steps} accumulation steps); lower --per_device_train_batch_size"
            )
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_schedule = cosine_schedule(
        args.learning_rate, args.min_learning_rate, num_epochs, steps_per_epoch, warmup_epochs=min(args.warmup_epochs, num_epochs)
    )
    wd_schedule = cosine_schedule(args.weight_decay, args.weight_decay_end, num_epochs, steps_per_epoch)
    momentum_schedule = cosine_schedule(args.momentum_teacher, args.momentum_teacher_end, num_epochs, steps_per_epoch)
    view_sources = augmentation.view_sources().to(accelerator.device)

    objective = CDCLObjective(
        method=args.method,
        out_dim=args.out_dim,
        num_domains=num_domains,
        teacher_temp_schedule=teacher_temperature_schedule(
            num_epochs, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs
        ),
        student_temp=args.student_temp,
        dino_weight=args.dino_weight,
        cross_correlation_weight=args.cross_correlation_weight,
        off_diagonal_weight=args.off_diagonal_weight,
        center_momentum=args.center_momentum,
        only_cross_domain=args.only_cross_domain,
        gather_distributed=accelerator.num_processes > 1,
    )
    objective.to(accelerator.device)
    # Not optimised, but part of the training state: saved and restored with every checkpoint.
    accelerator.register_for_checkpointing(teacher, objective)

    # ---- resume ----
    position = {"global_step": 0, "data_pass": 0, "batches_done_in_pass": 0}
    checkpoint = find_checkpoint(args)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        position = json.loads((checkpoint / "training_state.json").read_text())
        accelerator.print(f"resumed from {checkpoint} at step {position['global_step']}")
    global_step = position["global_step"]

    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "training_args.json").write_text(json.dumps(comparable_arguments(args), indent=2))
    if args.report_to != "none":
        # Trackers (TensorBoard's hparams) take scalars only.
        tracker_config = {
            key: (str(value) if isinstance(value, list) else value)
            for key, value in comparable_arguments(args).items()
            if value is not None
        }
        accelerator.init_trackers("cdcl", config=tracker_config)
    if not args.streaming:
        accelerator.print(
            f"{len(screen)} images, {partner_index.num_labels} labels ({args.label_column}), {num_domains} domains "
            f"({args.domain_column}); partner cases: {partner_index.counts}"
        )
    accelerator.print(
        f"{args.method}: {max_train_steps} steps ({num_epochs} epochs of {steps_per_epoch}), "
        f"{accelerator.num_processes} process(es) x batch {args.per_device_train_batch_size} x accumulation "
        f"{args.gradient_accumulation_steps}"
    )

    # ---- train ----
    stop_at = min(max_train_steps, args.stop_after_steps or max_train_steps)
    progress_bar = tqdm(
        total=stop_at, initial=global_step, disable=not accelerator.is_local_main_process, desc="training"
    )
    log_file = args.output_dir / "train_log.jsonl"
    data_pass = position["data_pass"]
    student.train()
    while global_step < stop_at:
        # accelerate's loaders pass the pass index on to the sampler (map-style) or the dataset (stream), which
        # derive the shuffling, partners and augmentations from it.
        train_dataloader.set_epoch(data_pass)
        batches_done = position["batches_done_in_pass"] if data_pass == position["data_pass"] else 0
        pass_dataloader = train_dataloader
        if batches_done > 0:
            pass_dataloader = accelerator.skip_first_batches(train_dataloader, batches_done)
            pass_dataloader.set_epoch(data_pass)
        steps_before_pass = global_step

        pair_cases = {}
        for batch_index, batch in enumerate(pass_dataloader, start=batches_done):
            epoch = global_step // steps_per_epoch  # drives the per-epoch schedules (teacher temperature, freezing)
            # Drop-path masks come from the global RNG; seeding it per batch makes them a function of the position
            # in training, so a resumed run draws exactly what an uninterrupted one does.
            torch.manual_seed(
                int(np.random.SeedSequence([args.seed, data_pass, batch_index, accelerator.process_index]).generate_state(1)[0])
            )
            with accelerator.accumulate(student):
                views = stack_views(batch)
                with torch.no_grad(), accelerator.autocast():
                    teacher_out = teacher(views[:2])
                with accelerator.autocast():
                    student_out = student(views)
                output = objective(
                    student_out.float(),
                    teacher_out.float(),
                    epoch,
                    teacher_domains=teacher_domains_from_batch(batch["domain"], batch["partner_domain"]),
                    view_sources=view_sources,
                )
                finite = accelerator.gather(torch.isfinite(output.loss.detach()).reshape(1))
                if not bool(finite.all()):
                    raise FloatingPointError(
                        f"non-finite loss at step {global_step} (epoch {epoch}); nothing was saved for this step. "
                        f"The last good checkpoint is in {args.output_dir / 'checkpoints'}; resume from it with a "
                        "lower --learning_rate, a smaller --max_grad_norm or --mixed_precision no."
                    )
                accelerator.backward(output.loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                cancel_last_layer_gradients(student, epoch, args.freeze_last_layer_epochs)
                apply_optimizer_schedules(optimizer, global_step, lr_schedule, wd_schedule)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for case, count in count_pair_cases(batch["pair_case"]).items():
                pair_cases[case] = pair_cases.get(case, 0) + count
            if not accelerator.sync_gradients:
                continue

            # The same momentum and the same (all-reduced) student weights on every rank keep teachers identical.
            update_teacher_ema(accelerator.unwrap_model(student), teacher, float(momentum_schedule[global_step]))
            global_step += 1
            progress_bar.update(1)

            if global_step % args.logging_steps == 0 or global_step == stop_at or global_step == 1:
                logs = {name: value.item() for name, value in output.logs.items()}
                logs.update(
                    step=global_step,
                    epoch=epoch,
                    lr=optimizer.param_groups[0]["lr"],
                    weight_decay=optimizer.param_groups[0]["weight_decay"],
                    teacher_momentum=float(momentum_schedule[global_step - 1]),
                    **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                    **{f"pairs_{case}": count for case, count in pair_cases.items() if count},
                )
                progress_bar.set_postfix(loss=f"{logs['loss']:.4f}")
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    with log_file.open("a") as handle:
                        handle.write(json.dumps(logs) + "\n")
                pair_cases = {}  # counts per logging interval
            if global_step % args.checkpointing_steps == 0 or global_step == stop_at:
                position = {"global_step": global_step, "data_pass": data_pass, "batches_done_in_pass": batch_index + 1}
                save_checkpoint(accelerator, args, position)
            if global_step >= stop_at:
                break
        # A resumed pass may have nothing left (the checkpoint was at its end); a fresh pass must give a step.
        if global_step == steps_before_pass and global_step < stop_at and batches_done == 0:
            raise SystemExit(
                f"a full pass over the screen gave no optimizer step: fewer than "
                f"{args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes} "
                "usable items; lower --per_device_train_batch_size or --gradient_accumulation_steps"
            )
        data_pass += 1
    progress_bar.close()

    # ---- replicas must agree; then save the teacher backbone as the embedding model ----
    fingerprints = accelerator.gather(
        torch.tensor(
            [[parameter_fingerprint(accelerator.unwrap_model(student)), parameter_fingerprint(teacher)]],
            dtype=torch.float64,
            device=accelerator.device,
        )
    ).cpu()
    if not torch.allclose(fingerprints, fingerprints[:1].expand_as(fingerprints), rtol=1e-9, atol=0):
        raise RuntimeError(f"student / teacher weights differ between processes: {fingerprints.tolist()}")

    if accelerator.is_main_process:
        summary = {
            "global_step": global_step,
            "finished": global_step >= max_train_steps,
            "num_processes": accelerator.num_processes,
            "replica_fingerprints": fingerprints.tolist(),
        }
        (args.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    if global_step < max_train_steps:
        accelerator.print(f"stopped at step {global_step} of {max_train_steps}; resume with --resume_from_checkpoint latest")
        accelerator.end_training()
        return

    if accelerator.is_main_process:
        embedding_model = teacher.backbone
        embedding_model.config.drop_path_rate = 0.0
        embedding_model.save_pretrained(args.output_dir)
        CDCLImageProcessor(
            num_channels=num_channels,
            channel_names=channel_names,
            size={"height": args.global_crop_size, "width": args.global_crop_size},
            **processor_stats,
        ).save_pretrained(args.output_dir)
        accelerator.print(f"saved the teacher backbone and image processor to {args.output_dir}")
        if args.push_to_hub:
            from huggingface_hub import HfApi

            api = HfApi(token=args.hub_token)
            api.create_repo(args.hub_model_id, exist_ok=True)
            api.upload_folder(
                repo_id=args.hub_model_id,
                folder_path=str(args.output_dir),
                ignore_patterns=["checkpoints/*", "runs/*"],
                commit_message=f"CDCL ({args.method}) after {global_step} steps",
            )
            accelerator.print(f"pushed to {args.hub_model_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())

"""Train CDCL (or plain DINO, the baseline) on a high-content screen with Accelerate.

    accelerate launch training/train.py                                   # tiny model, built-in synthetic screen
    accelerate launch training/train.py --config training/configs/bbbc021.yaml --dataset_name DIR_OR_HUB_ID \
        --output_dir out/bbbc021
    accelerate launch training/train.py ... --resume_from_checkpoint latest
    cdcl-train ...                                                        # the same, one process

The output folder holds the EMA teacher's backbone (the embedding model) with its image processor and custom
code, loadable with `AutoModel.from_pretrained(output_dir, trust_remote_code=True)`, plus `training_args.json`,
`train_log.jsonl` and `checkpoints/step_<n>/` for resuming. The stages live in `cdcl_hf.training`.
"""

from __future__ import annotations

import json

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed

from ..cli import command_errors
from ..outputs import atomic_write_text, fault_point
from ..publishing import publish_model
from ..training.arguments import parse_args
from ..training.checkpoints import load_checkpoint, prepare_output_dir, write_training_args
from ..training.components import (
    TrainingSchedules,
    build_objective,
    build_optimizer,
    build_student_teacher,
    check_distributed_setup,
    verify_replicas_agree,
)
from ..training.data import build_train_data
from ..training.export import export_embedding_model
from ..training.loop import train_loop
from ..training.tracking import configure_logging, init_trackers

logger = get_logger(__name__)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with command_errors("cdcl-train", args.debug):
        train(args)
    return 0


def train(args) -> None:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir), logging_dir=str(args.output_dir / "runs")),
    )
    configure_logging(accelerator)
    check_distributed_setup(accelerator)
    if accelerator.is_main_process:
        prepare_output_dir(args)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    data = build_train_data(args, accelerator)
    student, teacher = build_student_teacher(args, data.num_channels, data.channel_names)
    optimizer = build_optimizer(student, args)
    student, optimizer, dataloader = accelerator.prepare(student, optimizer, data.dataloader)
    teacher.to(accelerator.device)
    schedules = TrainingSchedules.for_run(args, dataloader)
    objective = build_objective(args, data.num_domains, schedules, accelerator)
    # Not optimised, but part of the training state: saved and restored with every checkpoint.
    accelerator.register_for_checkpointing(teacher, objective)
    position = load_checkpoint(accelerator, args, data.channel_names)

    if accelerator.is_main_process:
        write_training_args(args)
    init_trackers(accelerator, args)
    if data.partner_index is not None:
        logger.info(f"{data.num_images} images, {data.partner_index.num_labels} labels ({args.label_column}), "
                    f"{data.num_domains} domains ({args.domain_column})")
    logger.info(
        f"{args.method}: {schedules.max_train_steps} steps ({schedules.num_epochs} epochs of {schedules.steps_per_epoch}), "
        f"{accelerator.num_processes} process(es) x batch {args.per_device_train_batch_size} x accumulation "
        f"{args.gradient_accumulation_steps}"
    )

    global_step = train_loop(
        accelerator, args, student, teacher, objective, optimizer, dataloader, schedules, position, data.channel_names,
        batched_views=data.augmentation if args.batched_views else None,
    )
    fingerprints = verify_replicas_agree(accelerator, student, teacher)
    finished = global_step >= schedules.max_train_steps
    if accelerator.is_main_process:
        if finished:
            export_embedding_model(teacher.backbone, data.normalization, args.global_crop_size, args.output_dir)
        fault_point("summary")
        # Written last: "finished" promises a complete embedding model beside it.
        summary = {"global_step": global_step, "finished": finished, "num_processes": accelerator.num_processes,
                   "replica_fingerprints": fingerprints}
        atomic_write_text(args.output_dir / "training_summary.json", json.dumps(summary, indent=2))
        if not finished:
            logger.info(f"stopped at step {global_step} of {schedules.max_train_steps}; "
                        "resume with --resume_from_checkpoint latest")
        elif args.push_to_hub:
            # One commit with the model, its card and serving files; the token (if given) is used, never stored.
            publish_model(args.output_dir, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                          export_format=args.hub_export_format)
    accelerator.wait_for_everyone()
    # The DDP wrapper's Reducer holds the process group, and freeing the Reducer keeps the GIL while Gloo's worker
    # threads may still need it to release the last collective's tensors (a teardown deadlock seen with 2 CPU
    # processes under load). Free the model while the group is still registered, so that the group itself is destroyed
    # by `end_training` (torch's process-group binding lets go of the GIL there).
    del student, optimizer, dataloader
    accelerator.free_memory()
    accelerator.end_training()


if __name__ == "__main__":
    raise SystemExit(main())

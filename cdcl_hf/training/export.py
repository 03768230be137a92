"""The end product of a run: the EMA teacher's backbone as an embedding model, with its image processor."""

from __future__ import annotations

from pathlib import Path

from accelerate.logging import get_logger

from ..image_processing_cdcl import CDCLImageProcessor
from ..modeling_cdcl import CDCLModel
from ..normalization import PlateNormalization

__all__ = ["export_embedding_model", "push_training_output"]

logger = get_logger(__name__)

# Training state that stays out of a published model repository.
UNPUBLISHED_PATTERNS = ["checkpoints/*", "runs/*"]


def export_embedding_model(
    backbone: CDCLModel,
    normalization: PlateNormalization,
    crop_size: int,
    output_dir: Path,
) -> None:
    """Save `backbone` (the teacher's, without drop-path) and the image processor that reproduces training's input.

    The processor resizes to the global crop size and normalises as training did (`PlateNormalization.
    processor_kwargs`: the average plate for per-plate runs); both files carry their code, so the folder loads with
    `AutoModel` / `AutoImageProcessor` with or without cdcl-hf installed.
    """
    backbone.config.drop_path_rate = 0.0
    backbone.save_pretrained(output_dir)
    CDCLImageProcessor(
        num_channels=backbone.config.num_channels,
        channel_names=backbone.config.channel_names,
        size={"height": crop_size, "width": crop_size},
        **normalization.processor_kwargs(),
    ).save_pretrained(output_dir)
    logger.info(f"saved the teacher backbone and image processor to {output_dir}")


def push_training_output(output_dir: Path, repo_id: str, commit_message: str, token: str | None = None) -> None:
    """Upload the exported model folder (not the checkpoints or tracker logs) to the Hub model repo `repo_id`."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), ignore_patterns=UNPUBLISHED_PATTERNS, commit_message=commit_message
    )
    logger.info(f"pushed to {repo_id}")

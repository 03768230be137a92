"""The end product of a run: the EMA teacher's backbone as an embedding model, with its image processor and card.

Publishing it to the Hub is `cdcl_hf.publishing.publish_model` (`cdcl-push`, `cdcl-train --push_to_hub`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from accelerate.logging import get_logger

from ..image_processing_cdcl import CDCLImageProcessor
from ..model_card import build_model_card, write_model_card
from ..modeling_cdcl import CDCLModel
from ..normalization import PlateNormalization
from ..outputs import fault_point, temporary_prefix

__all__ = ["export_embedding_model"]

logger = get_logger(__name__)


def export_embedding_model(
    backbone: CDCLModel,
    normalization: PlateNormalization,
    crop_size: int,
    output_dir: Path,
) -> None:
    """Save `backbone` (the teacher's, without drop-path) and the image processor that reproduces training's input.

    The processor resizes to the global crop size and normalises as training did
    (`PlateNormalization.processor_kwargs`: the average plate for per-plate runs); both carry their code, so the
    folder loads with `AutoModel` / `AutoImageProcessor` with or without cdcl-hf installed. A model card (README.md,
    `cdcl_hf.model_card`) describes it: channels, normalisation, usage and the run's recipe.
    """
    backbone.config.drop_path_rate = 0.0
    processor = CDCLImageProcessor(
        num_channels=backbone.config.num_channels,
        channel_names=backbone.config.channel_names,
        size={"height": crop_size, "width": crop_size},
        **normalization.processor_kwargs(),
    )
    # Written beside the run first, then moved in file by file: a kill leaves no half-written file, and the run's
    # "finished" mark (training_summary.json, written after this returns) is what says the export is complete.
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(), dir=output_dir))
    try:
        backbone.save_pretrained(staging)
        processor.save_pretrained(staging)
        # The card of the local folder: the recipe from training_args.json (written when the run started), no
        # results yet (cdcl-push --evaluation_dir adds them on the Hub).
        training_args_file = output_dir / "training_args.json"
        training_args = json.loads(training_args_file.read_text()) if training_args_file.is_file() else None
        card = build_model_card(backbone.config.to_dict(), processor.to_dict(), training_args,
                                model_id=str(output_dir), export_format="cdcl")
        write_model_card(staging, card)
        for index, path in enumerate(sorted(staging.iterdir())):
            if index == 1:
                fault_point("export")
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"saved the teacher backbone and image processor to {output_dir}")

"""The serving files a published checkpoint carries: the microscopy pipeline, the Endpoint handler, their requirements.

`write_serving_files(model_dir)` turns an export folder (``config.json``, weights, ``preprocessor_config.json`` and the
image processor's code, as ``cdcl-train`` writes it or ``save_pretrained`` makes it; the model may be the custom
``CDCLModel`` or a stock transformers backbone) into one that also serves:

* ``pipeline_cdcl.py`` (from :mod:`cdcl_hf.pipeline_cdcl`) and, in ``config.json``, the ``custom_pipelines`` entry
  transformers reads to find it: ``pipeline(model=<repo or folder>, trust_remote_code=True)`` then builds the
  microscopy pipeline (task ``"microscopy-feature-extraction"``);
* ``handler.py`` (from :mod:`cdcl_hf.handler`): the ``EndpointHandler`` of a Hugging Face Inference Endpoint;
* ``requirements.txt``: what the Endpoint installs on top of its image.

How transformers finds a custom pipeline (checked with transformers 5.24): ``pipeline()`` loads the config, and when
``config.custom_pipelines`` has the task (or holds exactly one task and none is given) it imports ``impl``
(``"pipeline_cdcl.CDCLMicroscopyPipeline"``) with ``get_class_from_dynamic_module`` -- copying ``pipeline_cdcl.py``
from the folder or repository into the dynamic-modules cache, which needs ``trust_remote_code=True`` -- and loads the
model with the classes named in ``pt`` (``AutoModel``, which follows the config's ``auto_map`` for a custom model).
The same entry is what ``PIPELINE_REGISTRY.register_pipeline(...)`` followed by ``Pipeline.save_pretrained`` writes;
this module writes it directly, because the folder already holds the model and the processor and must not be
re-saved.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .pipeline_cdcl import TASK, CDCLMicroscopyPipeline

PIPELINE_FILE = "pipeline_cdcl.py"
HANDLER_FILE = "handler.py"
REQUIREMENTS_FILE = "requirements.txt"
CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
SOURCE_DIR = Path(__file__).resolve().parent
# The shipped file -> its source in this package.
SHIPPED_SOURCES = {PIPELINE_FILE: SOURCE_DIR / "pipeline_cdcl.py", HANDLER_FILE: SOURCE_DIR / "handler.py"}
# The config.json entry transformers' pipeline() reads (what Pipeline.save_pretrained writes for a registered pipeline).
CUSTOM_PIPELINES = {
    TASK: {
        "impl": f"{Path(PIPELINE_FILE).stem}.{CDCLMicroscopyPipeline.__name__}",
        "pt": ["AutoModel"],
        "type": "image",
    }
}
# What the shipped code imports. transformers' floor is the package's own (pyproject.toml): from 5.18 on its
# AutoImageProcessor loads a custom processor without torchvision (tests/test_min_transformers_version.py).
SERVING_REQUIREMENTS = (
    "transformers>=5.18,<6",
    "torch>=2.4",
    "numpy>=1.26",
    "pillow>=10.0",
    "tifffile>=2024.1",
)


def _write_atomically(path: Path, text: str) -> None:
    # A reader (or an upload started meanwhile) never sees half a config.json.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_serving_files(model_dir: str | os.PathLike) -> list[str]:
    """Add the microscopy pipeline, the Endpoint handler and their requirements to an exported checkpoint folder.

    Writes ``pipeline_cdcl.py``, ``handler.py`` and ``requirements.txt`` (replacing earlier copies) and adds the
    ``custom_pipelines`` entry to ``config.json`` (every other key is kept). Running it twice gives the same folder.

    Args:
        model_dir (`str` or `os.PathLike`):
            A checkpoint folder with ``config.json`` and ``preprocessor_config.json`` (the pipeline and the handler
            need the image processor the model was trained with).

    Returns:
        `list[str]`: The names of the files written or changed, relative to `model_dir`.

    Raises:
        FileNotFoundError: `model_dir` is not a folder, or lacks ``config.json`` / ``preprocessor_config.json``.
        ValueError: ``config.json`` is not a JSON object, or already names another custom pipeline for the task.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist; pass a checkpoint folder (save_pretrained)")
    for required, why in ((CONFIG_FILE, "the model's config"), (PROCESSOR_FILE, "the image processor the pipeline uses")):
        if not (folder / required).is_file():
            raise FileNotFoundError(
                f"model folder {folder} has no {required} ({why}); save the model and its image processor into it "
                "(save_pretrained) before adding the serving files"
            )
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, expected an object")
    existing = config.get("custom_pipelines") or {}
    if TASK in existing and existing[TASK].get("impl") != CUSTOM_PIPELINES[TASK]["impl"]:
        raise ValueError(
            f"{config_path} already registers {existing[TASK].get('impl')!r} for the task {TASK!r}; remove that "
            "custom_pipelines entry first"
        )
    config["custom_pipelines"] = {**existing, **CUSTOM_PIPELINES}
    # transformers writes config.json sorted, indented by 2, with a final newline.
    _write_atomically(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")

    for name, source in SHIPPED_SOURCES.items():
        shutil.copyfile(source, folder / name)
    _write_atomically(folder / REQUIREMENTS_FILE, "\n".join(SERVING_REQUIREMENTS) + "\n")
    return [PIPELINE_FILE, HANDLER_FILE, REQUIREMENTS_FILE, CONFIG_FILE]


__all__ = ["CUSTOM_PIPELINES", "SERVING_REQUIREMENTS", "TASK", "write_serving_files"]

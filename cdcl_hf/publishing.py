"""Publishing a finished training run to the Hub: one function, `publish_model`, used by `cdcl-push` and
`cdcl-train --push_to_hub`.

The repository content is assembled in a temporary staging folder and uploaded in **one commit**
(`HfApi.create_commit`): the weights (safetensors; a stock `Dinov2Model` when the configuration allows, see
`cdcl_hf.stock_export`), `config.json`, `preprocessor_config.json`, the custom code, the model card (README.md,
`cdcl_hf.model_card`), the evaluation's `results.json` and the serving files (`cdcl_hf.serving`).
Because a Hub commit is atomic, a push that fails part-way (an LFS upload or the commit itself) leaves the branch
where it was: there is never a revision with new weights and an old config, or a card without its model. The commit
is made against the branch head read before the upload (`parent_commit`), so a concurrent push is refused rather than
mixed in. Re-running the same push uploads what is missing and commits.

The token: `token` when given (`--hub_token` / `--token`, never stored), else the standard login (`hf auth login`) or
`HF_TOKEN`. Every staged file is checked for it before anything is uploaded.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .cli import one_line
from .image_processing_cdcl import CDCLImageProcessor
from .model_card import DEFAULT_LICENSE, build_model_card, looks_like_hub_id, write_model_card
from .modeling_cdcl import CDCLModel
from .outputs import temporary_prefix
from .serving import write_serving_files
from .stock_export import EXPORT_FORMATS, merge_stock_processor_settings, resolve_export_format, to_dinov2

__all__ = [
    "PublishError",
    "EXPORT_FORMATS",
    "PACKAGE_FILES",
    "check_finished_run",
    "load_evaluation_results",
    "stage_repository",
    "publish_model",
]

logger = logging.getLogger(__name__)


class PublishError(OSError):
    """The upload to the Hub failed or was refused; the message says at which stage and what the repo holds now."""


# Files a cdcl-hf publish writes into a repository. When a new push no longer writes one of them (e.g. the model code
# after switching to the stock format, or an old results.json), it is deleted in the same commit; files the package
# does not write are never touched.
PACKAGE_FILES = (
    "config.json", "model.safetensors", "preprocessor_config.json", "configuration_cdcl.py", "modeling_cdcl.py",
    "image_processing_cdcl.py", "README.md", "results.json", "pipeline_cdcl.py", "handler.py", "requirements.txt",
)
TRAINING_SUMMARY = "training_summary.json"
TRAINING_ARGS = "training_args.json"
REQUIRED_MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def check_finished_run(training_output_dir: Path) -> dict[str, Any]:
    """The run's `training_summary.json`, refusing a folder whose run has not finished.

    Raises:
        FileNotFoundError: No such folder, or a folder without the exported model.
        ValueError: No `training_summary.json` (a run still going, killed, or not a training run), or `finished: false`.
    """
    folder = Path(training_output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"training output folder {folder} does not exist")
    summary_path = folder / TRAINING_SUMMARY
    if not summary_path.is_file():
        raise ValueError(
            f"{folder} has no {TRAINING_SUMMARY}: its training run has not finished (or this is not a cdcl-hf training "
            "output folder); finish it (--resume_from_checkpoint latest) before publishing"
        )
    summary = json.loads(summary_path.read_text())
    if not summary.get("finished"):
        raise ValueError(
            f"{folder}: the training run stopped at step {summary.get('global_step')} without finishing, so it holds "
            "no final model; resume it with --resume_from_checkpoint latest before publishing"
        )
    missing = [name for name in REQUIRED_MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} is marked finished but lacks {', '.join(missing)}: it holds no whole model")
    return summary


def load_evaluation_results(evaluation_dir: Path, training_output_dir: Path, repo_id: str) -> dict[str, Any]:
    """The evaluation's `results.json`, refusing one that scored another local model.

    Raises:
        FileNotFoundError: No `results.json` in `evaluation_dir`.
        ValueError: The results name a local model folder other than `training_output_dir`.
    """
    path = Path(evaluation_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{evaluation_dir} has no results.json (write one with cdcl-evaluate --output_dir)")
    results = json.loads(path.read_text())
    evaluated = str(results.get("model", ""))
    if evaluated not in ("", repo_id) and Path(evaluated).exists():
        if Path(evaluated).resolve() != Path(training_output_dir).resolve():
            raise ValueError(
                f"{path} scores the model {evaluated}, not {training_output_dir}; publish results of this model only"
            )
    return results


def stage_repository(
    training_output_dir: Path,
    staging: Path,
    *,
    repo_id: str,
    revision: str | None = None,
    results: dict[str, Any] | None = None,
    export_format: str = "auto",
    license: str | None = None,
    training_dataset: str | None = None,
    base_model: str | None = None,
    space_id: str | None = None,
    rgb_white_level: int | None = None,
) -> str:
    r"""
    Write the repository content of a finished run into the empty folder `staging`.

    Args:
        training_output_dir (`Path`): The finished run (checked with `check_finished_run` by the caller).
        staging (`Path`): An empty folder.
        repo_id (`str`), revision (`str`, *optional*): Where it will be pushed (for the card's usage snippet).
        results (`dict`, *optional*): The evaluation's `results.json`, copied and summarised in the card.
        export_format (`str`, *optional*, defaults to `"auto"`): See `cdcl_hf.stock_export.resolve_export_format`.
        license (`str`, *optional*), training_dataset (`str`, *optional*), base_model (`str`, *optional*),
        space_id (`str`, *optional*): For the model card (`cdcl_hf.model_card.build_model_card`).
        rgb_white_level (`int`, *optional*): For the stock processor of 3-channel models
            (`cdcl_hf.stock_export.stock_processor_settings`).

    Returns:
        `str`: The format written, `"dinov2"` or `"cdcl"`.
    """
    folder = Path(training_output_dir)
    model = CDCLModel.from_pretrained(folder).eval()
    model.config.drop_path_rate = 0.0
    processor = CDCLImageProcessor.from_pretrained(folder)
    chosen = resolve_export_format(model.config, export_format)
    if chosen == "dinov2":
        to_dinov2(model).save_pretrained(staging)
    else:
        model.save_pretrained(staging)  # with its code (configuration_cdcl.py, modeling_cdcl.py)
    processor.save_pretrained(staging)  # with image_processing_cdcl.py and its auto_map
    if chosen == "dinov2":
        # Only where the model itself needs no custom code is a stock processor any use.
        merge_stock_processor_settings(staging, rgb_white_level)
    if results is not None:
        (staging / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    serving = write_serving_files(staging)  # after config.json: it registers the microscopy pipeline there

    training_args = json.loads((folder / TRAINING_ARGS).read_text()) if (folder / TRAINING_ARGS).is_file() else {}
    card = build_model_card(
        model.config.to_dict(),
        json.loads((staging / "preprocessor_config.json").read_text()),
        training_args,
        results,
        model_id=repo_id,
        revision=revision or "main",
        export_format=chosen,
        license=license,
        training_dataset=training_dataset,
        base_model=base_model,
        serving_files=serving,
        space_id=space_id,
        summary=json.loads((folder / TRAINING_SUMMARY).read_text()),
    )
    write_model_card(staging, card)
    return chosen


def _tokens_in_use(token: str | None) -> list[str]:
    from huggingface_hub import get_token

    return [t for t in {token, get_token()} if isinstance(t, str) and len(t) >= 8]


def _refuse_files_with_tokens(staging: Path, tokens: list[str]) -> None:
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            content = path.read_bytes()
            if any(token.encode() in content for token in tokens):
                raise ValueError(f"refusing to push: the staged {path.name} contains your Hub token")


def _on_hub(api, repo_id: str, repo_type: str) -> bool:
    """Whether `repo_id` is a repository of `repo_type` the Hub knows (front matter may only name those)."""
    try:
        api.repo_info(repo_id, repo_type=repo_type)
    except Exception as error:  # noqa: BLE001 - not found, no access or no network: the card does not name it
        logger.info(f"not naming {repo_type} {repo_id} in the card's front matter: {one_line(error)}")
        return False
    return True


def publish_model(
    training_output_dir: str | Path,
    repo_id: str,
    *,
    evaluation_dir: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    export_format: str = "auto",
    license: str | None = None,
    space_id: str | None = None,
    rgb_white_level: int | None = None,
):
    r"""
    Push a finished training run's embedding model to the Hub model repository `repo_id`, in one commit.

    Args:
        training_output_dir (`str` or `Path`): A finished `cdcl-train` output folder (`training_summary.json` says
            `finished: true`).
        repo_id (`str`): The model repository, `"org/name"`; created when missing.
        evaluation_dir (`str` or `Path`, *optional*): A `cdcl-evaluate` output folder of this model: its
            `results.json` is pushed and fills the card's results, limitations and model index.
        private (`bool`, *optional*, defaults to `False`): Create the repository private. An existing public repo is
            refused rather than pushed to (its visibility is not changed here).
        revision (`str`, *optional*): The branch to commit to (default `main`); created from `main` when missing.
        create_pr (`bool`, *optional*, defaults to `False`): Open a pull request against `revision` instead of
            committing to it.
        commit_message (`str`, *optional*): Defaults to a summary of the run.
        token (`str`, *optional*): A Hub token overriding the standard login / `HF_TOKEN`; never written anywhere.
        export_format (`str`, *optional*, defaults to `"auto"`): `"auto"` (stock Dinov2 when the configuration
            allows, else custom code), `"dinov2"` or `"cdcl"`.
        license (`str`, *optional*): The card's license (default `apache-2.0`, see `cdcl_hf.model_card`).
        space_id (`str`, *optional*): A Space hosting the demo, linked from the card.
        rgb_white_level (`int`, *optional*): The raw intensity 255 stands for in RGB renderings given to the stock
            pipeline (3-channel models; default: guessed from the statistics).

    Returns:
        `huggingface_hub.CommitInfo`: The commit (`oid`, `commit_url`; `pr_url` / `pr_num` with `create_pr`).

    Raises:
        ValueError, FileNotFoundError: An unfinished run, missing files, results of another model, a format the
            model cannot take, a token in a staged file.
        PublishError: The Hub refused or failed the upload; the message names the stage and whether the branch
            changed (it does not, unless the server committed and then failed).
    """
    from huggingface_hub import HfApi

    folder = Path(training_output_dir)
    summary = check_finished_run(folder)
    results = load_evaluation_results(Path(evaluation_dir), folder, repo_id) if evaluation_dir is not None else None
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {export_format!r}")
    branch = revision or "main"
    api = HfApi(token=token)
    training_args = json.loads((folder / TRAINING_ARGS).read_text()) if (folder / TRAINING_ARGS).is_file() else {}

    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix()))
    try:
        # Front matter may only name repositories the Hub has: a local "data/screen" reads like an id too.
        dataset = training_args.get("dataset_name")
        training_dataset = dataset if looks_like_hub_id(dataset) and _on_hub(api, dataset, "dataset") else None
        start = training_args.get("init_from_vit")
        base_model = start if looks_like_hub_id(start) and _on_hub(api, start, "model") else None
        chosen = stage_repository(
            folder, staging, repo_id=repo_id, revision=branch, results=results, export_format=export_format,
            license=license or DEFAULT_LICENSE, training_dataset=training_dataset, base_model=base_model,
            space_id=space_id, rgb_white_level=rgb_white_level,
        )
        _refuse_files_with_tokens(staging, _tokens_in_use(token))
        files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
        message = commit_message or (
            f"CDCL ({training_args.get('method', 'cdcl')}) embedding model after {summary.get('global_step')} steps "
            f"({'stock Dinov2Model' if chosen == 'dinov2' else 'custom code'})"
        )
        commit = _upload(api, staging, files, repo_id, branch, private, create_pr, message, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    where = commit.pr_url or commit.commit_url
    logger.info(f"pushed to {repo_id}: {len(files)} files in one commit ({chosen} format), {where}")
    return commit


def _upload(api, staging: Path, files: list[str], repo_id: str, branch: str, private: bool, create_pr: bool,
            message: str, folder: Path):
    """Create the repo / branch if needed and commit `files` of `staging` in one commit; failures -> PublishError."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    stage, parent = "creating the repository", None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_id).private:
            raise PublishError(
                f"{repo_id} exists and is public; --private only applies to a new repository. Make it private on the "
                "Hub first, or push without --private"
            )
        if branch != "main":
            stage = f"creating the branch {branch}"
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        stage = f"reading the head of {branch}"
        parent = api.model_info(repo_id, revision=branch).sha
        existing = set(api.list_repo_files(repo_id, revision=branch))

        additions = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(staging / name)) for name in files]
        stale = sorted((existing & set(PACKAGE_FILES)) - set(files))
        operations = additions + [CommitOperationDelete(path_in_repo=name) for name in stale]
        # The large files first: a failure here leaves nothing half-committed, and a retry skips what arrived.
        stage = "uploading the large files (LFS)"
        api.preupload_lfs_files(repo_id, additions, revision=branch, create_pr=create_pr)
        stage = "creating the commit"
        return api.create_commit(
            repo_id, operations, commit_message=message, revision=branch, create_pr=create_pr, parent_commit=parent
        )
    except PublishError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the Hub calls is a failed push, reported as one
        raise PublishError(_failure_message(api, repo_id, branch, stage, parent, folder, error)) from error


def _failure_message(api, repo_id: str, branch: str, stage: str, parent: str | None, folder: Path,
                     error: BaseException) -> str:
    """What failed, and what the branch holds now (read back from the Hub)."""
    try:
        head = api.model_info(repo_id, revision=branch).sha
    except Exception:  # noqa: BLE001 - the Hub may be unreachable: say so instead of guessing
        head = None
    if parent is not None and head == parent:
        state = f"nothing was committed ({branch} is still at {parent[:12]})"
    elif parent is None:
        state = "nothing was committed"
    elif head is None:
        state = f"the state of {branch} could not be read back; check the repository"
    else:
        state = f"{branch} moved from {parent[:12]} to {head[:12]}; check that commit on the Hub"
    return (f"pushing {folder} to {repo_id} failed while {stage}: {one_line(error)}; {state}. "
            f"Retry with: cdcl-push {folder} {repo_id}" + (f" --revision {branch}" if branch != "main" else ""))

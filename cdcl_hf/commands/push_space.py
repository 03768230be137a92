"""Publish the demo Space (hub/space) for a published model, in one commit.

    cdcl-push-space my-org/cdcl-demo --model my-org/cdcl-bbbc021 \
        --profiles eval/bbbc021/profiles_well.parquet --example crops/taxol_crop.npy
    cdcl-push-space my-org/cdcl-demo --model my-org/cdcl-bbbc021 --local_dir space/   # write the folder, no upload
    python hub/push_space.py ...                                                       # the same

What the Space gets: the Gradio app (app.py), its requirements.txt, a README.md whose front matter says `sdk: gradio`,
`app_file: app.py` and lists `--model` under `models:` (the Hub then links the Space from the model page, and the app
loads that model), the microscopy pipeline the app runs (pipeline_cdcl.py, from this package), the reference profiles
(--profiles, a profile parquet that cdcl-evaluate wrote with this model: profiles_well.parquet or
profiles_image.parquet) as profiles.parquet, and the --example images under examples/. A re-publish replaces the
profiles and the examples (files of an earlier push that this one does not bring are deleted in the same commit).

The token is your `hf auth login` token or `HF_TOKEN`; `--token` overrides it and is never stored or printed. Errors
are one line on stderr (exit status 1); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

from ..cli import CommandParser, add_debug_argument, command_errors

PROG = "cdcl-push-space"
# The Space's source in a checkout of cdcl-hf (hub/space beside the package).
DEFAULT_SPACE_DIR = Path(__file__).resolve().parents[2] / "hub" / "space"
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
PIPELINE_SOURCE = Path(__file__).resolve().parents[1] / "pipeline_cdcl.py"
PROFILES_NAME = "profiles.parquet"
EXAMPLES_DIR = "examples"
EXAMPLE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")
# Examples are shown in the browser and downloaded by every visitor: keep them small.
MAX_EXAMPLE_BYTES = 20 * 1024 * 1024
# What a re-publish replaces: the files of an earlier push under these names go, this push's stay.
REPLACED_PATTERNS = [f"{EXAMPLES_DIR}/*", PROFILES_NAME]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the command.

    Returns:
        `argparse.ArgumentParser`: The parser.
    """
    parser = CommandParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("space_id", help="the Hub Space, org/name (created when missing)")
    parser.add_argument("--model", required=True,
                        help="the model the demo runs: a Hub model repo id (listed under models: in the Space card)")
    parser.add_argument("--profiles", type=Path, default=None,
                        help="reference profiles: a cdcl-evaluate profile parquet of this model "
                             "(profiles_well.parquet / profiles_image.parquet)")
    parser.add_argument("--example", type=Path, action="append", default=[], metavar="FILE",
                        help="an example image bundled with the Space (.npy / .tif / .tiff / .png; repeatable)")
    parser.add_argument("--space_dir", type=Path, default=DEFAULT_SPACE_DIR,
                        help="the Space's source folder (default: hub/space of this checkout)")
    parser.add_argument("--local_dir", type=Path, default=None,
                        help="write the Space folder here (new or empty) instead of uploading it")
    parser.add_argument("--private", action="store_true", help="create the Space private (a new Space only)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main)")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="default: your `hf auth login` token or HF_TOKEN; never saved")
    add_debug_argument(parser)
    return parser


def _check_profiles(path: Path) -> None:
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"--profiles {path} does not exist; pass a profile parquet written by cdcl-evaluate")
    try:
        columns = [str(c) for c in pd.read_parquet(path).columns]
    except Exception as error:  # noqa: BLE001 - whatever pyarrow says, the file is no parquet table
        raise ValueError(f"--profiles {path} is not a readable parquet file ({type(error).__name__}: {error})") from None
    if not any(c.startswith("emb_") for c in columns) or not any(c.startswith("Metadata_") for c in columns):
        raise ValueError(
            f"--profiles {path} has no emb_* features or no Metadata_* columns (it has {columns[:6]}...); pass "
            "profiles_well.parquet or profiles_image.parquet from cdcl-evaluate"
        )


def _check_example(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"--example {path} does not exist")
    if path.suffix.lower() not in EXAMPLE_SUFFIXES:
        raise ValueError(f"--example {path}: expected a {'/'.join(EXAMPLE_SUFFIXES)} image, got {path.suffix or 'no suffix'}")
    if path.stat().st_size > MAX_EXAMPLE_BYTES:
        raise ValueError(
            f"--example {path} is {path.stat().st_size / 2**20:.1f} MiB; examples must be at most "
            f"{MAX_EXAMPLE_BYTES // 2**20} MiB (crop it)"
        )


def stage_space(
    folder: Path,
    model: str,
    profiles: Path | None = None,
    examples: list[Path] | tuple[Path, ...] = (),
    space_dir: Path = DEFAULT_SPACE_DIR,
) -> list[str]:
    """Write the Space's files into `folder` (new or empty).

    Args:
        folder (`Path`): Where to write.
        model (`str`): The model's Hub repo id (listed under `models:` in the README front matter, loaded by the app).
        profiles (`Path`, *optional*): A cdcl-evaluate profile parquet, copied as profiles.parquet.
        examples (`list[Path]`, defaults to `()`): Example images, copied into examples/.
        space_dir (`Path`, defaults to hub/space): The Space's source folder.

    Returns:
        `list[str]`: The files written, relative to `folder`.

    Raises:
        FileNotFoundError, ValueError: A missing source, profiles or example file; a bad one; a non-empty `folder`.
    """
    from huggingface_hub import SpaceCard

    missing = [name for name in SPACE_FILES if not (space_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the Space source folder {space_dir} lacks {missing}; pass --space_dir (hub/space of a cdcl-hf checkout)"
        )
    if not model or model.count("/") != 1 or Path(model).exists():
        raise ValueError(f"--model must be a Hub model repo id (org/name), got {model!r}")
    if profiles is not None:
        _check_profiles(profiles)
    for example in examples:
        _check_example(example)
    names = [example.name for example in examples]
    if len(set(names)) != len(names):
        raise ValueError(f"two --example files share a name: {names}; rename one")
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"--local_dir {folder} is not empty; pass a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)

    written = []
    for name in ("app.py", "requirements.txt"):
        shutil.copyfile(space_dir / name, folder / name)
        written.append(name)
    card = SpaceCard.load(space_dir / "README.md")
    card.data.models = [model]  # the model page lists the Space; the app loads the first entry
    card.save(folder / "README.md")
    written.append("README.md")
    shutil.copyfile(PIPELINE_SOURCE, folder / PIPELINE_SOURCE.name)
    written.append(PIPELINE_SOURCE.name)
    if profiles is not None:
        shutil.copyfile(profiles, folder / PROFILES_NAME)
        written.append(PROFILES_NAME)
    if examples:
        (folder / EXAMPLES_DIR).mkdir()
        for example in examples:
            shutil.copyfile(example, folder / EXAMPLES_DIR / example.name)
            written.append(f"{EXAMPLES_DIR}/{example.name}")
    return written


def push_space(
    space_id: str,
    model: str,
    profiles: Path | None = None,
    examples: list[Path] | tuple[Path, ...] = (),
    space_dir: Path = DEFAULT_SPACE_DIR,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
):
    """Stage the Space and upload it in one commit (`HfApi.upload_folder(repo_type="space")`).

    Args:
        space_id (`str`): The Space, org/name; created (Gradio SDK) when missing.
        model, profiles, examples, space_dir: See `stage_space`.
        private (`bool`, defaults to `False`): Create the Space private.
        revision (`str`, *optional*): Branch to commit to.
        create_pr (`bool`, defaults to `False`): Open a pull request instead.
        commit_message (`str`, *optional*): Defaults to "Publish the CDCL demo for <model>".
        token (`str`, *optional*): Defaults to the logged-in token / `HF_TOKEN`.

    Returns:
        `huggingface_hub.CommitInfo`: The commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="cdcl-space-") as staging:
        stage_space(Path(staging), model, profiles, examples, space_dir)
        api.create_repo(space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        with warnings.catch_warnings():
            # huggingface_hub asks whether a .parquet in a Space is meant to be a dataset; the reference profiles are
            # the app's own data, read at start-up.
            warnings.filterwarnings("ignore", message=".*commit a data file.*", category=UserWarning)
            return api.upload_folder(
                folder_path=staging,
                repo_id=space_id,
                repo_type="space",
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or f"Publish the CDCL demo for {model}",
                delete_patterns=REPLACED_PATTERNS,
            )


def main(argv: list[str] | None = None) -> int:
    """Publish (or, with --local_dir, write) the demo Space and print where it went.

    Args:
        argv (`list[str]`, *optional*): The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success.

    Raises:
        SystemExit: ``"cdcl-push-space: error: <one line>"`` (exit status 1) for a missing or bad input file or a
            failed upload; status 2 for a bad option.
    """
    args = build_parser().parse_args(argv)
    with command_errors(PROG, args.debug):
        if args.local_dir is not None:
            written = stage_space(args.local_dir, args.model, args.profiles, args.example, args.space_dir)
            print(f"wrote the Space for {args.model} to {args.local_dir}: {', '.join(written)}")
            return 0
        commit = push_space(
            args.space_id, args.model, args.profiles, args.example, args.space_dir, private=args.private,
            revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
        )
    if commit.pr_url:
        print(f"opened pull request {commit.pr_url} (commit {commit.oid})")
    else:
        print(f"pushed commit {commit.oid} to the Space {args.space_id} ({args.revision or 'main'}): {commit.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

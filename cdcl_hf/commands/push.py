"""Publish a finished training run to the Hub in one commit: weights, config, image processor, custom code, model
card, evaluation results and serving files.

    cdcl-push outputs/cdcl-bbbc021 my-org/cdcl-bbbc021 --evaluation_dir eval/bbbc021
    cdcl-push outputs/cdcl-bbbc021 my-org/cdcl-bbbc021 --revision experiment-2 --create_pr --private
    python hub/push_model.py ...                       # the same

The weights are pushed as a stock `Dinov2Model` (loads with `AutoModel.from_pretrained(repo)`, no custom code) when
the model's configuration allows, else as the custom-code CDCL model (`--export_format`). The token is your
`hf auth login` token or `HF_TOKEN`; `--token` overrides it and is never stored or printed.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..cli import CommandParser, add_debug_argument, command_errors, positive_int
from ..publishing import publish_model
from ..stock_export import EXPORT_FORMATS

PROG = "cdcl-push"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=PROG,
        description="Publish a finished cdcl-train output folder to a Hub model repository, in one commit.",
    )
    parser.add_argument("training_output_dir", type=Path, help="a finished cdcl-train --output_dir")
    parser.add_argument("repo_id", help="the Hub model repository, org/name (created when missing)")
    parser.add_argument("--evaluation_dir", type=Path, default=None,
                        help="a cdcl-evaluate --output_dir of this model: results.json is pushed and fills the card")
    parser.add_argument("--private", action="store_true", help="create the repository private (a new repo only)")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main; created when missing)")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="default: your `hf auth login` token or HF_TOKEN; never saved")
    parser.add_argument("--export_format", default="auto", choices=EXPORT_FORMATS,
                        help="dinov2: a stock Dinov2Model (no trust_remote_code); cdcl: the custom-code model; "
                        "auto: dinov2 when the model's configuration allows (pooling cls)")
    parser.add_argument("--license", default=None, help="the card's license identifier (default apache-2.0)")
    parser.add_argument("--space_id", default=None, help="a Space hosting the demo, linked from the card")
    parser.add_argument("--rgb_white_level", type=positive_int, default=None,
                        help="3-channel models: the raw intensity that 255 stands for in RGB renderings given to the "
                        "stock pipeline (default: the 8/12/16-bit range that holds the statistics)")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Publish a training run and print where it went.

    Args:
        argv (`list[str]`, *optional*): The arguments without the program name; defaults to ``sys.argv[1:]``.

    Returns:
        `int`: 0 on success.

    Raises:
        SystemExit: ``"cdcl-push: error: <one line>"`` (exit status 1) for an unfinished run, missing files, a
            failed upload (naming the stage and what the branch holds); status 2 for a bad option.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    with command_errors(PROG, args.debug):
        commit = publish_model(
            args.training_output_dir, args.repo_id, evaluation_dir=args.evaluation_dir, private=args.private,
            revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message, token=args.token,
            export_format=args.export_format, license=args.license, space_id=args.space_id,
            rgb_white_level=args.rgb_white_level,
        )
    if commit.pr_url:
        print(f"opened pull request {commit.pr_url} (commit {commit.oid})")
    else:
        print(f"pushed commit {commit.oid} to {args.repo_id} ({args.revision or 'main'}): {commit.commit_url}")
    print(f'load this exact version with revision="{commit.oid}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

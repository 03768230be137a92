"""Writing outputs without ever losing a user's data: ownership markers, input / output overlap, atomic writes.

Every folder a cdcl-hf command creates carries a marker file, `.cdcl-hf-output.json`, saying what wrote it. A folder
is only ever replaced (`--overwrite`, `--overwrite_output_dir`) when it carries a marker of the same kind; a folder
the package did not write is refused, whatever `--overwrite` says. An output that is, contains or lies inside one
of the command's inputs (image root, metadata CSV, dataset, model) is refused before anything is written.

Outputs appear whole or not at all: files are written to a temporary sibling and renamed into place
(`atomic_write_text`, `atomic_write_bytes`), folders are assembled in a temporary sibling folder and swapped in
(`staged_directory`); a leftover temporary of an interrupted run is removed by the next run that writes there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "OUTPUT_MARKER",
    "OutputSafetyError",
    "check_output_not_an_input",
    "is_cdcl_output",
    "prepare_output_folder",
    "write_output_marker",
    "atomic_write_text",
    "atomic_write_bytes",
    "staged_directory",
    "remove_stale_temporaries",
    "temporary_prefix",
    "fault_point",
]

OUTPUT_MARKER = ".cdcl-hf-output.json"
TEMPORARY_PREFIX = ".cdcl-hf-tmp-"


class OutputSafetyError(ValueError):
    """An output would overwrite or mix with data the package did not write, or with one of its inputs."""


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output_not_an_input(output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an `output` that is, contains or lies inside one of `inputs` ({"--image_root": path, ...}).

    Inputs that are not local paths (Hub ids, `None`) are skipped.
    """
    target = _resolved(output)
    for flag, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        source = _resolved(value)
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            relation = "is" if target == source else "contains" if source.is_relative_to(target) else "lies inside"
            raise OutputSafetyError(
                f"output folder {output} {relation} the input {flag} {value}; writing there could destroy the input. "
                "Choose an output folder outside every input."
            )


def is_cdcl_output(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether `folder` carries a cdcl-hf output marker (of `kind`, when given)."""
    marker = Path(folder) / OUTPUT_MARKER
    if not marker.is_file():
        return False
    try:
        written = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return kind is None or written.get("kind") == kind


def write_output_marker(folder: str | os.PathLike, kind: str) -> None:
    from . import __version__

    atomic_write_text(Path(folder) / OUTPUT_MARKER, json.dumps({"kind": kind, "written_by": f"cdcl-hf {__version__}"}))


def prepare_output_folder(folder: str | os.PathLike, kind: str, overwrite: bool = False) -> Path:
    """Make `folder` ready to receive an output of `kind`, refusing anything that would lose data.

    - absent or empty: created and marked;
    - marked with `kind`: kept (resuming, re-running into it) unless `overwrite`, then removed and re-created;
    - anything else (a folder the package did not write, or an output of another kind): `OutputSafetyError`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputSafetyError(f"output {folder} is a file, not a folder; choose another output folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not is_cdcl_output(folder, kind):
            what = "another kind of cdcl-hf output" if is_cdcl_output(folder) else "files cdcl-hf did not write"
            raise OutputSafetyError(
                f"output folder {folder} holds {what}; it is never replaced or written into. "
                "Choose a new or empty output folder."
            )
        if not overwrite:
            return folder
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_output_marker(folder, kind)
    return folder


def temporary_prefix() -> str:
    """The name prefix of this process's temporaries, `.cdcl-hf-tmp-<pid>-`.

    The process id lets `remove_stale_temporaries` tell a leftover of a killed run from the staging folder of a run
    still in progress beside it (two evaluations writing `eval/a` and `eval/b` at once share the parent `eval/`).
    """
    return f"{TEMPORARY_PREFIX}{os.getpid()}-"


def _written_by_a_running_process(name: str) -> bool:
    """Whether the temporary `name` carries the id of a process that is still running (this one included)."""
    pid, separator, _ = name[len(TEMPORARY_PREFIX) :].partition("-")
    if not separator or not pid.isdigit():
        return False  # no process id in the name (older cdcl-hf): a leftover
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Remove what interrupted runs left in `folder` (temporary files / folders this module names).

    Temporaries of processes still running (see `temporary_prefix`) are left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in folder.glob(f"{TEMPORARY_PREFIX}*"):
        if _written_by_a_running_process(leftover.name):
            continue
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=temporary_prefix(), dir=path.parent)
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Assemble a folder in a temporary sibling and move it to `final` when the block succeeds.

    An existing `final` is swapped out only at the end (two renames) and then removed; on failure or interruption
    the temporary is removed (or, after SIGKILL, by the next `remove_stale_temporaries` of the parent) and `final`
    is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(), dir=final.parent))
    try:
        yield staging
        retired = None
        if final.exists():
            retired = Path(tempfile.mkdtemp(prefix=temporary_prefix(), dir=final.parent))
            os.replace(final, retired / final.name)
        os.replace(staging, final)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def fault_point(name: str) -> None:
    """Fault injection for the kill-safety tests: with `CDCL_HF_FAULT=<name>` the process kills itself here.

    `CDCL_HF_FAULT=<name>:TERM` sends SIGTERM (what schedulers send) instead of SIGKILL. Unset, this does nothing.
    """
    requested = os.environ.get("CDCL_HF_FAULT", "")
    if not requested or requested.split(":")[0] != name:
        return
    import signal

    os.kill(os.getpid(), signal.SIGTERM if requested.endswith(":TERM") else signal.SIGKILL)

"""The console entry points: installed by pip, and the same commands as the wrapper scripts."""

import contextlib
import importlib
import io
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "cdcl-train": ("cdcl_hf.commands.train", ROOT / "training" / "train.py"),
    "cdcl-evaluate": ("cdcl_hf.commands.evaluate", ROOT / "training" / "evaluate_embeddings.py"),
    "cdcl-build-dataset": ("cdcl_hf.commands.build_dataset", ROOT / "hub" / "build_dataset.py"),
    "cdcl-embed": ("cdcl_hf.commands.embed", ROOT / "hub" / "embed_images.py"),
    "cdcl-push": ("cdcl_hf.commands.push", ROOT / "hub" / "push_model.py"),
    "cdcl-push-space": ("cdcl_hf.commands.push_space", ROOT / "hub" / "push_space.py"),
}


def test_pyproject_declares_every_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, (module, _) in COMMANDS.items()}


def help_text(call) -> str:
    """What a command prints for --help (it exits 0)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 0
    return output.getvalue()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_entry_point_and_wrapper_show_the_same_help(name, monkeypatch):
    module_name, wrapper = COMMANDS[name]
    module = importlib.import_module(module_name)
    by_module = help_text(lambda: module.main(["--help"]))
    assert by_module.startswith(f"usage: {name} ")
    monkeypatch.setattr(sys, "argv", [str(wrapper), "--help"])
    assert help_text(lambda: runpy.run_path(str(wrapper), run_name="__main__")) == by_module
    installed = shutil.which(name, path=str(Path(sys.executable).parent))
    if installed is None:
        pytest.skip(f"{name} is not installed in this environment (pip install -e . installs it)")
    by_script = subprocess.run([installed, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert by_script.returncode == 0 and by_script.stdout == by_module

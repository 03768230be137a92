"""The console entry points: installed by pip, and the same commands as the wrapper scripts."""

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
}


def test_pyproject_declares_every_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, (module, _) in COMMANDS.items()}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_entry_point_and_wrapper_show_the_same_help(name):
    module, wrapper = COMMANDS[name]
    by_module = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    by_wrapper = subprocess.run([sys.executable, str(wrapper), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert by_module.returncode == 0 and by_wrapper.returncode == 0, by_module.stderr + by_wrapper.stderr
    assert by_module.stdout.startswith(f"usage: {name} ") and by_wrapper.stdout == by_module.stdout
    installed = shutil.which(name, path=str(Path(sys.executable).parent))
    if installed is None:
        pytest.skip(f"{name} is not installed in this environment (pip install -e . installs it)")
    by_script = subprocess.run([installed, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert by_script.returncode == 0 and by_script.stdout == by_module.stdout

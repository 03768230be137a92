"""Never lose a user's data, outside training: refused outputs, kill-safe evaluation folders, checked channel
orders, refused checkpoints, traceable and memory-flat embeddings, and one-line errors.

Every test works on real files in a temporary folder; the commands run in-process where that shows the same thing
(fast), and as real subprocesses where only a process shows it (signals, peak memory, what reaches stderr).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.commands import build_dataset, embed, evaluate
from cdcl_hf.normalization import PlateNormalization
from cdcl_hf.outputs import OUTPUT_MARKER, TEMPORARY_PREFIX, remove_stale_temporaries, temporary_prefix
from cdcl_hf.screen_data import dataset_from_arrays, load_screen

ROOT = Path(__file__).resolve().parents[1]
MODEL_ORDER = ["DAPI", "Tubulin", "Actin"]
REVERSED = MODEL_ORDER[::-1]

datasets.disable_progress_bars()


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with a digest of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"{TEMPORARY_PREFIX}*"))


def refused(main, argv: list[str], capsys, status: int = 1) -> str:
    """Run a command in-process, expecting a refusal: exactly one line (what Python prints for the SystemExit),
    nothing else on stderr, and the exit status; returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    captured = capsys.readouterr().err
    if status == 2:  # argparse: the parser printed the line itself
        assert code == 2, code
        line = captured
    else:
        assert isinstance(code, str), code  # Python prints it and exits with status 1
        assert captured == "", captured
        line = code + "\n"
    assert line.count("\n") == 1 and "Traceback" not in line, line
    return line.strip()


def python_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CDCL_HF_DEBUG": "", **extra}


# ---- a user's screen on disk -----------------------------------------------------------------------------------


@pytest.fixture
def user_screen(tmp_path) -> Path:
    """A user's raw data: ``crops/metadata.csv`` naming ``crops/images/f<i>.npy`` (16 x 16 x 3 uint16)."""
    crops = tmp_path / "crops"
    (crops / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        np.save(crops / "images" / f"f{i}.npy", rng.integers(0, 4000, (16, 16, 3), dtype=np.uint16))
        rows.append({"file": f"images/f{i}.npy", "plate": f"P{i % 2}", "well": f"A{i:02d}", "site": "1",
                     "batch": "W1", "compound": "DMSO" if i % 3 == 0 else "taxol",
                     "concentration": 0.0 if i % 3 == 0 else 1.0})
    pd.DataFrame(rows).to_csv(crops / "metadata.csv", index=False)
    return crops


def build_argv(crops: Path, output: str | Path, *extra: str) -> list[str]:
    return ["folder", "--metadata_csv", str(crops / "metadata.csv"), "--output_dir", str(output), *extra]


@pytest.mark.parametrize("where", ["the data folder", "dot inside it", "its parent", "the image folder",
                                   "inside the image root"])
def test_build_never_writes_over_or_into_its_inputs(user_screen, where, capsys, monkeypatch):
    crops = user_screen
    before = tree(crops.parent)
    extra = ["--overwrite"]
    if where == "the data folder":
        output = crops
    elif where == "dot inside it":
        monkeypatch.chdir(crops)
        output = "."
    elif where == "its parent":
        output = crops.parent
    elif where == "the image folder":
        output = crops / "images"
    else:
        output, extra = crops / "images" / "dataset", ["--image_root", str(crops), "--overwrite"]
    line = refused(build_dataset.main, build_argv(crops, output, *extra), capsys)
    assert line.startswith("cdcl-build-dataset: error: output folder ") and "input" in line
    assert tree(crops.parent) == before  # images, CSV and everything else byte for byte


def test_build_never_replaces_a_folder_it_did_not_write(user_screen, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's notes")
    for extra in ([], ["--overwrite"]):
        line = refused(build_dataset.main, build_argv(user_screen, mine, *extra), capsys)
        assert "holds files cdcl-build-dataset did not write" in line and "never replaced" in line
    assert tree(mine) == {"notes.txt": hashlib.sha256(b"a user's notes").hexdigest()}

    # A file is not a folder; a dataset this package wrote, with a user's file added since, is not replaced either.
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(build_dataset.main, build_argv(user_screen, tmp_path / "file", "--overwrite"), capsys)
    assert build_dataset.main(build_argv(user_screen, tmp_path / "ds")) == 0
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    line = refused(build_dataset.main, build_argv(user_screen, tmp_path / "ds", "--overwrite"), capsys)
    assert "a screen dataset plus files cdcl-build-dataset did not write" in line
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_rebuild_replaces_a_dataset_it_wrote_only_with_overwrite(user_screen, tmp_path, capsys):
    output = tmp_path / "ds"
    assert build_dataset.main(build_argv(user_screen, output)) == 0
    assert json.loads((output / OUTPUT_MARKER).read_text())["kind"] == "screen_dataset"
    assert load_screen(output).num_rows == 6
    line = refused(build_dataset.main, build_argv(user_screen, output, "--select", "plate=P0"), capsys)
    assert "already exists" in line and "--overwrite" in line
    assert build_dataset.main(build_argv(user_screen, output, "--select", "plate=P0", "--overwrite")) == 0
    assert load_screen(output).num_rows == 3 and (output / OUTPUT_MARKER).is_file()

    # A dataset written before the marker existed is recognised by its layout and schema, and replaced.
    (output / OUTPUT_MARKER).unlink()
    assert build_dataset.main(build_argv(user_screen, output, "--overwrite")) == 0
    assert load_screen(output).num_rows == 6
    # ... but a save_to_disk folder of some other dataset is not.
    other = tmp_path / "other"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": [1, 2]})}).save_to_disk(str(other))
    assert "did not write" in refused(build_dataset.main, build_argv(user_screen, other, "--overwrite"), capsys)
    assert leftovers(tmp_path) == []


def test_stale_temporaries_of_running_processes_are_kept(tmp_path):
    """Two runs writing beside each other: one's cleanup must not remove the other's staging folder."""
    mine = tmp_path / f"{temporary_prefix()}abc"
    mine.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        running = tmp_path / f"{TEMPORARY_PREFIX}{sleeper.pid}-abc"
        running.mkdir()
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        killed = tmp_path / f"{TEMPORARY_PREFIX}{dead.stdout.strip()}-abc"
        killed.mkdir()
        old_style = tmp_path / f"{TEMPORARY_PREFIX}x1y2z3"
        old_style.write_text("")
        remove_stale_temporaries(tmp_path)
        assert sorted(leftovers(tmp_path)) == sorted([mine.name, running.name])
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- a checkpoint and a screen with named channels --------------------------------------------------------------


def screen_images(count: int = 12, size: int = 24) -> tuple[np.ndarray, pd.DataFrame]:
    """(count, 3, size, size) uint16 images in the model's channel order (channels at distinct intensity levels)
    and their metadata: two plates, two wells per treatment, controls on both plates."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 3000, (count, 3, size, size), dtype=np.uint16)
    images += np.array([0, 10000, 20000], dtype=np.uint16)[None, :, None, None]
    metadata = pd.DataFrame({
        "plate": [f"P{i % 2}" for i in range(count)],
        "well": [f"A{i // 2:02d}" for i in range(count)],
        "site": ["1"] * count,
        "batch": [f"W{i % 2}" for i in range(count)],
        "compound": ["DMSO" if i % 4 < 2 else ("taxol" if i % 8 < 4 else "nocodazole") for i in range(count)],
        "concentration": [0.0 if i % 4 < 2 else 1.0 for i in range(count)],
        "moa": [None if i % 4 < 2 else ("stabiliser" if i % 8 < 4 else "destabiliser") for i in range(count)],
        "is_control": [i % 4 < 2 for i in range(count)],
    })
    return images, metadata


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> dict[str, Path]:
    """The same screen saved in the model's channel order and reversed (Actin/Tubulin/DAPI), and under other
    names (DNA instead of DAPI)."""
    folder = tmp_path_factory.mktemp("screens")
    images, metadata = screen_images()
    paths = {}
    for name, pixels, names in (("model_order", images, MODEL_ORDER), ("reversed", images[:, ::-1], REVERSED),
                                ("renamed", images, ["DNA", "Tubulin", "Actin"])):
        dataset_from_arrays(np.ascontiguousarray(pixels), metadata, channel_names=names).save_to_disk(
            str(folder / name))
        paths[name] = folder / name
    return paths


def save_checkpoint(path: Path, processor: bool = True, screen: Path | None = None) -> Path:
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3, channel_names=MODEL_ORDER)).save_pretrained(path)
    if processor:
        # The processor training exports after per-plate normalisation: evaluation then re-computes each plate's
        # statistics, which must follow the channels when they are reordered.
        kwargs = PlateNormalization.from_screen(load_screen(screen), "plate_controls").processor_kwargs() if screen \
            else {}
        CDCLImageProcessor(num_channels=3, size=16, channel_names=MODEL_ORDER, **kwargs).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, screens) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "checkpoint", screen=screens["model_order"])


def evaluate_argv(model: Path | str, dataset: Path | str, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset_name", str(dataset), "--output_dir", str(output), "--no_progress",
            "--profile_level", "image", "--null_size", "20", "--batch_size", "5", *extra]


# ---- evaluation: the output folder -----------------------------------------------------------------------------


def test_evaluation_refuses_folders_it_did_not_write_and_its_inputs(checkpoint, screens, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    snapshot = {folder: tree(folder) for folder in (mine, checkpoint, screens["model_order"])}
    cases = [
        (mine, "holds files cdcl-evaluate did not write"),
        (checkpoint, "is the input --model"),
        (checkpoint / "eval", "lies inside the input --model"),
        (checkpoint.parent, "contains the input --model"),
        (screens["model_order"] / "eval", "lies inside the input --dataset_name"),
    ]
    for output, message in cases:
        line = refused(evaluate.main, evaluate_argv(checkpoint, screens["model_order"], output), capsys)
        assert line.startswith("cdcl-evaluate: error: ") and message in line, line
    assert {folder: tree(folder) for folder in snapshot} == snapshot


def test_a_failed_rerun_keeps_the_previous_evaluation(checkpoint, screens, tmp_path, monkeypatch):
    output = tmp_path / "eval"
    evaluate.run(evaluate.parse_args(evaluate_argv(checkpoint, screens["model_order"], output)))
    assert json.loads((output / OUTPUT_MARKER).read_text())["kind"] == "evaluation"
    before = tree(output)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("the disk filled up while plotting")

    monkeypatch.setattr(evaluate, "projection_plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk filled up"):
        evaluate.run(evaluate.parse_args(evaluate_argv(checkpoint, screens["model_order"], output, "--seed", "3")))
    assert tree(output) == before  # no new parquet beside the old results.json
    assert leftovers(tmp_path) == []


def test_a_killed_evaluation_leaves_a_whole_folder_and_the_next_run_cleans_up(checkpoint, screens, tmp_path):
    """SIGKILL / SIGTERM at three points: after the parquets, just before the swap, just after it."""
    first = tmp_path / "first" / "eval"
    evaluate.run(evaluate.parse_args(evaluate_argv(checkpoint, screens["model_order"], first)))
    previous = tree(first)
    faults = {"evaluation-parquets": "old", "evaluation-swap:TERM": "old", "evaluation-written": "new"}
    runs = {}
    for fault in faults:
        output = tmp_path / fault.replace(":", "-") / "eval"
        output.parent.mkdir()
        shutil.copytree(first, output)  # the previous evaluation, byte for byte
        command = [sys.executable, "-m", "cdcl_hf.commands.evaluate",
                   *evaluate_argv(checkpoint, screens["model_order"], output, "--seed", "7")]
        runs[fault] = (output, subprocess.Popen(command, env=python_env(CDCL_HF_FAULT=fault), cwd=ROOT,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for fault, (output, process) in runs.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode < 0, (fault, stderr[-2000:])  # died by the signal
        report = json.loads((output / "results.json").read_text())
        if faults[fault] == "old":
            assert tree(output) == previous, fault
            assert leftovers(output.parent), fault  # the staging folder the next run removes
        else:
            assert report["settings"]["seed"] == 7 and (output / OUTPUT_MARKER).is_file()
            assert {*tree(output)} == {*previous}  # a complete new folder
    # The next run into the same place completes and removes what the killed one left.
    output = runs["evaluation-parquets"][0]
    evaluate.run(evaluate.parse_args(evaluate_argv(checkpoint, screens["model_order"], output, "--seed", "8")))
    assert json.loads((output / "results.json").read_text())["settings"]["seed"] == 8
    assert leftovers(output.parent) == []


# ---- channel names and order -----------------------------------------------------------------------------------


def test_evaluation_refuses_another_channel_order_and_the_options_reorder(checkpoint, screens, tmp_path, capsys):
    line = refused(evaluate.main, evaluate_argv(checkpoint, screens["reversed"], tmp_path / "refused"), capsys)
    assert f"the channels of the dataset are {REVERSED} but the model was trained on {MODEL_ORDER}" in line
    assert "--channel_order DAPI Tubulin Actin" in line
    assert not (tmp_path / "refused").exists()
    line = refused(evaluate.main, evaluate_argv(checkpoint, screens["renamed"], tmp_path / "refused"), capsys)
    assert "['DNA', 'Tubulin', 'Actin']" in line and "--channel_map" in line

    def profiles(dataset: Path, *options: str) -> pd.DataFrame:
        output = tmp_path / f"{dataset.name}{len(options)}"
        report = evaluate.run(evaluate.parse_args(evaluate_argv(checkpoint, dataset, output, *options)))
        assert report["input_normalization"] == "per_plate:controls"
        return pd.read_parquet(output / "profiles_image.parquet")

    expected = profiles(screens["model_order"])
    reordered = profiles(screens["reversed"], "--channel_order", *MODEL_ORDER)
    pd.testing.assert_frame_equal(reordered, expected, atol=1e-5)
    by_index = profiles(screens["reversed"], "--channel_order", "2", "1", "0", "--seed", "0")
    pd.testing.assert_frame_equal(by_index, expected, atol=1e-5)
    mapped = profiles(screens["renamed"], "--channel_map", "DNA=DAPI")
    pd.testing.assert_frame_equal(mapped, expected, atol=1e-5)


@pytest.fixture
def image_files(tmp_path) -> tuple[list[Path], list[Path]]:
    """Three 3-channel .npy images saved in the model's order and the same images reversed (Actin first)."""
    images, _ = screen_images(count=3, size=20)
    ordered, reversed_ = [], []
    for index, image in enumerate(images):
        ordered.append(tmp_path / f"ordered_{index}.npy")
        np.save(ordered[-1], image)
        reversed_.append(tmp_path / f"reversed_{index}.npy")
        np.save(reversed_[-1], np.ascontiguousarray(image[::-1]))
    return ordered, reversed_


def test_embed_checks_named_channels_and_reorders_them(checkpoint, image_files, tmp_path, capsys):
    ordered, reversed_ = image_files
    common = ["--model", str(checkpoint), "--channel_axis", "first"]
    line = refused(embed.main, [*common, "--images", *map(str, reversed_), "--channel_names", *REVERSED,
                                "--output", str(tmp_path / "refused.npy")], capsys)
    assert f"the channels of the input files are {REVERSED} but the model was trained on {MODEL_ORDER}" in line
    assert not (tmp_path / "refused.npy").exists()

    assert embed.main([*common, "--images", *map(str, ordered), "--channel_names", *MODEL_ORDER,
                       "--output", str(tmp_path / "expected.npy")]) == 0
    assert embed.main([*common, "--images", *map(str, reversed_), "--channel_names", *REVERSED,
                       "--channel_order", *MODEL_ORDER, "--output", str(tmp_path / "by_order.npy")]) == 0
    assert embed.main([*common, "--images", *map(str, reversed_), "--channel_names", "Actin", "Tubulin", "DNA",
                       "--channel_map", "DNA=DAPI", "--output", str(tmp_path / "by_map.npy")]) == 0
    expected = np.load(tmp_path / "expected.npy")
    np.testing.assert_allclose(np.load(tmp_path / "by_order.npy"), expected, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "by_map.npy"), expected, atol=1e-5)
    assert not np.allclose(expected[0], expected[1])  # the images differ, so the comparison means something


# ---- refused checkpoints ---------------------------------------------------------------------------------------


def test_a_checkpoint_without_its_processor_is_refused_unless_allowed(screens, image_files, tmp_path, capsys):
    bare = save_checkpoint(tmp_path / "bare", processor=False)
    line = refused(evaluate.main, evaluate_argv(bare, screens["model_order"], tmp_path / "eval"), capsys)
    assert "has no preprocessor_config.json" in line and "--allow_default_processor" in line
    line = refused(embed.main, ["--model", str(bare), "--images", str(image_files[0][0])], capsys)
    assert "has no preprocessor_config.json" in line
    assert embed.main(["--model", str(bare), "--images", *map(str, image_files[0]), "--channel_axis", "first",
                       "--allow_default_processor", "--output", str(tmp_path / "emb.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "emb.parquet")) == 3


@pytest.mark.parametrize("summary", [None, {"global_step": 3, "finished": False}])
def test_an_unfinished_training_run_is_refused_as_a_model(checkpoint, screens, image_files, tmp_path, capsys,
                                                          summary):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    (run / "training_args.json").write_text("{}")
    if summary is not None:
        (run / "training_summary.json").write_text(json.dumps(summary))
    for main, argv in ((evaluate.main, evaluate_argv(run, screens["model_order"], tmp_path / "eval")),
                       (embed.main, ["--model", str(run), "--images", str(image_files[0][0])])):
        line = refused(main, argv, capsys)
        assert "training run that has not finished" in line and "--resume_from_checkpoint latest" in line
    (run / "training_summary.json").write_text(json.dumps({"global_step": 9, "finished": True}))
    assert embed.main(["--model", str(run), "--images", str(image_files[0][0]), "--channel_axis", "first"]) == 0


# ---- embedding outputs -----------------------------------------------------------------------------------------


def test_embed_outputs_name_their_files_and_replace_only_their_own(checkpoint, image_files, tmp_path, capsys):
    ordered, _ = image_files
    common = ["--model", str(checkpoint), "--channel_axis", "first", "--images", *map(str, ordered)]
    output = tmp_path / "emb.parquet"
    assert embed.main([*common, "--output", str(output)]) == 0
    table = pd.read_parquet(output)
    assert table["file"].tolist() == list(map(str, ordered))
    assert [c for c in table.columns if c != "file"] == [f"emb_{i:04d}" for i in range(64)]
    assert embed.main([*common, "--output", str(tmp_path / "emb.npy")]) == 0
    np.testing.assert_allclose(table.drop(columns="file").to_numpy(), np.load(tmp_path / "emb.npy"), atol=1e-6)
    assert pd.read_csv(tmp_path / "emb.files.csv")["file"].tolist() == list(map(str, ordered))

    for existing in (output, tmp_path / "emb.npy"):
        line = refused(embed.main, [*common, "--output", str(existing)], capsys)
        assert "an earlier cdcl-embed output" in line and "--overwrite" in line
        assert embed.main([*common[:-1], "--output", str(existing), "--overwrite"]) == 0  # one image fewer
    assert len(pd.read_parquet(output)) == 2 and np.load(tmp_path / "emb.npy").shape == (2, 64)
    assert len(pd.read_csv(tmp_path / "emb.files.csv")) == 2

    # Files cdcl-embed did not write are never replaced, with or without --overwrite.
    (tmp_path / "theirs.npy").write_bytes(b"not ours")
    np.save(tmp_path / "matrix.npy", np.zeros((3, 64), dtype=np.float32))  # no sidecar naming its rows
    (tmp_path / "lonely.files.csv").write_text("a user's table\n")  # the sidecar name of lonely.npy
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "table.parquet")
    for name in ("theirs.npy", "matrix.npy", "lonely.npy", "table.parquet", ordered[0].name):
        before = tree(tmp_path)
        line = refused(embed.main, [*common, "--output", str(tmp_path / name), "--overwrite"], capsys)
        assert "not written by cdcl-embed" in line or "would replace the input image" in line, line
        assert tree(tmp_path) == before
    assert leftovers(tmp_path) == []


MEASURE = textwrap.dedent("""
    import resource, subprocess, sys
    result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def test_embed_memory_does_not_grow_with_the_number_of_files(checkpoint, tmp_path):
    """Peak RSS of the command on 10 and on 100 files of 512 x 512 x 3 uint16 (1.5 MB each): the 90 more files
    (135 MB of pixels) must not show up in the peak."""
    rng = np.random.default_rng(0)
    files = []
    for index in range(100):
        files.append(tmp_path / f"field_{index:03d}.npy")
        np.save(files[-1], rng.integers(0, 65536, (512, 512, 3), dtype=np.uint16))
    runs = {}
    for count in (10, 100):
        command = [sys.executable, "-m", "cdcl_hf.commands.embed", "--model", str(checkpoint), "--batch_size", "8",
                   "--images", *map(str, files[:count]), "--output", str(tmp_path / f"emb_{count}.parquet")]
        # Each measured in its own wrapper process: RUSAGE_CHILDREN is the peak of that wrapper's children only.
        runs[count] = subprocess.Popen([sys.executable, "-c", MEASURE, *command], env=python_env(), cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_kib = {}
    for count, process in runs.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        peak_kib[count] = int(stdout.strip().splitlines()[-1])
    assert len(pd.read_parquet(tmp_path / "emb_100.parquet")) == 100
    print(f"peak RSS: 10 files {peak_kib[10] / 1024:.0f} MiB, 100 files {peak_kib[100] / 1024:.0f} MiB")
    assert peak_kib[100] - peak_kib[10] < 30 * 1024, peak_kib


# ---- one-line errors -------------------------------------------------------------------------------------------


def test_debug_raises_the_error_itself(tmp_path, checkpoint, screens, monkeypatch):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    from cdcl_hf.outputs import OutputSafetyError

    with pytest.raises(FileNotFoundError, match="does not exist"):
        embed.main(["--model", str(tmp_path / "missing"), "--images", "a.npy", "--debug"])
    with pytest.raises(OutputSafetyError, match="did not write"):
        evaluate.main([*evaluate_argv(checkpoint, screens["model_order"], mine), "--debug"])
    monkeypatch.setenv("CDCL_HF_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="m.csv does not exist"):
        build_dataset.main(["folder", "--metadata_csv", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "o")])


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (embed.main, ["--demo", "--batch_size", "0"], "argument --batch_size: expected a positive integer, got 0"),
        (evaluate.main, ["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--knn_k", "-1"],
         "argument --knn_k: expected a positive integer, got -1"),
        (evaluate.main, ["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--tile_size", "0"],
         "argument --tile_size: expected a positive integer"),
        (evaluate.main, ["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--knn_temperature", "nan"],
         "argument --knn_temperature: expected a positive number"),
        (build_dataset.main, ["folder", "--metadata_csv", "m.csv", "--output_dir", "o", "--holdout_fraction", "1"],
         "argument --holdout_fraction: expected a number between 0 and 1 (exclusive), got 1"),
        (build_dataset.main, ["folder", "--metadata_csv", "m.csv", "--output_dir", "o", "--num_shards", "0"],
         "argument --num_shards: expected a positive integer, got 0"),
        (build_dataset.main, ["folder", "--metadata_csv", "m.csv", "--output_dir", "o", "--num_proc", "two"],
         "argument --num_proc: expected a positive integer, got 'two'"),
        (build_dataset.main, ["folder", "--metadata_csv", "m.csv", "--output_dir", "o", "--max_shard_size", "0MB"],
         "argument --max_shard_size: expected a positive size"),
    ],
)
def test_numeric_options_are_checked_when_parsing(main, argv, message, capsys):
    line = refused(main, argv, capsys, status=2)
    assert message in line and line.endswith("--help)"), line


def test_missing_local_paths_are_never_looked_up_on_the_hub(tmp_path, capsys, checkpoint, screens):
    for model in ("./no/such/model", str(tmp_path / "no_model"), "runs/cdcl/checkpoint", "model.safetensors"):
        line = refused(embed.main, ["--model", model, "--images", "a.npy"], capsys)
        assert f"model {model} does not exist (a local path, so it is not looked up on the Hub)" in line
    for dataset in ("./data/bbbc021", str(tmp_path / "no_data"), "~/screens/a/b", "screen.parquet"):
        line = refused(evaluate.main, evaluate_argv(checkpoint, dataset, tmp_path / "eval"), capsys)
        assert f"dataset {dataset} does not exist (a local path, so it is not looked up on the Hub)" in line
    line = refused(build_dataset.main, build_argv(tmp_path, tmp_path / "out"), capsys)
    assert "metadata.csv does not exist" in line


def test_real_processes_print_one_line_and_a_traceback_only_with_debug(tmp_path):
    """What reaches stderr from a real process: one line, or with --debug the traceback (shown for one command; the
    in-process test below shows --debug re-raising in each)."""
    cases = {
        "cdcl_hf.commands.embed": ["--model", str(tmp_path / "missing"), "--images", "a.npy"],
        "cdcl_hf.commands.evaluate": ["--model", str(tmp_path / "missing"), "--dataset_name", "d", "--output_dir",
                                      str(tmp_path / "eval")],
        "cdcl_hf.commands.build_dataset": ["folder", "--metadata_csv", str(tmp_path / "m.csv"), "--output_dir",
                                           str(tmp_path)],
    }
    processes = {
        (module, debug): subprocess.Popen([sys.executable, "-m", module, *argv, *(["--debug"] if debug else [])],
                                          env=python_env(), cwd=tmp_path, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
        for module, argv in cases.items() for debug in (False, True) if module.endswith("embed") or not debug
    }
    for (module, debug), process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, (module, debug, stderr[-2000:])
        if debug:
            assert "Traceback (most recent call last)" in stderr, (module, stderr[-2000:])
        else:
            assert stderr.count("\n") == 1 and ": error: " in stderr and "Traceback" not in stderr, (module, stderr)

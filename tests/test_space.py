"""The demo Space (hub/space): published with cdcl-push-space to the in-test Hub next to its model, then run as a Space
runs it -- `python app.py` in the downloaded Space folder, where cdcl_hf cannot be imported -- on 127.0.0.1, and driven
through gradio_client: uploads give the model's embedding, the nearest reference treatments of a profile table that
cdcl-evaluate wrote, a PCA map and downloads; bad uploads give a readable message. A slow test drives the page in a real
headless Chromium and saves a screenshot."""

import importlib.util
import io
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from fresh_process import WITHOUT_CDCL_HF
from hub_server import USER_NAME
from PIL import Image

from cdcl_hf import CDCLConfig, CDCLImageProcessor, CDCLModel
from cdcl_hf.commands import push_space
from cdcl_hf.serving import write_serving_files

gradio_client = pytest.importorskip("gradio_client", reason="the Space tests need gradio_client (pip install -e .[dev])")
pytest.importorskip("gradio", reason="the Space tests need gradio (pip install -e .[dev])")

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "hub" / "space"
CHANNELS = ["DNA", "Tubulin", "Actin"]
MEAN, STD = [3000.0, 2500.0, 4000.0], [900.0, 700.0, 1500.0]
INPUT_SIZE = 32


def load_app_module():
    """hub/space/app.py imported in this process (its pipeline comes from cdcl_hf here)."""
    spec = importlib.util.spec_from_file_location("cdcl_space_app", SPACE_DIR / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def space_model(tmp_path_factory):
    """A tiny 3-channel model as the publisher exports it (processor with raw-intensity statistics, serving files)."""
    folder = tmp_path_factory.mktemp("space_model")
    torch.manual_seed(0)
    CDCLModel(CDCLConfig.from_preset("tiny", num_channels=3, channel_names=CHANNELS)).save_pretrained(folder)
    CDCLImageProcessor(num_channels=3, size=INPUT_SIZE, normalization="per_channel", image_mean=MEAN, image_std=STD,
                       channel_names=CHANNELS).save_pretrained(folder)
    write_serving_files(folder)
    return folder


def evaluate_profiles(model: Path, output_dir: Path, dataset_arguments: list[str]) -> Path:
    """Run cdcl-evaluate (in this process) and return its per-well profile table."""
    from cdcl_hf.commands import evaluate

    assert evaluate.main(["--model", str(model), *dataset_arguments, "--output_dir", str(output_dir),
                          "--no_progress", "--null_size", "50"]) == 0
    return output_dir / "profiles_well.parquet"


@pytest.fixture(scope="module")
def reference_profiles(space_model, tmp_path_factory):
    """profiles_well.parquet of the model on the built-in synthetic screen (3 channels: DNA, Tubulin, Actin)."""
    return evaluate_profiles(space_model, tmp_path_factory.mktemp("evaluation") / "out", [
        "--dataset_name", "synthetic", "--synthetic_num_images", "120", "--synthetic_image_size", "32",
    ])


def random_image(seed: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    """(H, W, C) uint16 around the processor's statistics."""
    rng = np.random.default_rng(seed)
    mean, std = np.resize(MEAN, channels), np.resize(STD, channels)
    return np.clip(rng.normal(mean, std, size=(height, width, channels)), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def published(hub_server, space_model, reference_profiles, tmp_path_factory):
    """The model and its Space pushed to the in-test Hub; returns (model id, space id, example file)."""
    from huggingface_hub import HfApi

    suffix = uuid.uuid4().hex[:8]
    model_id, space_id = f"{USER_NAME}/cdcl-model-{suffix}", f"{USER_NAME}/cdcl-demo-{suffix}"
    api = HfApi()
    api.create_repo(model_id)
    api.upload_folder(folder_path=space_model, repo_id=model_id)
    example = tmp_path_factory.mktemp("examples") / "field_example.npy"
    np.save(example, random_image(11, 64, 64))
    assert push_space.main([space_id, "--model", model_id, "--profiles", str(reference_profiles),
                            "--example", str(example)]) == 0
    return model_id, space_id, example


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Runs the downloaded Space as the Space runtime does (`python app.py`), where cdcl_hf cannot be imported.
SPACE_RUNNER = WITHOUT_CDCL_HF + textwrap.dedent(
    """
    import runpy, sys

    runpy.run_path("app.py", run_name="__main__")
    """
)


@pytest.fixture(scope="module")
def space_url(published, hub_server, tmp_path_factory):
    """The published Space downloaded from the Hub and launched on 127.0.0.1 (one launch for the module)."""
    from huggingface_hub import snapshot_download

    _, space_id, _ = published
    root = tmp_path_factory.mktemp("space_run")
    folder = Path(snapshot_download(space_id, repo_type="space", local_dir=root / "space"))
    port = free_port()
    environment = {
        **os.environ, "PYTHONPATH": "", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(root / "gradio"), "HF_HOME": str(root / "hf"),
        "HF_MODULES_CACHE": str(root / "modules"), "MPLCONFIGDIR": str(root / "mpl"),
    }
    environment.pop("CDCL_MODEL", None)  # the app must find its model in the README's front matter
    environment.pop("CDCL_PROFILES", None)
    log = (root / "app.log").open("w")
    process = subprocess.Popen([sys.executable, "-c", SPACE_RUNNER], cwd=folder, env=environment, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"the Space exited with {process.returncode}:\n{(root / 'app.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Space did not answer within 180 s:\n{(root / 'app.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="module")
def client(space_url):
    return gradio_client.Client(space_url, verbose=False)


@pytest.fixture(scope="module")
def local_pipeline(space_model):
    """The same model's microscopy pipeline in this process: what the Space's answers are checked against."""
    from transformers import pipeline

    return pipeline(model=str(space_model), trust_remote_code=True, device="cpu")


def expected_neighbours(profiles: Path, embedding: np.ndarray, k: int = 5) -> list[str]:
    """Treatments ranked by cosine similarity of their median well profile, computed here independently."""
    table = pd.read_parquet(profiles)
    features = [c for c in table.columns if c.startswith("emb_")]
    medians = table.groupby("Metadata_Treatment")[features].median()
    unit = medians.to_numpy() / np.linalg.norm(medians.to_numpy(), axis=1, keepdims=True)
    order = np.argsort(-(unit @ (embedding / np.linalg.norm(embedding))))[:k]
    return list(medians.index[order])


def embed(client, files, tile=True, tile_size=0, tile_stride=0, image_mean="", image_std=""):
    handles = [gradio_client.handle_file(str(f)) for f in files] if files else None
    return client.predict(handles, tile, tile_size, tile_stride, image_mean, image_std, api_name="/embed")


# ---- publishing ------------------------------------------------------------------------------------------------


def test_push_space_publishes_the_app_for_the_model(published, hub_server, reference_profiles):
    from huggingface_hub import SpaceCard
    from packaging.specifiers import SpecifierSet

    model_id, space_id, example = published
    files = hub_server.repo_files(space_id, repo_type="space")
    assert set(files) >= {"app.py", "requirements.txt", "README.md", "pipeline_cdcl.py", "profiles.parquet",
                          f"examples/{example.name}"}
    assert files["app.py"] == (SPACE_DIR / "app.py").read_bytes()
    assert files["pipeline_cdcl.py"] == (REPO_ROOT / "cdcl_hf" / "pipeline_cdcl.py").read_bytes()
    assert files["profiles.parquet"] == reference_profiles.read_bytes()
    card = SpaceCard(files["README.md"].decode())
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == [model_id]
    # The gradio the Space runs (sdk_version) satisfies the requirements the app is tested with.
    gradio_pin = next(line for line in files["requirements.txt"].decode().splitlines() if line.startswith("gradio"))
    assert card.data.sdk_version in SpecifierSet(gradio_pin.removeprefix("gradio"))
    repo = hub_server.state.repo("space", space_id)
    # One commit (after the one the Hub makes when it creates a repo).
    assert [commit.title for commit in repo.commits.values()] == ["initial commit", f"Publish the CDCL demo for {model_id}"]


def test_republishing_replaces_profiles_and_examples(hub_server, published, tmp_path, capsys):
    model_id, _, example = published
    space_id = f"{USER_NAME}/cdcl-demo-{uuid.uuid4().hex[:8]}"
    assert push_space.main([space_id, "--model", model_id, "--example", str(example)]) == 0
    other = tmp_path / "other.npy"
    np.save(other, random_image(3, 40, 40))
    assert push_space.main([space_id, "--model", model_id, "--example", str(other), "--commit_message", "v2"]) == 0
    assert "pushed commit" in capsys.readouterr().out
    files = hub_server.repo_files(space_id, repo_type="space")
    assert "examples/other.npy" in files and f"examples/{example.name}" not in files and "profiles.parquet" not in files
    titles = [commit.title for commit in hub_server.state.repo("space", space_id).commits.values()]
    assert titles == ["initial commit", f"Publish the CDCL demo for {model_id}", "v2"]


def test_push_space_refusals_are_one_line(tmp_path, capsys, reference_profiles):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        (["org/space", "--model", "org/model", "--profiles", str(tmp_path / "missing.parquet"), "--local_dir",
          str(tmp_path / "a")], "--profiles .*missing.parquet does not exist"),
        (["org/space", "--model", "org/model", "--profiles", str(text_file), "--local_dir", str(tmp_path / "b")],
         "is not a readable parquet file"),
        (["org/space", "--model", "org/model", "--example", str(text_file), "--local_dir", str(tmp_path / "c")],
         r"expected a .npy/.tif/.tiff/.png image, got .txt"),
        (["org/space", "--model", str(tmp_path), "--local_dir", str(tmp_path / "d")], "must be a Hub model repo id"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            push_space.main(argv)
        assert str(exit_info.value.code).startswith("cdcl-push-space: error: "), exit_info.value.code
        assert "\n" not in str(exit_info.value.code)
        assert __import__("re").search(message, str(exit_info.value.code)), exit_info.value.code

    staged = tmp_path / "staged"
    assert push_space.main(["org/space", "--model", "org/model", "--profiles", str(reference_profiles),
                            "--local_dir", str(staged)]) == 0
    assert sorted(p.name for p in staged.iterdir()) == [
        "README.md", "app.py", "pipeline_cdcl.py", "profiles.parquet", "requirements.txt"]
    with pytest.raises(SystemExit, match="is not empty"):
        push_space.main(["org/space", "--model", "org/model", "--local_dir", str(staged)])


# ---- the running Space ------------------------------------------------------------------------------------------


def test_space_embeds_an_upload_and_finds_neighbours(client, local_pipeline, reference_profiles, tmp_path):
    image = random_image(1, 48, 40)  # larger than the 32-px input: 2 x 2 tiles, the last ones flush
    path = tmp_path / "my_field.npy"
    np.save(path, image)
    picture, summary, neighbours, projection, downloads = embed(client, [path])

    expected = local_pipeline(image)
    npy, csv = sorted(downloads, key=lambda f: Path(f).suffix != ".npy")
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-5, atol=1e-6)
    row = pd.read_csv(csv)
    assert row["image"].tolist() == ["my_field.npy"]
    np.testing.assert_allclose(row[[f"emb_{i:04d}" for i in range(64)]].to_numpy()[0], expected, rtol=1e-5, atol=1e-6)

    assert "my_field.npy" in summary and "4 tiles of 32 x 32 px" in summary and "64-dimensional" in summary
    assert neighbours["headers"] == ["rank", "treatment", "MoA", "cosine similarity", "profiles"]
    ranked = [r[1] for r in neighbours["data"]]
    assert ranked == expected_neighbours(reference_profiles, expected)
    similarities = [r[3] for r in neighbours["data"]]
    assert similarities == sorted(similarities, reverse=True)
    table = pd.read_parquet(reference_profiles)
    moa_of = dict(zip(table["Metadata_Treatment"], table["Metadata_moa"], strict=True))
    assert [r[2] for r in neighbours["data"]] == [moa_of[t] for t in ranked]
    assert f"**{ranked[0]}**" in summary

    assert np.asarray(Image.open(picture)).shape[:2] == (48 * 5, 40 * 5)  # the composite, enlarged 5x for display
    assert np.asarray(Image.open(projection)).shape[0] > 200  # the PCA map


def test_space_per_channel_files_and_tiff(client, local_pipeline, tmp_path):
    image = random_image(2, 32, 32)
    expected = local_pipeline(image)
    # File names give the channel order: uploaded in another order, they are sorted.
    channel_files = [tmp_path / f"{index}_{name}.png" for index, name in enumerate(CHANNELS)]
    for channel, path in enumerate(channel_files):
        Image.fromarray(image[..., channel]).save(path)
    _, summary, _, _, downloads = embed(client, channel_files[::-1])
    np.testing.assert_allclose(np.load(next(f for f in downloads if f.endswith(".npy"))), expected, atol=1e-5)
    assert "0_DNA.png -> DNA, 1_Tubulin.png -> Tubulin, 2_Actin.png -> Actin" in summary

    tiff = tmp_path / "field.tif"
    tifffile.imwrite(tiff, np.moveaxis(image, -1, 0), photometric="minisblack")  # a 3-page (C, H, W) TIFF
    _, _, _, _, downloads = embed(client, [tiff])
    np.testing.assert_allclose(np.load(next(f for f in downloads if f.endswith(".npy"))), expected, atol=1e-5)

    plate = dict(image_mean="1000, 1100, 1200", image_std="300,300,300")
    _, _, _, _, downloads = embed(client, [tiff], **plate)
    with_plate = local_pipeline(image, image_mean=[1000, 1100, 1200], image_std=[300, 300, 300])
    np.testing.assert_allclose(np.load(next(f for f in downloads if f.endswith(".npy"))), with_plate, atol=1e-5)


def _bytes_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "files, options, message",
    [
        ([("notes.npy", b"this is no array")], {}, "notes.npy: cannot read notes.npy"),
        ([("five.npy", _npy_bytes(random_image(0, 32, 32, channels=5)))], {},
         r"five.npy: the model expects 3 channels, \(H, W, 3\) or \(3, H, W\), but got an array of shape \(32, 32, 5\)"),
        ([("a.png", b""), ("b.png", b"")], {}, "got 2 files; the model expects 3 channels"),
        ([("ok.npy", _npy_bytes(random_image(0, 32, 32)))], {"image_mean": "1,2,3"}, "give both the plate mean"),
        ([("ok.npy", _npy_bytes(random_image(0, 32, 32)))], {"image_mean": "1,2", "image_std": "1,1,1"},
         r"plate mean: expected 3 numbers \(one per channel\), got 2"),
        ([("ok.npy", _npy_bytes(random_image(0, 32, 32)))], {"image_mean": "a,b,c", "image_std": "1,1,1"},
         "plate mean: expected 3 comma-separated numbers"),
        ([], {}, "upload an image first"),
    ],
)
def test_space_bad_uploads_get_a_readable_message(client, tmp_path, files, options, message):
    paths = [_bytes_file(tmp_path, name, data) for name, data in files]
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        embed(client, paths, **options)
    text = str(error.value)
    assert __import__("re").search(message, text), text
    assert "Traceback" not in text and "/gradio/" not in text  # no server paths, no stack


# ---- the app's settings and examples (in this process, no launch) -------------------------------------------------


def test_app_settings_and_examples(space_model, reference_profiles, monkeypatch):
    app = load_app_module()
    monkeypatch.delenv("CDCL_MODEL", raising=False)
    assert app.default_model() == "my-org/cdcl-bbbc021"  # the README's models: entry
    monkeypatch.setenv("CDCL_MODEL", str(space_model))
    assert app.default_model() == str(space_model)

    demo = app.Demo(str(space_model), reference_profiles)
    assert demo.channel_names == CHANNELS and demo.num_channels == 3
    example = Path(demo.examples[-1][0])  # the synthetic example made for this model: twice the input
    assert np.load(example).shape == (64, 64, 3)
    _, summary, neighbours, _, _ = demo.embed([str(example)], True, 0, 0, "", "")
    assert "4 tiles of 32 x 32 px" in summary and len(neighbours) == 5
    _, summary, _, _, _ = demo.embed([str(example)], False, 0, 0, "", "")
    assert "one input (resized by the image processor)" in summary

    references = app.References.from_parquet(reference_profiles)
    table = pd.read_parquet(reference_profiles)
    assert len(references.table) == table["Metadata_Treatment"].nunique()
    wide = reference_profiles.with_name("wide.parquet")
    table.assign(emb_extra=0.0).to_parquet(wide)
    with pytest.raises(ValueError, match="reference profiles have 65 features but .* embeds into 64"):
        app.Demo(str(space_model), wide)


# ---- a real browser -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_space_in_headless_chromium(space_model, shared_data_dir, tmp_path, tmp_path_factory):
    """Chromium (Debian's package) loads the page, uploads a real BBBC021 crop, and the result is screenshotted."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install playwright)")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
    from cdcl_hf.dataset_builders import build_screen_dataset, folder_source

    crops = shared_data_dir / "bbbc021_crops"
    source = folder_source(crops / "metadata.csv", image_root=crops / "images", channel_names=CHANNELS)
    dataset = build_screen_dataset(source, output_dir=tmp_path / "bbbc021").output_dir
    profiles = evaluate_profiles(space_model, tmp_path / "evaluation", ["--dataset_name", str(dataset)])
    metadata = pd.read_csv(crops / "metadata.csv")
    crop = crops / "images" / metadata.loc[metadata["compound"] == "taxol", "file"].iloc[0]

    app = load_app_module()
    blocks, demo = app.build_demo(str(space_model), profiles)
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                              allowed_paths=[str(demo.output_dir)])
    screenshot = tmp_path_factory.getbasetemp() / "space_screenshot.png"
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            page.locator("input[type=file]").first.set_input_files(str(crop))
            page.get_by_role("button", name="Embed").click()
            page.get_by_text("Nearest reference treatment:").wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # let the images finish rendering
            page.screenshot(path=str(screenshot), full_page=True)
            text = page.inner_text("body")
            browser.close()
    finally:
        blocks.close()
    print(f"\nscreenshot of the Space: {screenshot}")
    assert crop.name in text and "64-dimensional" in text
    treatments = set(pd.read_parquet(profiles)["Metadata_Treatment"])
    assert any(treatment in text for treatment in treatments)
    assert screenshot.stat().st_size > 20_000

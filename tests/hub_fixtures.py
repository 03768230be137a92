"""Pytest fixtures for the in-test Hub (tests/hub_server.py); conftest.py imports them.

``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` / ``HF_HUB_DISABLE_XET`` when they are
first imported, so this module binds the server's port and sets those variables as soon as it is
imported (conftest.py is imported before any test module). The ``hub_server`` fixture also
re-points the already-imported clients, so the fixture works whatever the import order was.

Fixtures:

* ``hub_server`` (session): a running :class:`HubServer`; the real clients talk to it.
* ``hub_repo_id`` (function): a fresh, unique ``"test-user/<name>"`` id for one test.

A test that pushes and pulls looks like::

    def test_push(hub_server, hub_repo_id, tmp_path):
        dataset.push_to_hub(hub_repo_id)
        loaded = datasets.load_dataset(hub_repo_id, cache_dir=str(tmp_path / "cache"))
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import USER_NAME, HubServer  # noqa: E402

_HUB = HubServer()  # binds 127.0.0.1:<free port> now; serving starts with the fixture
HUB_ENDPOINT = _HUB.endpoint
HUB_TOKEN = "hf_test_token_for_the_local_hub"

# Set before huggingface_hub / datasets are imported, so their import-time constants point here.
os.environ["HF_ENDPOINT"] = HUB_ENDPOINT
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _point_clients_at(endpoint: str) -> None:
    """Re-point already imported clients (module constants and cached instances) at ``endpoint``."""
    if "huggingface_hub" in sys.modules:
        import huggingface_hub
        from huggingface_hub import constants, hf_api

        constants.ENDPOINT = endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_DISABLE_XET = True
        hf_api.api.endpoint = endpoint
        huggingface_hub.HfFileSystem.clear_instance_cache()
    if "datasets" in sys.modules:
        import datasets.config

        datasets.config.HF_ENDPOINT = endpoint
        datasets.config.HUB_DATASETS_URL = endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"


@pytest.fixture(scope="session")
def hub_server():
    """The in-test Hub, serving on 127.0.0.1 for the whole session, with clients pointed at it."""
    if not _HUB.thread.is_alive():
        _HUB.start()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", HUB_ENDPOINT)
        patch.setenv("HF_TOKEN", HUB_TOKEN)
        patch.setenv("HF_HUB_DISABLE_XET", "1")
        # Keeps the client's token file and any stray hub cache out of the user's home.
        patch.setenv("HF_HOME", tempfile.mkdtemp(prefix="cdcl-test-hf-home-"))
        _point_clients_at(HUB_ENDPOINT)
        yield _HUB


@pytest.fixture
def hub_repo_id(hub_server) -> str:
    """A repo id no other test uses (repos live for the whole session)."""
    return f"{USER_NAME}/repo-{uuid.uuid4().hex[:10]}"

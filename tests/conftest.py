"""Shared test fixtures."""

from pathlib import Path

import pytest
import torch

# The CI machine has two cores; more threads only adds contention between test processes.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The read-only real BBBC021 material in ../shared/data; tests needing it skip without it."""
    if not (SHARED_DATA / "bbbc021_crops" / "metadata.csv").is_file():
        pytest.skip(f"real BBBC021 data not found at {SHARED_DATA} (only present in the development workspace)")
    return SHARED_DATA


# The in-test Hub server (tests/hub_server.py) and its fixtures; importing sets HF_ENDPOINT before any HF client
# reads it.
from hub_fixtures import hub_repo_id, hub_server  # noqa: E402, F401

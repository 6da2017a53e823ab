"""Shared test setup for napari-semicl.

- ``SHARED_DATA`` / the ``shared_data`` fixture: the shared data sets folder, ``../shared/data``
  next to the repository (override with the ``SEMICL_SHARED_DATA`` environment variable).
- ``requires_shared(subdir)``: returns ``SHARED_DATA / subdir`` or skips the test when absent.
  Tests marked ``@pytest.mark.shared_data`` (optionally ``("acdc", ...)``) skip the same way.
- torch runs on 2 threads and every test starts from the same seeds.

Nothing here imports napari or Qt: GUI tests import them themselves and use napari's
``make_napari_viewer`` fixture (napari's pytest plugin is registered when napari is installed).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(
    os.environ.get("SEMICL_SHARED_DATA") or (REPO_ROOT.parent / "shared" / "data")
).resolve()
SEED = 0
TORCH_THREADS = 2


def requires_shared(subdir: str | os.PathLike[str] = "") -> Path:
    """Return ``SHARED_DATA / subdir``; skip the calling test when it does not exist."""
    path = SHARED_DATA / subdir
    if not path.exists():
        pytest.skip(
            f"shared data {path} is absent (expected ../shared/data next to the repository, "
            "or set SEMICL_SHARED_DATA)"
        )
    return path


def _seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)


def pytest_configure(config: pytest.Config) -> None:
    # Markers are declared in pyproject.toml; repeat them so the suite also runs without it.
    config.addinivalue_line("markers", "gui: needs a display with OpenGL (run under Xvfb)")
    config.addinivalue_line(
        "markers", "shared_data(*subdirs): reads ../shared/data and skips when it is absent"
    )


def _configure_torch() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(TORCH_THREADS)
    try:
        torch.set_num_interop_threads(TORCH_THREADS)
    except RuntimeError:  # already set, or parallel work already started
        pass


# At conftest import, i.e. before any test module is collected.
_configure_torch()
_seed_everything()


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers(name="shared_data"):
        for subdir in marker.args or ("",):
            requires_shared(subdir)


@pytest.fixture(autouse=True)
def _reseed() -> None:
    """Each test starts from the same seeds, whatever ran before it."""
    _seed_everything()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data sets folder (may not exist; see ``requires_shared``)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def one_torch_thread():
    """One torch thread for a test (modules opt in with ``usefixtures``): on a loaded 2-core
    machine, OpenMP workers waiting for a busy core make a step many times slower
    (engine/device.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Without a usable display, GUI tests are skipped with a message naming Xvfb (conftest.py),
instead of Qt aborting the whole pytest process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import conftest
from conftest import NO_DISPLAY, REPO_ROOT, display_problem


@pytest.fixture
def fresh_probe():
    display_problem.cache_clear()
    yield
    display_problem.cache_clear()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="DISPLAY is how Linux finds its X server")
def test_no_display_variable_is_a_problem(monkeypatch, fresh_probe):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert display_problem() == "DISPLAY is not set"


def test_offscreen_qt_has_no_opengl(monkeypatch, fresh_probe):
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert "no OpenGL" in display_problem()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11 only")
def test_a_display_that_does_not_open_is_a_problem(monkeypatch, fresh_probe):
    monkeypatch.setenv("DISPLAY", ":4321")  # no X server there
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert "does not open" in display_problem() or "cannot be loaded" in display_problem()


def test_gui_tests_are_recognised_by_marker_and_fixture():
    class Item:
        def __init__(self, marker, fixtures):
            self._marker, self.fixturenames = marker, fixtures

        def get_closest_marker(self, name):
            return self._marker if name == "gui" else None

    assert conftest.is_gui_test(Item(object(), []))
    assert conftest.is_gui_test(Item(None, ["tmp_path", "make_napari_viewer"]))
    assert conftest.is_gui_test(Item(None, ["qtbot"]))
    assert not conftest.is_gui_test(Item(None, ["tmp_path"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="DISPLAY is how Linux finds its X server")
def test_pytest_without_display_skips_gui_tests_instead_of_crashing():
    env = {k: v for k, v in os.environ.items() if k not in {"DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"}}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_gui_smoke.py", "-q", "-rs", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert NO_DISPLAY in proc.stdout and "Xvfb" in NO_DISPLAY
    assert "passed" not in proc.stdout.splitlines()[-1]

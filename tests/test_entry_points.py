"""The command line is reachable after an install: ``python -m napari_semicl`` and the install
script's pyenv rehash (or the full path it prints when the command is still not on the PATH)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTALL_SH = REPO / "scripts" / "install.sh"


def test_python_m_napari_semicl_help():
    proc = subprocess.run([sys.executable, "-m", "napari_semicl", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: napari-semicl")
    for command in ("train", "predict", "evaluate", "bench"):
        assert command in proc.stdout


needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or os.name != "posix"
    or any(shutil.which(cmd, path="/usr/bin:/bin") for cmd in ("pyenv", "napari-semicl")),
    reason="needs bash, and no pyenv or napari-semicl in /usr/bin or /bin (the fake PATH keeps those)",
)


def _make_cli_reachable(tmp_path: pathlib.Path, *, pyenv: str | None) -> tuple[subprocess.CompletedProcess, str]:
    """Run install.sh's semicl_make_cli_reachable with PATH = a fake bin folder + the system's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "pyenv.log"
    if pyenv is not None:
        fake = bin_dir / "pyenv"
        fake.write_text(f"#!/bin/sh\necho \"$@\" >> '{log}'\n{pyenv}\n")
        fake.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "SEMICL_PY": sys.executable}
    proc = subprocess.run(["bash", "-c", f"source '{INSTALL_SH}' && semicl_make_cli_reachable"],
                          env=env, capture_output=True, text=True, timeout=60)
    return proc, log.read_text() if log.exists() else ""


@needs_bash
def test_install_rehashes_pyenv_and_is_quiet_when_the_cli_is_found(tmp_path):
    shim = tmp_path / "bin" / "napari-semicl"  # what `pyenv rehash` would create
    proc, calls = _make_cli_reachable(tmp_path, pyenv=f"printf '#!/bin/sh\\n' > '{shim}'; chmod +x '{shim}'")
    assert proc.returncode == 0, proc.stderr
    assert calls.split() == ["rehash"]
    assert "not on your PATH" not in proc.stderr


@needs_bash
def test_install_prints_the_full_path_when_the_cli_is_still_missing(tmp_path):
    proc, calls = _make_cli_reachable(tmp_path, pyenv="true")
    assert proc.returncode == 0, proc.stderr
    assert calls.split() == ["rehash"]
    script = pathlib.Path(sysconfig.get_path("scripts")) / "napari-semicl"
    if script.exists():
        assert f"run it as {script}" in proc.stderr
    assert f"{sys.executable} -m napari_semicl" in proc.stderr


@needs_bash
def test_install_without_pyenv_does_not_call_it(tmp_path):
    proc, calls = _make_cli_reachable(tmp_path, pyenv=None)
    assert proc.returncode == 0, proc.stderr
    assert calls == ""
    assert "-m napari_semicl" in proc.stderr


@pytest.mark.skipif(shutil.which("bash") is None or os.name != "posix", reason="needs bash")
@pytest.mark.parametrize("qt_api", [None, "pyqt6", "qt7"])
def test_run_tests_picks_the_qt_binding_from_semicl_qt_api(qt_api):
    """PyQt5 unless SEMICL_QT_API=pyqt6 asks for PyQt6 (installed beside it); nothing is run (dry run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("QT_API", "PYTEST_QT_API", "SEMICL_QT_API")}
    env.update(SEMICL_DRY_RUN="1", PYTHON=sys.executable)
    if qt_api is not None:
        env["SEMICL_QT_API"] = qt_api
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_tests.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    if qt_api == "qt7":
        assert proc.returncode == 2 and "SEMICL_QT_API must be pyqt5 or pyqt6" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    assert f"Qt binding: {qt_api or 'pyqt5'}" in proc.stderr
    assert ("PyQt6" in proc.stderr) == (qt_api == "pyqt6")

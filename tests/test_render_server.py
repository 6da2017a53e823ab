"""The render process: jobs run in a child that imports only what they need, failures come
back as exceptions, a dead child fails its jobs, and the parent's script never runs again."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
import textwrap

import pytest

from napari_semicl.analysis.render_server import RENDER_NICE, RenderClient, RenderProcessDied


@pytest.fixture
def client():
    c = RenderClient()
    yield c
    c.close()


def test_jobs_run_in_the_child(client):
    assert client.submit(operator.add, 2, 3).result(30) == 5
    assert client.submit(os.getpid).result(10) == client.pid != os.getpid()
    if hasattr(os, "getpriority"):  # below the viewer for the OS scheduler
        nice = client.submit(os.getpriority, os.PRIO_PROCESS, 0).result(10)
        assert nice == min(19, os.getpriority(os.PRIO_PROCESS, 0) + RENDER_NICE)


def test_a_failing_job_raises_its_exception_and_the_child_goes_on(client):
    with pytest.raises(ZeroDivisionError):
        client.submit(operator.truediv, 1, 0).result(30)
    with pytest.raises(Exception, match="pickle|lambda"):  # cannot be sent: fails alone
        client.submit(operator.add, lambda: 1, 1).result(10)
    assert client.submit(operator.mul, 6, 7).result(10) == 42
    assert client.alive


def test_a_child_that_dies_fails_its_jobs(client):
    client.submit(operator.add, 1, 1).result(30)
    with pytest.raises(RenderProcessDied, match="exit code 3"):
        client.submit(os._exit, 3).result(10)
    assert not client.alive
    with pytest.raises(RenderProcessDied):
        client.submit(operator.add, 1, 1)


def test_close_ends_the_child(client):
    client.submit(operator.add, 1, 1).result(30)
    client.close()
    assert client._proc.poll() is not None and not client.alive


def test_the_parents_script_does_not_run_again(tmp_path):
    """multiprocessing's spawn would run an unguarded script again in the child (a napari
    script would open a second viewer there)."""
    marker = tmp_path / "runs.txt"
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import operator
        from napari_semicl.analysis.render_server import RenderClient
        with open({str(marker)!r}, "a") as fh:
            fh.write("ran\\n")
        client = RenderClient()
        print(client.submit(operator.add, 20, 22).result(60))
        client.close()
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "42"
    assert marker.read_text() == "ran\n"

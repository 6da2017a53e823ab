"""The Train dock on two devices: a torchrun job of two gloo processes on the CPU.

``NAPARI_SEMICL_CPU_RANKS=2`` offers the dock's "devices" setting without GPUs; the job's
children import this worktree's package (engine.launch puts it first on their path).
"""

from __future__ import annotations

import pytest

napari = pytest.importorskip("napari")

from napari_semicl.engine.events import Finished, Preview, StepDone  # noqa: E402
from napari_semicl.engine.launch import CPU_RANKS_ENV, DistributedRun  # noqa: E402

from test_plugin_docks import PAINTED, open_train_dock, paint  # noqa: E402


def test_a_two_process_run_from_the_dock_streams_stops_and_leaves_no_process(crop_viewer, qtbot, tmp_path,
                                                                            monkeypatch, small_network):
    monkeypatch.setenv(CPU_RANKS_ENV, "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    viewer, image, reference, painted = crop_viewer
    paint(painted, reference, PAINTED)
    widget = open_train_dock(viewer, tmp_path, small_network, iterations=100_000, method="mean_teacher", refresh=2)
    widget.patch_spin.setValue(48)
    assert not widget.devices_row.isHidden() and widget.devices_spin.maximum() == 2
    widget.devices_spin.setValue(2)
    assert widget.start_training()
    run = widget.trainer
    assert isinstance(run, DistributedRun)
    events: list = []
    widget.worker.yielded.connect(events.append)
    # rank 0's progress and previews arrive in the dock as from a local run
    qtbot.waitUntil(lambda: any(isinstance(e, Preview) for e in events) and run.step >= 3, timeout=120_000)
    assert "x 2 processes" in widget.status_label.text() or any("2 processes" in getattr(e, "device", "")
                                                                  for e in events)
    assert widget.progress_bar.value() >= 0 and "step" in widget.eta_label.text()
    assert viewer.layers[f"{image.name} prediction"].data.shape == image.data.shape
    pids = run.processes()
    assert len(pids) == 3  # torchrun and its two ranks
    widget.stop_button.click()  # reaches every rank: they leave at the same step
    qtbot.waitUntil(lambda: not widget.is_training, timeout=60_000)
    finished = [e for e in events if isinstance(e, Finished)]
    assert [f.reason for f in finished] == ["stopped"], finished
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert finished[0].step == max(e.step for e in events if isinstance(e, StepDone))
    qtbot.waitUntil(lambda: not run.processes(), timeout=30_000)

    # Resume starts the job again from its checkpoint; closing the viewer ends it
    widget.resume_button.click()
    qtbot.waitUntil(lambda: bool(run.processes()) and run.step > finished[0].step, timeout=120_000)
    pids = run.processes()
    viewer.close()
    # up to 10 s to checkpoint, then SIGTERM and SIGKILL 5 s apart; room left for a loaded machine
    qtbot.waitUntil(lambda: not run.processes(), timeout=90_000)
    from napari_semicl.engine.launch import _alive

    assert not any(_alive(pid) for pid in pids)

"""The figure drawn off the Qt thread (render process, render thread), worker results after
a dock is gone, background priority, and the garbage-collector freeze while training (the
review docks' latency fixes)."""

from __future__ import annotations

import gc
import os
import sys
import threading

import numpy as np
import pytest

pytestmark = pytest.mark.gui

pytest.importorskip("pytestqt")
from qtpy.QtCore import QPoint, Qt  # noqa: E402
from qtpy.QtWidgets import QWidget  # noqa: E402

from napari_semicl.analysis import render_server  # noqa: E402
from napari_semicl.widgets import _figure  # noqa: E402
from napari_semicl.widgets._figure import FigureView  # noqa: E402
from napari_semicl.widgets._link import _RUNNING, start_worker  # noqa: E402
from napari_semicl.widgets._worker import (  # noqa: E402
    BACKGROUND_NICE,
    freeze_heap,
    lower_thread_priority,
    restore_thread_priority,
    thaw_heap,
)

from figure_draws import draw_line  # noqa: E402


def _draw_line(fig, snap):
    snap["threads"].append(threading.current_thread().name)
    fig.clear()
    ax = fig.add_axes((0.1, 0.1, 0.8, 0.8))
    ax.plot([0, 1], [0, snap["slope"]], "r-")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return lambda: {"slope": snap["slope"], "origin": ax.transData.transform((0.0, 0.0))}


def _shown(qtbot, draw, in_process):
    v = FigureView(draw, min_height=120, in_process=in_process)
    qtbot.addWidget(v)
    v.resize(300, 200)
    v.show()
    qtbot.waitExposed(v)
    return v


@pytest.fixture
def view(qtbot):
    """A view drawing in the render thread (its draw records the thread's name)."""
    return _shown(qtbot, _draw_line, in_process=False)


@pytest.fixture
def pview(qtbot):
    """A view drawing in the render process."""
    v = _shown(qtbot, draw_line, in_process=True)
    assert v.in_process
    return v


def _red_on_the_diagonal(view) -> None:
    """The red line is in the picture, on the diagonal of the axes."""
    image = view._image
    assert (image.width(), image.height()) == view.pixel_size()
    x0, y0 = view.info["origin"]
    h = image.height()
    mid = image.pixelColor(int(x0 + 0.4 * 0.8 * image.width()), int(h - y0 - 0.4 * 0.8 * h))
    assert mid.red() > 200 and mid.green() < 100, mid.name()


def test_drawn_in_the_render_thread_at_the_widget_size(view, qtbot):
    threads: list[str] = []
    view.submit({"slope": 1.0, "threads": threads})
    assert view.busy
    qtbot.waitUntil(lambda: not view.busy and view.info is not None, timeout=10_000)
    assert threads and all(name.startswith("semicl-figure") for name in threads)
    _red_on_the_diagonal(view)


def test_a_closure_cannot_go_to_the_render_process(qtbot):
    v = _shown(qtbot, lambda fig, snap: None, in_process=True)
    assert not v.in_process  # drawn in the render thread instead


def test_drawn_in_the_render_process_at_the_widget_size(pview, qtbot):
    pview.submit({"slope": 1.0})
    assert pview.busy
    qtbot.waitUntil(lambda: not pview.busy and pview.info is not None, timeout=60_000)  # first: spawn
    assert pview.info["pid"] != os.getpid()
    if hasattr(os, "getpriority"):  # below the viewer for the OS scheduler
        assert pview.info["nice"] == min(19, os.getpriority(os.PRIO_PROCESS, 0) + render_server.RENDER_NICE)
    _red_on_the_diagonal(pview)


def test_the_newest_snapshot_wins_in_the_process(pview, qtbot):
    pview.submit({"slope": 1.0})
    qtbot.waitUntil(lambda: not pview.busy, timeout=60_000)
    first = pview.info["draws"]
    for slope in (0.1, 0.2, 0.3, 0.4, 0.5):
        pview.submit({"slope": slope})
    qtbot.waitUntil(lambda: not pview.busy, timeout=10_000)
    assert pview.info["slope"] == 0.5
    assert pview.info["draws"] - first <= 2  # the one already running and the newest


def test_a_failing_draw_in_the_process_keeps_the_last_image(pview, qtbot):
    pview.submit({"slope": 1.0})
    qtbot.waitUntil(lambda: not pview.busy and pview.info is not None, timeout=60_000)
    shown = pview._image
    pview.submit({"slope": 0.5, "fail": True})
    qtbot.waitUntil(lambda: not pview.busy, timeout=10_000)
    assert pview._image is shown and pview.info["slope"] == 1.0


def test_a_render_process_that_dies_is_replaced_and_the_figure_drawn(pview, qtbot, tmp_path):
    pview.submit({"slope": 0.5})
    qtbot.waitUntil(lambda: not pview.busy and pview.info is not None, timeout=60_000)
    first_pid = pview.info["pid"]
    failures = _figure._PROCESS_FAILURES
    pview.submit({"slope": 1.0, "die_once": str(tmp_path / "died")})
    qtbot.waitUntil(lambda: not pview.busy and pview.info["slope"] == 1.0, timeout=60_000)
    assert (tmp_path / "died").exists()  # the first process died drawing it
    assert pview.info["pid"] not in (first_pid, os.getpid())  # drawn by a new render process
    assert _figure._PROCESS_FAILURES == failures + 1
    _red_on_the_diagonal(pview)


def test_after_repeated_process_deaths_figures_are_drawn_in_the_thread(pview, qtbot, monkeypatch):
    monkeypatch.setattr(_figure, "_PROCESS_FAILURES", 0)
    monkeypatch.setattr(_figure, "MAX_PROCESS_FAILURES", 2)
    pview.submit({"slope": 0.6, "die_always": True})
    qtbot.waitUntil(lambda: not pview.busy and pview.info is not None, timeout=60_000)
    assert pview.info["pid"] == os.getpid() and pview.info["slope"] == 0.6
    assert _figure._PROCESS_FAILURES == 2 and _figure._render_process() is None
    monkeypatch.setattr(_figure, "_PROCESS_FAILURES", 0)  # undone: later views use a process again


def test_the_newest_snapshot_wins(view, qtbot):
    threads: list[str] = []
    for slope in (0.1, 0.2, 0.3, 0.4, 0.5):
        view.submit({"slope": slope, "threads": threads})
    qtbot.waitUntil(lambda: not view.busy, timeout=10_000)
    assert view.info["slope"] == 0.5
    assert len(threads) <= 2  # the first (already running) and the newest; the rest skipped


def test_a_resize_draws_again_at_the_new_size(view, qtbot):
    view.render_now({"slope": 1.0, "threads": []})
    view.resize(360, 260)
    qtbot.waitUntil(lambda: not view._resize_timer.isActive() and not view.busy
                    and view._image.width() == view.pixel_size()[0], timeout=10_000)
    assert (view._image.width(), view._image.height()) == view.pixel_size()


def test_a_click_gives_figure_coordinates(view, qtbot):
    view.render_now({"slope": 1.0, "threads": []})
    got = []
    view.clicked.connect(lambda x, y, b: got.append((x, y, b)))
    x0, y0 = view.info["origin"]  # data (0, 0) in figure pixels, origin bottom left
    ratio = view.devicePixelRatioF()
    qtbot.mouseClick(view, Qt.LeftButton, pos=QPoint(round(x0 / ratio), round((view.pixel_size()[1] - y0) / ratio)))
    assert len(got) == 1
    x, y, button = got[0]
    assert button == 1 and abs(x - x0) <= 1.5 and abs(y - y0) <= 1.5


def test_render_now_is_not_overwritten_by_an_older_background_render(view, qtbot):
    view.submit({"slope": 0.2, "threads": []})  # in flight
    view.render_now({"slope": 0.9, "threads": []})  # newer, shown at once
    qtbot.waitUntil(lambda: not view.busy, timeout=10_000)
    qtbot.wait(50)  # the older render's result has been delivered by now
    assert view.info["slope"] == 0.9


def test_a_failing_draw_keeps_the_last_image(view, qtbot):
    view.render_now({"slope": 1.0, "threads": []})
    shown = view._image
    view.submit({"slope": 1.0})  # no "threads": the draw raises KeyError in the render thread
    qtbot.waitUntil(lambda: not view.busy, timeout=10_000)
    assert view._image is shown and view.info["slope"] == 1.0


def test_worker_result_after_its_widget_is_deleted(qtbot):
    release = threading.Event()
    widget = QWidget()
    got = []

    def slow(x):
        release.wait(10)
        return x * 2

    worker = start_worker(slow, 21, returned=lambda v: (widget.setWindowTitle(str(v)), got.append(v)))
    assert worker in _RUNNING
    widget.deleteLater()
    qtbot.wait(50)  # the widget is gone before the worker finishes
    release.set()
    qtbot.waitUntil(lambda: worker not in _RUNNING, timeout=10_000)
    assert got == []  # dropped quietly, no exception in any thread


def test_freeze_and_thaw_the_heap():
    before = gc.get_freeze_count()
    assert before == 0
    kept = [np.zeros(1) for _ in range(10)]
    freeze_heap()
    try:
        assert gc.get_freeze_count() > 0
        freeze_heap()  # a second run in another viewer
        thaw_heap()
        assert gc.get_freeze_count() > 0  # still one run training
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    thaw_heap()  # unbalanced: no effect
    assert gc.get_freeze_count() == 0 and len(kept) == 10


def test_one_render_thread_and_one_render_process_for_every_view():
    assert _figure._executor() is _figure._executor()
    assert _figure._render_process() is _figure._render_process() is not None


def test_status_label_keeps_its_height(qtbot):
    from napari_semicl.widgets._link import StatusLabel

    label = StatusLabel("short", lines=2)
    qtbot.addWidget(label)
    label.resize(200, label.height())
    label.show()
    height = label.height()
    label.setText("a much longer message " * 20)  # many lines when wrapped
    qtbot.wait(10)
    assert label.height() == height == label.minimumHeight() == label.maximumHeight()
    assert label.toolTip() == label.text()


def test_a_training_worker_freezes_the_heap_until_it_ends(qtbot):
    """The worker freezes at start and thaws from its own thread when it ends, with no dock
    involved (a closed dock cannot leave the heap frozen)."""
    from napari_semicl.widgets._worker import start_training_worker

    class Trainer:
        step = 0

        def run(self):
            assert gc.get_freeze_count() > 0  # frozen while the run trains
            yield "event"

    got = []
    worker, control = start_training_worker(Trainer(), on_event=got.append, on_error=lambda e: None,
                                            on_finished=lambda: None)
    assert control.wait(10)
    qtbot.waitUntil(lambda: gc.get_freeze_count() == 0, timeout=10_000)
    qtbot.waitUntil(lambda: got == ["event"], timeout=10_000)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux_only
def test_background_work_runs_below_the_qt_thread(qtbot):
    main = _nice()
    seen = []
    start_worker(_nice, returned=seen.append)
    qtbot.waitUntil(lambda: bool(seen), timeout=10_000)
    assert seen[0] == min(19, main + BACKGROUND_NICE)
    assert _nice() == main  # the Qt thread is untouched


@linux_only
def test_a_lowered_thread_gets_its_priority_back_where_allowed():
    got = {}

    def run():
        before = _nice()
        token = lower_thread_priority(3)
        got["lowered"] = _nice() - before
        restore_thread_priority(token)
        got["after"] = _nice() - before

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert got["lowered"] == 3
    # raising a priority again needs the privilege (root here; an ordinary user keeps it low)
    assert got["after"] == (0 if os.geteuid() == 0 else 3)
    restore_thread_priority(None)  # nothing lowered: nothing to do


@linux_only
def test_training_runs_below_the_qt_thread(qtbot):
    from napari_semicl.widgets._worker import start_training_worker

    main = _nice()

    class Trainer:
        step = 0

        def run(self):
            yield _nice()

    got = []
    worker, control = start_training_worker(Trainer(), on_event=got.append, on_error=lambda e: None,
                                            on_finished=lambda: None)
    assert control.wait(10)
    qtbot.waitUntil(lambda: bool(got), timeout=10_000)
    assert got == [min(19, main + BACKGROUND_NICE)] and _nice() == main

"""The "Feature space" dock: a t-SNE of a bounded sample of pixel embeddings.

On demand (or every N steps while training) the trainer embeds a bounded, class-stratified
sample of pixels across labelled and unlabelled slices
(:func:`~napari_semicl.engine.review.sample_embeddings`, between training steps); t-SNE
(scikit-learn) maps them to the plane in a worker thread; matplotlib draws them coloured by
class, painted pixels as dots and pseudo-labelled ones as crosses. Clicking a point moves
the viewer to its slice and centres it. The method's affinity matrix (AGCL's ``review()``
'affinity') is drawn beside it when there is one.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ..analysis import DEFAULT_MAX_POINTS, nearest_point, tsne_2d
from ..analysis.plots import draw_embedding
from ..engine.events import Analysed, StepDone
from ._figure import FigureView
from ._link import ReviewDock, StatusLabel, go_to, start_worker

log = logging.getLogger(__name__)

#: A click selects the nearest point within this many screen pixels.
CLICK_RADIUS_PX = 12.0


class FeaturePlotWidget(ReviewDock):
    """Dock with the t-SNE plot of embeddings; click a point to go to its pixel.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    train_widget : TrainWidget, optional
    """

    def __init__(self, napari_viewer, train_widget=None) -> None:
        self.data: dict[str, np.ndarray] = {}
        self.points: np.ndarray = np.zeros((0, 2), np.float32)
        self._busy = False
        self._last_request_step = -1
        #: the method's affinity matrix (AGCL), drawn beside the t-SNE when there is one
        self.affinity: np.ndarray | None = None
        super().__init__(napari_viewer, train_widget)
        self._build_ui()

    # ------------------------------------------------------------------ public API
    def compute(self) -> bool:
        """Ask for embeddings (then t-SNE); False when busy or without a trainer."""
        if self._busy:
            return False
        ok = self.request("embeddings", max_points=self.points_spin.value(), max_slices=self.slices_spin.value(),
                          seed=max(self._last_request_step, 0))
        if ok:
            self._busy = True
            self.request("method_review")
            self.status_label.setText("Embedding a sample of pixels...")
        return ok

    @property
    def busy(self) -> bool:
        return self._busy

    def show_embedding(self, data: dict, points: np.ndarray, wait: bool = False) -> None:
        """Draw ``points`` (N, 2) with the classes and labelled flags of ``data`` (in the
        render process, or here when ``wait``)."""
        self.data, self.points = data, np.asarray(points, np.float32)
        self._redraw(wait)

    def snapshot(self) -> dict:
        """A copy of what the figure shows, for the render process."""
        return {
            "points": self.points.copy(),
            "classes": np.asarray(self.data.get("embedding_labels", np.zeros(0, np.int64))).copy(),
            "labelled": np.asarray(self.data.get("embedding_is_labelled", np.zeros(0, bool))).astype(bool),
            "values": None if self.data.get("class_values") is None else list(self.data["class_values"]),
            "affinity": None if self.affinity is None else self.affinity.copy(),
        }

    def _redraw(self, wait: bool = False) -> None:
        if wait:
            self.view.render_now(self.snapshot())
        else:
            self.view.submit(self.snapshot())

    def select_point(self, index: int) -> None:
        """Move the viewer to the slice and pixel of point ``index``."""
        pos = self.data.get("positions")
        if pos is None or not 0 <= index < len(pos):
            return
        p, s, row, col = (int(v) for v in pos[index])
        image = self.run_image(p)
        if image is None:
            return
        go_to(self.viewer, image, s, self.axis, pixel=(row, col))
        kind = "painted" if self.data["embedding_is_labelled"][index] else "pseudo-labelled"
        self.status_label.setText(f"Point {index}: {kind} pixel ({row}, {col}) of slice {s}.")

    def point_at(self, x_px: float, y_px: float) -> int | None:
        """The point under figure position (x, y) in device pixels (matplotlib's origin:
        bottom left) in the image shown, or None."""
        xy = (self.view.info or {}).get("display_xy")
        if xy is None or not len(xy) or len(xy) != len(self.points):
            return None
        return nearest_point(xy, (x_px, y_px), max_distance=CLICK_RADIUS_PX)

    def point_position(self, index: int) -> tuple[float, float] | None:
        """Where point ``index`` is drawn: (x, y) in widget pixels (Qt's origin, top left)."""
        xy = (self.view.info or {}).get("display_xy")
        if xy is None or not 0 <= index < len(xy):
            return None
        ratio = self.view.devicePixelRatioF()
        height = self.view.pixel_size()[1]
        return float(xy[index, 0] / ratio), float((height - xy[index, 1]) / ratio)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.points_spin = QSpinBox()
        self.points_spin.setRange(50, 20_000)
        self.points_spin.setValue(DEFAULT_MAX_POINTS // 2)
        self.points_spin.setToolTip("At most this many pixels (stratified by class) go into the t-SNE")
        form.addRow("Points", self.points_spin)
        self.slices_spin = QSpinBox()
        self.slices_spin.setRange(1, 256)
        self.slices_spin.setValue(8)
        self.slices_spin.setToolTip("Slices the pixels are drawn from (half labelled, half unlabelled)")
        form.addRow("Slices", self.slices_spin)
        self.every_spin = QSpinBox()
        self.every_spin.setRange(0, 1_000_000)
        self.every_spin.setValue(0)
        self.every_spin.setSpecialValueText("on demand")
        self.every_spin.setToolTip("Recompute every N training steps (0: only with the button)")
        form.addRow("Every N steps", self.every_spin)
        layout.addLayout(form)
        row = QHBoxLayout()
        self.compute_button = QPushButton("Compute t-SNE")
        self.compute_button.clicked.connect(self._on_compute_clicked)
        row.addWidget(self.compute_button)
        layout.addLayout(row)
        # drawn with Agg in the render process: on the Qt thread a draw took 0.3-0.8 s while
        # training ran, and in a thread its Python kept napari from the GIL for 100-170 ms
        self.view = FigureView(draw_embedding, min_height=280)
        self.figure = self.view.figure
        self.view.clicked.connect(self._on_view_clicked)
        layout.addWidget(self.view, 1)
        self.status_label = StatusLabel("Press 'Compute t-SNE' once training has started.", lines=3)
        layout.addWidget(self.status_label)

    # ------------------------------------------------------------------ events
    def on_train_event(self, event) -> None:
        if isinstance(event, StepDone):
            every = self.every_spin.value()
            if every and event.step % every == 0 and not self._busy:
                self._last_request_step = event.step
                self.compute()
        elif isinstance(event, Analysed) and event.kind == "embeddings":
            self._run_tsne(event.arrays)
        elif isinstance(event, Analysed) and event.kind == "method_review":
            affinity = event.arrays.get("affinity")
            if affinity is not None and np.ndim(affinity) == 2:
                self.affinity = np.asarray(affinity, np.float32)
                self._redraw()

    def _run_tsne(self, data: dict) -> None:
        emb = data.get("embeddings")
        if emb is None or not len(emb):
            self._busy = False
            self.status_label.setText("No pixel to embed yet.")
            return
        self.status_label.setText(f"t-SNE of {len(emb)} embeddings (in the background)...")
        # one thread: scikit-learn's gradient would otherwise take every core from the viewer
        start_worker(tsne_2d, emb, seed=0, n_threads=1, returned=lambda pts, d=data: self._on_tsne_done(d, pts),
                     errored=self._on_tsne_error)

    def _on_tsne_done(self, data: dict, points: np.ndarray) -> None:
        self._busy = False
        self.show_embedding(data, points)
        n_lab = int(np.count_nonzero(data["embedding_is_labelled"]))
        self.status_label.setText(
            f"{len(points)} pixels: {n_lab} painted (dots), {len(points) - n_lab} pseudo-labelled (crosses). "
            "Click a point to go there."
        )

    def _on_tsne_error(self, exc: Exception) -> None:
        self._busy = False
        self._on_idle_error(exc)

    def _on_idle_error(self, exc: Exception) -> None:
        self._busy = False
        super()._on_idle_error(exc)

    def _on_view_clicked(self, x: float, y: float, button: int) -> None:
        if button != 1:
            return
        index = self.point_at(x, y)
        if index is not None:
            self.select_point(index)

    def _on_compute_clicked(self) -> None:
        self.compute()

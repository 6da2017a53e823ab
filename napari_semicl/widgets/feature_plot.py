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
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
)

from ..analysis import DEFAULT_MAX_POINTS, nearest_point, tsne_2d
from ..engine.events import Analysed, StepDone
from ._layers import CLASS_COLOURS
from ._link import ReviewDock, go_to

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
        self._tsne_worker = None
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

    def show_embedding(self, data: dict, points: np.ndarray) -> None:
        """Draw ``points`` (N, 2) with the classes and labelled flags of ``data``."""
        self.data, self.points = data, np.asarray(points, np.float32)
        ax = self._ax
        ax.clear()
        classes = data["embedding_labels"]
        labelled = data["embedding_is_labelled"].astype(bool)
        values = data.get("class_values")
        for k in np.unique(classes):
            colour = CLASS_COLOURS[int(k) % len(CLASS_COLOURS)]
            name = str(values[k]) if values is not None and k < len(values) else str(k)
            for mask, marker, what in ((labelled, "o", "painted"), (~labelled, "x", "pseudo")):
                sel = (classes == k) & mask
                if sel.any():
                    ax.scatter(self.points[sel, 0], self.points[sel, 1], s=10 if marker == "o" else 14,
                               c=colour, marker=marker, linewidths=0.8, label=f"{name} {what}")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t-SNE of {len(classes)} pixel embeddings", fontsize=9)
        if len(classes):
            ax.legend(fontsize=7, markerscale=1.5, loc="best", framealpha=0.6)
        self.canvas.draw_idle()

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
        """The point under display position (x, y) in canvas pixels (matplotlib's origin:
        bottom left), or None."""
        if not len(self.points):
            return None
        xy = self._ax.transData.transform(self.points.astype(np.float64))
        return nearest_point(xy, (x_px, y_px), max_distance=CLICK_RADIUS_PX)

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
        # fixed margins: a layout engine re-runs on every draw (slow on the Qt thread)
        self.figure = Figure(figsize=(4, 4))
        self.figure.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.92, wspace=0.08)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(280)
        self._ax = self.figure.add_subplot(1, 1, 1)
        self._ax.set_xticks([])
        self._ax.set_yticks([])
        self._affinity_ax = None
        self.canvas.mpl_connect("button_press_event", self._on_canvas_pressed)
        layout.addWidget(self.canvas, 1)
        self.status_label = QLabel("Press 'Compute t-SNE' once training has started.")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)

    def _show_affinity(self, affinity: np.ndarray) -> None:
        if self._affinity_ax is None:
            self._ax.set_subplotspec(self.figure.add_gridspec(1, 2)[0, 0])
            self._affinity_ax = self.figure.add_subplot(1, 2, 2)
        ax = self._affinity_ax
        ax.clear()
        ax.imshow(affinity, cmap="viridis", interpolation="nearest")
        ax.set_title(f"affinity ({affinity.shape[0]} x {affinity.shape[1]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        self.canvas.draw_idle()

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
                self._show_affinity(np.asarray(affinity))

    def _run_tsne(self, data: dict) -> None:
        emb = data.get("embeddings")
        if emb is None or not len(emb):
            self._busy = False
            self.status_label.setText("No pixel to embed yet.")
            return
        self.status_label.setText(f"t-SNE of {len(emb)} embeddings (in the background)...")
        worker = create_worker(tsne_2d, emb, seed=0, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda pts, d=data: self._on_tsne_done(d, pts))
        worker.errored.connect(self._on_tsne_error)
        self._tsne_worker = worker
        worker.start()

    def _on_tsne_done(self, data: dict, points: np.ndarray) -> None:
        self._busy = False
        self._tsne_worker = None
        self.show_embedding(data, points)
        n_lab = int(np.count_nonzero(data["embedding_is_labelled"]))
        self.status_label.setText(
            f"{len(points)} pixels: {n_lab} painted (dots), {len(points) - n_lab} pseudo-labelled (crosses). "
            "Click a point to go there."
        )

    def _on_tsne_error(self, exc: Exception) -> None:
        self._busy = False
        self._tsne_worker = None
        self._on_idle_error(exc)

    def _on_idle_error(self, exc: Exception) -> None:
        self._busy = False
        super()._on_idle_error(exc)

    def _on_canvas_pressed(self, mpl_event) -> None:
        if mpl_event.inaxes is not self._ax or mpl_event.button != 1:
            return
        index = self.point_at(mpl_event.x, mpl_event.y)
        if index is not None:
            self.select_point(index)

    def _on_compute_clicked(self) -> None:
        self.compute()

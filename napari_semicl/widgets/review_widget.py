"""The "Review pseudo-labels" dock: the teacher's pseudo-labels under a certainty
threshold, accept (and undo) them slice by slice, and aleatoric samples of a slice.

* Pseudo-labels: the Train dock's whole-volume prediction at each refresh, with the pixels
  whose certainty ``1 - normalised entropy`` is below the slider set to unknown (0), in an
  editable '<image> pseudo-labels' layer. Slices the user paints on in that layer are
  kept as corrected (refreshes leave them alone) until accepted.
* Accept puts the current slice's pseudo-labels into the user's labels layer as a slice that
  is complete under the run's semantics (:mod:`napari_semicl.analysis.accept`): with
  'unpainted means background' the whole predicted slice (an already painted slice is
  refused), else the confident pseudo-labels where the user has not painted. One step on the
  dock's undo stack; the list says what each accept put in. The Train dock hands the new
  labels to the trainer at its next refresh, so the slice trains as a labelled one.
* Entropy: the Train dock's '<image> entropy' layer (normalised to [0, 1]); the method's
  'aleatoric_disagreement' of the reviewed slice, when it has one, beside it.
* Aleatoric samples: S samples of the current slice from the method's aleatoric head, as a
  stack with its own slider.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from napari.utils import notifications
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
)

from ..analysis import sample_disagreement, threshold_pseudo_labels
from ..analysis.accept import merge_accepted_slice
from ..data.annotation import decode_classes, decoded_dtype
from ..engine.events import Analysed, Preview, Reviewed, Started
from ..errors import DataError
from . import _layers, _review_layers
from ._link import ReviewDock, StatusLabel, go_to, slice_index_tuple, start_worker

log = logging.getLogger(__name__)


@dataclass
class _Accepted:
    """One accept on the undo stack: what the labels slice held before."""

    labels_name: str  # the napari Labels layer, by name (docks see proxies, new at each access)
    pair_index: int
    slice_index: int
    key: tuple
    before: np.ndarray
    pixels: int


class ReviewWidget(ReviewDock):
    """Dock to review and accept pseudo-labels, with entropy and aleatoric samples.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    train_widget : TrainWidget, optional
        The Train dock to follow (found among the viewer's docks when not given).
    """

    def __init__(self, napari_viewer, train_widget=None) -> None:
        self._pred: dict[int, np.ndarray] = {}
        self._ent: dict[int, np.ndarray] = {}
        self._corrected: dict[int, set[int]] = {}
        self._undo: list[_Accepted] = []
        self._generation = 0
        super().__init__(napari_viewer, train_widget)
        self._build_ui()

    # ------------------------------------------------------------------ public API
    @property
    def threshold(self) -> float:
        return self.threshold_slider.value() / 100.0

    def set_threshold(self, value: float) -> None:
        """Certainty threshold in [0, 1]; the pseudo-labels are recomputed."""
        self.threshold_slider.setValue(round(100 * value))

    def pseudo_layer(self, pair_index: int = 0):
        image = self.run_image(pair_index)
        if image is None:
            return None
        return _layers._find(self.viewer, f"{image.name}{_review_layers.PSEUDO_SUFFIX}", _layers.Labels)

    def accepted_slices(self, pair_index: int = 0) -> list[int]:
        """Slices accepted (and not undone), in the order they were accepted."""
        return [a.slice_index for a in self._undo if a.pair_index == pair_index]

    def refresh_pseudo_labels(self, pair_index: int | None = None, *, wait: bool = False) -> None:
        """Recompute the thresholded pseudo-labels (in a worker thread) from the latest
        prediction and entropy; ``wait`` computes them here (tests, scripts)."""
        pairs = [pair_index] if pair_index is not None else sorted(set(self._pred) & set(self._ent))
        for p in pairs:
            if p not in self._pred or p not in self._ent or self._pred[p].shape != self._ent[p].shape:
                continue
            self._generation += 1
            args = (self._pred[p], self._ent[p], self.threshold)
            if wait:
                self._show_pseudo(p, self._generation, threshold_pseudo_labels(*args))
                continue
            start_worker(threshold_pseudo_labels, *args,
                         returned=lambda arr, p=p, g=self._generation: self._show_pseudo(p, g, arr))

    def accept_slice(self, slice_index: int | None = None, pair_index: int | None = None) -> bool:
        """Accept one slice of pseudo-labels into the user's labels layer.

        Under the run's semantics (:func:`~napari_semicl.analysis.accept.merge_accepted_slice`):
        with 'unpainted means background' the whole slice (the prediction, with the user's
        corrections), else the confident pseudo-labels where the user has not painted. The
        slice then counts as labelled at the Train dock's next refresh (or Resume). Returns
        False, with a notification saying why, when nothing is accepted.
        """
        p = self.active_pair_index() if pair_index is None else pair_index
        labels, pseudo = self.run_labels(p), self.pseudo_layer(p)
        if labels is None:
            notifications.show_warning("The training pair has no labels layer to accept into.")
            return False
        if pseudo is None or p not in self._pred or p not in self._ent:
            notifications.show_warning("No pseudo-labels yet: train until the first refresh.")
            return False
        s = self.current_slice(p) if slice_index is None else int(slice_index)
        if s is None:
            return False
        key = slice_index_tuple(labels.data.ndim, self.axis, s)
        before = np.array(labels.data[key], copy=True)
        try:
            result = merge_accepted_slice(
                before, self._pred[p][key], 1.0 - self._ent[p][key], np.asarray(pseudo.data[key]),
                self.threshold, unpainted=self.unpainted,
            )
        except DataError as exc:
            notifications.show_info(f"Slice {s} not accepted: {exc}")
            self.status_label.setText(f"Slice {s} not accepted: {exc}")
            return False
        labels.data[key] = result.labels
        labels.refresh()
        self._undo.append(_Accepted(labels.name, p, s, key, before, result.added))
        self._corrected.get(p, set()).discard(s)
        text = result.describe(s)
        item = QListWidgetItem(text)
        item.setToolTip(text)
        item.setData(Qt.UserRole, (p, s))
        self.accepted_list.addItem(item)
        self.undo_button.setEnabled(True)
        self.status_label.setText(f"Accepted {text}; it trains as labelled from the next refresh.")
        return True

    @property
    def unpainted(self) -> str:
        """What 0 means on a painted slice for the run being reviewed ('ignore' or 'background')."""
        trainer = self.trainer
        if trainer is not None:
            return trainer.config.data.unpainted
        check = getattr(self.train_widget, "background_check", None)
        return "background" if check is not None and check.isChecked() else "ignore"

    def undo_accept(self) -> bool:
        """Undo the last accept: the labels slice gets back what it held before."""
        if not self._undo:
            return False
        entry = self._undo.pop()
        labels = _layers._find(self.viewer, entry.labels_name, _layers.Labels)
        if labels is not None:
            labels.data[entry.key] = entry.before
            labels.refresh()
        self.accepted_list.takeItem(self.accepted_list.count() - 1)
        self.undo_button.setEnabled(bool(self._undo))
        self.status_label.setText(f"Accept of slice {entry.slice_index} undone.")
        return True

    def draw_samples(self) -> bool:
        """Ask for S aleatoric samples of the current slice (methods with an aleatoric head)."""
        p = self.active_pair_index()
        s = self.current_slice(p)
        if s is None:
            return False
        ok = self.request("aleatoric", pair_index=p, slice_index=s, n_samples=self.samples_spin.value())
        if ok:
            self.status_label.setText(f"Drawing {self.samples_spin.value()} samples of slice {s}...")
        return ok

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        row = QHBoxLayout()
        self.threshold_slider = QSlider(Qt.Horizontal)
        self.threshold_slider.setRange(0, 100)
        self.threshold_slider.setValue(50)
        self.threshold_slider.setToolTip(
            "Minimum certainty (1 - normalised entropy) of a pseudo-label;\n"
            "pixels below it are shown as unknown (0) and are not accepted."
        )
        self.threshold_label = QLabel("0.50")
        self.threshold_slider.valueChanged.connect(self._on_threshold_changed)
        self.threshold_slider.sliderReleased.connect(self._on_threshold_released)
        row.addWidget(self.threshold_slider, 1)
        row.addWidget(self.threshold_label)
        form.addRow("Certainty threshold", row)
        layout.addLayout(form)

        buttons = QHBoxLayout()
        self.accept_button = QPushButton("Accept current slice")
        self.accept_button.setToolTip(
            "Put this slice's pseudo-labels (after your corrections in the pseudo-labels layer) into your\n"
            "labels layer; it trains as labelled from the next refresh. With 'unpainted means background'\n"
            "the whole slice is accepted (uncertain pixels as predicted: check them); otherwise only the\n"
            "pixels above the threshold, where you have not painted."
        )
        self.accept_button.clicked.connect(self._on_accept_clicked)
        self.undo_button = QPushButton("Undo accept")
        self.undo_button.setEnabled(False)
        self.undo_button.clicked.connect(self._on_undo_clicked)
        buttons.addWidget(self.accept_button, 1)
        buttons.addWidget(self.undo_button)
        layout.addLayout(buttons)
        layout.addWidget(QLabel("Accepted slices (click to go there):"))
        self.accepted_list = QListWidget()
        self.accepted_list.setMaximumHeight(120)
        self.accepted_list.itemClicked.connect(self._on_accepted_clicked)
        layout.addWidget(self.accepted_list)

        samples_row = QHBoxLayout()
        self.samples_spin = QSpinBox()
        self.samples_spin.setRange(1, 64)
        self.samples_spin.setValue(8)
        self.samples_button = QPushButton("Draw aleatoric samples of this slice")
        self.samples_button.setToolTip("Methods with an aleatoric head (AUA): S plausible segmentations")
        self.samples_button.clicked.connect(self._on_samples_clicked)
        samples_row.addWidget(self.samples_spin)
        samples_row.addWidget(self.samples_button, 1)
        layout.addLayout(samples_row)
        self.entropy_button = QPushButton("Show entropy")
        self.entropy_button.setToolTip("Show the normalised predictive entropy (0 certain, 1 uniform)")
        self.entropy_button.clicked.connect(self._on_entropy_clicked)
        layout.addWidget(self.entropy_button)
        self.status_label = StatusLabel("Pseudo-labels appear at the Train dock's first refresh.", lines=2)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    # ------------------------------------------------------------------ events
    def on_train_event(self, event) -> None:
        if isinstance(event, Started):
            self._pred.clear()
            self._ent.clear()
        elif isinstance(event, Preview):
            if event.kind == "prediction":
                self._pred[event.pair_index] = event.array
            elif event.kind == "entropy":
                self._ent[event.pair_index] = event.array
                self.refresh_pseudo_labels(event.pair_index)
        elif isinstance(event, Reviewed):
            dis = event.arrays.get("aleatoric_disagreement")
            image = self.run_image(event.pair_index)
            if dis is not None and image is not None:
                _review_layers.show_slice_map(self.viewer, image, dis, event.slice_index, self.axis)
        elif isinstance(event, Analysed) and event.kind == "aleatoric":
            self._show_samples(event)

    def _show_pseudo(self, pair_index: int, generation: int, array: np.ndarray) -> None:
        if generation != self._generation:
            return  # a newer computation is on its way
        image = self.run_image(pair_index)
        if image is None:
            return
        old = self.pseudo_layer(pair_index)
        corrected = self._corrected.get(pair_index, set())
        if old is not None and corrected and old.data.shape == array.shape:
            for s in corrected:  # the user's corrections survive the refresh
                key = slice_index_tuple(array.ndim, self.axis, s)
                array[key] = old.data[key]
        layer = self._pseudo_layer_for(pair_index, image, array)
        names = getattr(self.train_widget, "class_names", {})
        if names:
            _layers.apply_class_names(layer, names)
        known = float(np.count_nonzero(array)) / max(array.size, 1)
        self.status_label.setText(f"Pseudo-labels of '{image.name}': {100 * known:.1f}% of voxels above the threshold.")

    def _pseudo_layer_for(self, pair_index: int, image, array: np.ndarray):
        """Show ``array`` in the pseudo-labels layer of ``image`` (created if needed, then
        listening to the user's corrections)."""
        old = self.pseudo_layer(pair_index)
        layer = _review_layers.show_pseudo_labels(self.viewer, image, array)
        if old is None:
            layer.events.paint.connect(lambda _e, p=pair_index: self._on_pseudo_painted(p))
        return layer

    def on_run_starting(self, trainer) -> None:
        # the empty pseudo-label layers now, not at the first refresh while training runs,
        # with the predictions' dtype so that refreshes write into them in place
        dtype = decoded_dtype(trainer.dataset.class_values)
        # and the method's disagreement map of a reviewed slice, when it has one
        disagreement = "aleatoric_disagreement" in getattr(trainer.method, "review_layers", ())
        for pair_index, (image, _) in enumerate(self.train_widget.run_layers):
            if getattr(image, "multiscale", False):
                continue
            if self.pseudo_layer(pair_index) is None:
                self._pseudo_layer_for(pair_index, image, np.zeros(_layers.spatial_shape(image), dtype))
            if disagreement:
                blank = np.zeros(_layers.slice_shape(image, self.axis), np.float32)
                _review_layers.show_slice_map(self.viewer, image, blank, 0, self.axis)

    def _show_samples(self, event: Analysed) -> None:
        samples = event.arrays.get("aleatoric_samples")
        p, s = event.params.get("pair_index", 0), event.params.get("slice_index", 0)
        image = self.run_image(p)
        if samples is None:
            self.status_label.setText("This method has no aleatoric head: no samples to draw (try AUA).")
            return
        if image is None:
            return
        values = event.arrays.get("class_values")
        shown = decode_classes(samples, list(values)) if values is not None else samples
        _review_layers.show_sample_stack(self.viewer, image, shown, s, self.axis)
        k = len(values) if values is not None else int(samples.max()) + 1
        if k >= 2:
            _review_layers.show_slice_map(self.viewer, image, sample_disagreement(samples, k), s, self.axis)
        self.status_label.setText(f"{len(samples)} aleatoric samples of slice {s} (scroll the first slider).")

    def _on_pseudo_painted(self, pair_index: int) -> None:
        s = self.current_slice(pair_index)
        if s is not None:
            self._corrected.setdefault(pair_index, set()).add(s)
            self.status_label.setText(f"Slice {s} corrected: refreshes keep your edits until you accept it.")

    def _on_threshold_changed(self, value: int) -> None:
        self.threshold_label.setText(f"{value / 100:.2f}")
        if not self.threshold_slider.isSliderDown():
            self.refresh_pseudo_labels()

    def _on_threshold_released(self) -> None:
        self.refresh_pseudo_labels()

    def _on_accept_clicked(self) -> None:
        self.accept_slice()

    def _on_undo_clicked(self) -> None:
        self.undo_accept()

    def _on_samples_clicked(self) -> None:
        self.draw_samples()

    def _on_entropy_clicked(self) -> None:
        image = self.run_image(self.active_pair_index())
        if image is None:
            return
        layer = _layers._find(self.viewer, f"{image.name}{_layers.ENTROPY_SUFFIX}", _layers.Image)
        if layer is not None:
            layer.visible = True

    def _on_accepted_clicked(self, item: QListWidgetItem) -> None:
        p, s = item.data(Qt.UserRole)
        image = self.run_image(p)
        if image is not None:
            go_to(self.viewer, image, s, self.axis)

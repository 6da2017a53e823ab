"""The "Annotate next" dock: slices ranked by how unsure the network is, click to go.

At each refresh of the Train dock the entropy volume of the chosen pair is averaged per
slice (in a worker thread) and ranked (:func:`~napari_semicl.analysis.rank_slices`);
labelled and validation slices are left out. The second score, the teacher/student
disagreement, is asked of the trainer at each refresh when ticked (it costs one more
whole-volume prediction). The scores are explained in the column tooltips.
"""

from __future__ import annotations

import logging

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from ..analysis import SCORE_HELP, Suggestion, rank_slices, slice_means
from ..engine.events import Analysed, Preview, Started
from ._link import ReviewDock, StatusLabel, go_to, start_worker

log = logging.getLogger(__name__)


def _slice_summary(entropy: np.ndarray, labels: np.ndarray | None, axis: int) -> tuple[np.ndarray, set[int]]:
    """(mean entropy per slice, slices with any painted pixel): the worker's part."""
    means = slice_means(entropy, axis)
    painted: set[int] = set()
    if labels is not None and labels.shape == entropy.shape:
        if labels.ndim == 2:
            painted = {0} if np.any(labels) else set()
        else:
            other = tuple(a for a in range(labels.ndim) if a != axis)
            painted = {int(s) for s in np.flatnonzero(np.any(labels != 0, axis=other))}
    return means, painted


class SuggestWidget(ReviewDock):
    """Dock listing the slices to annotate next, most uncertain first.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    train_widget : TrainWidget, optional
    """

    def __init__(self, napari_viewer, train_widget=None) -> None:
        self._entropy_scores: dict[int, np.ndarray] = {}
        self._disagreement: dict[int, np.ndarray] = {}
        self._excluded: dict[int, set[int]] = {}
        self._suggestions: list[Suggestion] = []
        self._step = 0
        super().__init__(napari_viewer, train_widget)
        self._build_ui()

    # ------------------------------------------------------------------ public API
    @property
    def suggestions(self) -> list[Suggestion]:
        """The ranked list shown (most uncertain first)."""
        return list(self._suggestions)

    def update_scores(self, pair_index: int, entropy: np.ndarray, *, wait: bool = False) -> None:
        """Score the slices of one pair from its normalised entropy volume."""
        labels = self.run_labels(pair_index)
        lab = None if labels is None else np.asarray(labels.data)
        args = (entropy, lab, self.axis)
        if wait:
            self._on_scored(pair_index, _slice_summary(*args))
            return
        start_worker(_slice_summary, *args, returned=lambda result, p=pair_index: self._on_scored(p, result))

    def rerank(self) -> list[Suggestion]:
        """Rank the chosen pair's slices again with the current settings."""
        p = self.pair_index()
        ent = self._entropy_scores.get(p)
        if ent is None:
            self._suggestions = []
            self._fill_table()
            return []
        dis = self._disagreement.get(p)
        if dis is not None and dis.shape != ent.shape:
            dis = None
        by = self.order_combo.currentText()
        if by == "disagreement" and dis is None:
            by = "entropy"
        excluded = set(self._excluded.get(p, set()))
        if self.train_widget is not None:
            image = self.run_image(p)
            if image is not None:
                excluded |= set(self.train_widget.validation_slices(image))
        self._suggestions = rank_slices(ent, disagreement_scores=dis, exclude=excluded, by=by,
                                        top=self.top_spin.value())
        self._fill_table()
        return self.suggestions

    def go_to_suggestion(self, row: int) -> None:
        """Move the viewer to the slice of row ``row`` of the list."""
        if not 0 <= row < len(self._suggestions):
            return
        image = self.run_image(self.pair_index())
        if image is not None:
            go_to(self.viewer, image, self._suggestions[row].slice_index, self.axis)

    def pair_index(self) -> int:
        return max(self.pair_combo.currentIndex(), 0)

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.pair_combo = QComboBox()
        self.pair_combo.currentIndexChanged.connect(self._on_settings_changed)
        form.addRow("Image", self.pair_combo)
        self.order_combo = QComboBox()
        self.order_combo.addItems(["entropy", "disagreement"])
        for i, key in enumerate(("entropy", "disagreement")):
            self.order_combo.setItemData(i, SCORE_HELP[key], Qt.ToolTipRole)
        self.order_combo.currentIndexChanged.connect(self._on_settings_changed)
        form.addRow("Order by", self.order_combo)
        self.top_spin = QSpinBox()
        self.top_spin.setRange(1, 10_000)
        self.top_spin.setValue(20)
        self.top_spin.valueChanged.connect(self._on_settings_changed)
        form.addRow("Show", self.top_spin)
        self.disagreement_check = QCheckBox("teacher/student disagreement at each refresh")
        self.disagreement_check.setToolTip(SCORE_HELP["disagreement"] + "\nCosts one more prediction of the volume per refresh.")
        form.addRow("", self.disagreement_check)
        layout.addLayout(form)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["Slice", "Entropy", "Disagreement"])
        for col, key in ((1, "entropy"), (2, "disagreement")):
            self.table.horizontalHeaderItem(col).setToolTip(SCORE_HELP[key])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.cellClicked.connect(self._on_cell_clicked)
        layout.addWidget(self.table, 1)
        self.status_label = StatusLabel("Suggestions appear at the Train dock's first refresh.", lines=2)
        layout.addWidget(self.status_label)

    def _fill_table(self) -> None:
        self.table.setRowCount(len(self._suggestions))
        for i, sug in enumerate(self._suggestions):
            cells = [str(sug.slice_index), f"{sug.entropy:.3f}",
                     "" if sug.disagreement is None else f"{sug.disagreement:.3f}"]
            for col, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if col:
                    item.setToolTip(SCORE_HELP["entropy" if col == 1 else "disagreement"])
                self.table.setItem(i, col, item)

    # ------------------------------------------------------------------ events
    def on_train_event(self, event) -> None:
        if isinstance(event, Started):
            self._entropy_scores.clear()
            self._disagreement.clear()
            self._fill_pairs()
        elif isinstance(event, Preview) and event.kind == "entropy":
            self._step = event.step
            if self.pair_combo.count() == 0:
                self._fill_pairs()
            if event.pair_index == self.pair_index():
                self.update_scores(event.pair_index, event.array)
                if self.disagreement_check.isChecked():
                    self.request("disagreement", pair_index=event.pair_index)
        elif isinstance(event, Analysed) and event.kind == "disagreement":
            dis = event.arrays.get("disagreement")
            if dis is None:
                self.status_label.setText("This method has no teacher: no disagreement score.")
                return
            self._disagreement[int(event.params.get("pair_index", 0))] = dis
            self.rerank()

    def _fill_pairs(self) -> None:
        if self.train_widget is None:
            return
        current = self.pair_combo.currentIndex()
        self.pair_combo.blockSignals(True)
        self.pair_combo.clear()
        self.pair_combo.addItems([image.name for image, _ in self.train_widget.run_layers])
        self.pair_combo.setCurrentIndex(max(min(current, self.pair_combo.count() - 1), 0))
        self.pair_combo.blockSignals(False)

    def _on_scored(self, pair_index: int, result) -> None:
        means, painted = result
        self._entropy_scores[pair_index] = means
        self._excluded[pair_index] = painted
        ranked = self.rerank()
        if ranked:
            self.status_label.setText(
                f"Step {self._step}: {len(means) - len(painted)} unlabelled slices scored; "
                f"most uncertain: slice {ranked[0].slice_index} (entropy {ranked[0].entropy:.3f})."
            )

    def _on_settings_changed(self, *_args) -> None:
        self.rerank()

    def _on_cell_clicked(self, row: int, _col: int) -> None:
        self.go_to_suggestion(row)

"""The Train dock's "Image / labels pairs" box: which layers to train on.

A view of the viewer's layer list: one row (image combo, labels combo, 'New labels layer
for image', remove) per pair. Layers are looked up by name at every use: napari hands a
plugin dock a proxy viewer whose layers are new objects at each access.
"""

from __future__ import annotations

import functools

from napari.layers import Image, Labels
from napari.utils import notifications
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QPushButton, QVBoxLayout, QWidget

from ...errors import SemiclError
from .. import _layers

NO_LABELS = "(none: unlabelled image)"


class PairRow(QWidget):
    """One image/labels pair: two combos, 'New labels layer for image' and remove."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image_combo = QComboBox()
        self.labels_combo = QComboBox()
        self.new_labels_button = QPushButton("New labels layer for image")
        self.new_labels_button.setToolTip(
            "Add an empty Labels layer with this image's shape, scale and metadata"
        )
        self.remove_button = QPushButton("remove")
        self.remove_button.setToolTip("Remove this pair")
        self.none_chosen = False  # the user picked 'no labels' on purpose
        for combo in (self.image_combo, self.labels_combo):  # long layer names elided
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.labels_combo.activated.connect(self._on_labels_activated)
        grid = QFormLayout(self)
        grid.setContentsMargins(0, 2, 0, 2)
        top = QHBoxLayout()
        top.addWidget(self.image_combo, 1)
        top.addWidget(self.remove_button)
        grid.addRow("Image", top)
        grid.addRow("Labels", self.labels_combo)
        grid.addRow("", self.new_labels_button)

    def _on_labels_activated(self, _index: int) -> None:
        self.none_chosen = self.labels_combo.currentText() == NO_LABELS


class PairsView(QGroupBox):
    """The pair rows of the Train dock.

    Parameters
    ----------
    viewer : napari.viewer.Viewer
        Whose layers are offered (the dock calls :meth:`refill` when they change).

    Signals
    -------
    images_changed()
        A row's image changed, or rows were refilled (the form offers 3D patches for volumes).
    pairs_changed()
        The user changed the pairs: added or removed a row, picked another image or labels
        layer, or made a labels layer for a row (a running trainer gets them at once).
    """

    images_changed = Signal()
    pairs_changed = Signal()

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__("Image / labels pairs", parent)
        self.viewer = viewer
        self.rows: list[PairRow] = []
        outer = QVBoxLayout(self)
        self._rows_layout = QVBoxLayout()
        outer.addLayout(self._rows_layout)
        self.add_pair_button = QPushButton("+ pair")
        self.add_pair_button.setToolTip("Train on several images at once")
        self.add_pair_button.clicked.connect(self._on_add_pair_clicked)
        outer.addWidget(self.add_pair_button)

    # --- public ----------------------------------------------------------------------------
    def add_pair(self) -> PairRow:
        """Add a pair row, defaulting to the first image (and labels) not yet chosen."""
        row = PairRow(self)
        row.remove_button.clicked.connect(functools.partial(self._on_remove_pair_clicked, row))
        row.new_labels_button.clicked.connect(functools.partial(self._on_new_labels_clicked, row))
        row.image_combo.currentTextChanged.connect(functools.partial(self._on_image_changed, row))
        row.labels_combo.activated.connect(self._on_labels_picked)
        self.rows.append(row)
        self._rows_layout.addWidget(row)
        taken = {r.image_combo.currentText() for r in self.rows[:-1]}
        self._fill_row(row, prefer_image=next(
            (im.name for im in _layers.input_images(self.viewer.layers) if im.name not in taken), None
        ))
        self.enable_remove(True)
        return row

    def pairs(self) -> list[tuple[Image, Labels | None]]:
        """The chosen (image layer, labels layer or None) pairs; rows without an image skipped."""
        out = []
        for row in self.rows:
            image = self.layer(row.image_combo.currentText(), Image)
            if image is None:
                continue
            out.append((image, self.layer(row.labels_combo.currentText(), Labels)))
        return out

    def set_pair(self, index: int, image: Image, labels: Labels | None) -> None:
        """Choose the layers of pair row ``index`` (adds rows as needed)."""
        while len(self.rows) <= index:
            self.add_pair()
        row = self.rows[index]
        row.image_combo.setCurrentText(image.name)
        self._fill_labels_combo(row, prefer=labels.name if labels is not None else NO_LABELS)

    def new_labels_layer(self, image: Image) -> Labels:
        """Add an empty Labels layer matching ``image`` (shape, scale, metadata)."""
        layer = _layers.new_labels_layer(self.viewer, image)
        layer.mode = "paint"
        return layer

    def active_pair(self):
        """The chosen pair whose image or labels is the active layer, else the first (None
        when no pair is chosen)."""
        pairs = self.pairs()
        if not pairs:
            return None
        active = self.viewer.layers.selection.active
        for image, labels in pairs:
            if _layers.same_layer(active, image) or _layers.same_layer(active, labels):
                return image, labels
        return pairs[0]

    def layer(self, name: str, kind: type):
        """The layer called ``name`` if it is a ``kind``, else None."""
        if name and name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if isinstance(layer, kind):
                return layer
        return None

    def refill(self) -> None:
        """Offer the viewer's layers again (layers added, removed, moved or renamed)."""
        for row in self.rows:
            self._fill_row(row)
        self.images_changed.emit()

    def enable_remove(self, enabled: bool) -> None:
        """'remove' is offered while there are two rows or more (and ``enabled``)."""
        for row in self.rows:
            row.remove_button.setEnabled(enabled and len(self.rows) > 1)

    # --- filling the combos ----------------------------------------------------------------
    def _fill_row(self, row: PairRow, prefer_image: str | None = None) -> None:
        images = [im.name for im in _layers.input_images(self.viewer.layers)]
        current = row.image_combo.currentText()
        keep = current if current in images else (prefer_image if prefer_image in images else None)
        row.image_combo.blockSignals(True)
        row.image_combo.clear()
        row.image_combo.addItems(images)
        if keep is None and images:
            keep = images[0]
        if keep is not None:
            row.image_combo.setCurrentText(keep)
        row.image_combo.blockSignals(False)
        self._fill_labels_combo(row)

    def _fill_labels_combo(self, row: PairRow, prefer: str | None = None) -> None:
        """Labels layers of the row image's shape; keeps the choice, else a default."""
        image = self.layer(row.image_combo.currentText(), Image)
        names = []
        if image is not None:
            shape = _layers.spatial_shape(image)
            names = [
                lab.name for lab in _layers.input_labels(self.viewer.layers)
                if tuple(lab.data.shape) == shape
            ]
        current = prefer or row.labels_combo.currentText()
        if prefer is not None:
            row.none_chosen = prefer == NO_LABELS
        if current not in names and not (current == NO_LABELS and row.none_chosen):
            # the default: the active labels layer, else the first free one; never a reference
            # mask ('*_gt', '* reference'), which is for evaluation (choose it by hand if wanted)
            references = {lab.name for lab in _layers.input_labels(self.viewer.layers)
                          if _layers.looks_like_reference(lab)}
            active = self.viewer.layers.selection.active
            taken = {r.labels_combo.currentText() for r in self.rows if r is not row}
            if active is not None and active.name in names and active.name not in references:
                current = active.name
            else:
                current = next((n for n in names if n not in taken and n not in references), NO_LABELS)
        row.labels_combo.blockSignals(True)
        row.labels_combo.clear()
        row.labels_combo.addItems([*names, NO_LABELS])
        row.labels_combo.setCurrentText(current)
        row.labels_combo.blockSignals(False)

    # --- handlers --------------------------------------------------------------------------
    def _on_image_changed(self, row: PairRow, _text: str = "") -> None:
        self._fill_labels_combo(row)
        self.images_changed.emit()
        self.pairs_changed.emit()

    def _on_labels_picked(self, _index: int) -> None:
        self.pairs_changed.emit()

    def _on_add_pair_clicked(self) -> None:
        self.add_pair()
        self.pairs_changed.emit()

    def _on_remove_pair_clicked(self, row: PairRow) -> None:
        if len(self.rows) <= 1:
            return
        self.rows.remove(row)
        row.setParent(None)
        row.deleteLater()
        self.enable_remove(True)
        self.pairs_changed.emit()

    def _on_new_labels_clicked(self, row: PairRow) -> None:
        image = self.layer(row.image_combo.currentText(), Image)
        if image is None:
            notifications.show_warning("Open an image first (File > Open, or File > Open Sample).")
            return
        try:
            layer = self.new_labels_layer(image)
        except SemiclError as exc:
            notifications.show_error(str(exc))
            return
        self._fill_labels_combo(row, prefer=layer.name)
        self.pairs_changed.emit()

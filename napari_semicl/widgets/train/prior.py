"""The Train dock's painted-slice prior controls: "Fill between slices", the prior setting
and the 2.5D context.

* **Fill between slices** interpolates the shape between the fully painted slices
  (:func:`napari_semicl.data.interpolation.interpolate_labels`, in a worker thread) and
  shows it at once in the image's prediction layer, before any training. Scribbles (partly
  painted slices without 'unpainted means background') have no interpolation: the message
  says so.
* **Learn from the shape between painted slices** sets ``prior.mode`` ('targets' or 'off'):
  training starts from that shape and the mask falls back on it where the network is unsure
  (:mod:`napari_semicl.engine.prior`).
* **Context slices** sets ``data.context_slices`` (2.5D input).
* **Network** chooses 2D slices or 3D patches (``model.spatial_dims``, volumes only) and
  **Patch depth** the 3D patch's extent along the slicing axis (``data.patch_depth``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
from napari.utils import notifications
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QHBoxLayout, QPushButton, QSpinBox, QWidget

from ...data.interpolation import interpolate_labels
from ...engine.prior import INTERPOLATION_CHOICES
from ...errors import SemiclError
from .._worker import start_worker

log = logging.getLogger(__name__)

SLICES = "2D slices"
#: the Network choices of the Advanced section -> ``model.spatial_dims``
NETWORKS = {SLICES: 2, "3D patches": 3}


def fill_pairs(pairs, *, axis: int, unpainted: str, method: str) -> list:
    """Interpolate every annotated 3D pair (snapshots); returns [(pair index, labels or
    None, message)]. Runs in a worker thread: numpy only."""
    out = []
    for i, pair in enumerate(pairs):
        if pair.labels is None or len(pair.spatial_shape) != 3:
            out.append((i, None, f"'{pair.name}': nothing to fill (a volume with painted slices is needed)"))
            continue
        t0 = time.perf_counter()
        try:
            image = None if pair.rgb or method != "flow" else np.asarray(pair.image, np.float32)
            interp = interpolate_labels(pair.labels, axis=axis, spacing=pair.spacing, method=method, image=image,
                                        unpainted=unpainted)
        except SemiclError as exc:
            out.append((i, None, f"'{pair.name}': {exc}"))
            continue
        seconds = time.perf_counter() - t0
        n = pair.labels.shape[axis] - len(interp.painted)
        out.append((i, interp.labels, f"'{pair.name}': {n} slices filled between {len(interp.painted)} painted "
                                      f"slices in {seconds:.1f} s ({method}; prediction layer)"))
    return out


class PriorControls(QWidget):
    """The prior's rows of the Train dock (see the module doc).

    Parameters
    ----------
    prepare : callable
        ``prepare() -> (cfg, snapshots, image names)``: the dock's config and snapshots of the
        chosen pairs; raises SemiclError or ValueError when there is nothing to fill.
    show : callable
        ``show(image name, labels)``: puts a filled volume into that image's prediction layer.
    status : callable
        ``status(text)``: the dock's status line.
    """

    def __init__(self, *, prepare: Callable, show: Callable, status: Callable, parent=None) -> None:
        super().__init__(parent)
        self._prepare, self._show_labels, self._status = prepare, show, status
        self.busy = False
        self._request = 0  # the newest fill; its stages: signed distance, then optical flow
        self._shown_stage: dict[int, int] = {}
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.prior_check = QCheckBox("Learn from the filled shape")
        self.prior_check.setChecked(True)
        self.prior_check.setToolTip(
            "Fully painted slices: train on the shape interpolated between them (dense early, your slices\n"
            "later) and fall back on that shape where the network is unsure. Measured better than training\n"
            "without it (docs/prior.md). Scribbles have no interpolation and train without it."
        )
        self.fill_button = QPushButton("Fill between slices")
        self.fill_button.setToolTip(
            "Interpolate the shape between the fully painted slices now (as 3D Slicer's and ITK-SNAP's\n"
            "'fill between slices') into the prediction layer; training then refines it."
        )
        self.fill_button.clicked.connect(self._on_fill_clicked)
        self.fill_button.setMinimumWidth(0)
        row.addWidget(self.fill_button)
        row.addStretch(1)
        form.addRow(self.prior_check)
        form.addRow(row)
        # the interpolation and 2.5D settings: rows the Train dock puts in its Advanced section
        self.interpolation_combo = QComboBox()
        self.interpolation_combo.addItems(list(INTERPOLATION_CHOICES))
        self.interpolation_combo.setToolTip(
            "sdf: blend of the painted slices' signed distance maps; flow: the same after registering\n"
            "the image slices by optical flow (slower)"
        )
        self.context_spin = QSpinBox()
        self.context_spin.setRange(0, 8)
        self.context_spin.setToolTip(
            "2.5D: neighbouring slices on either side the network sees as extra channels (0 = 2D slices)"
        )
        self.network_combo = QComboBox()
        self.network_combo.addItems(list(NETWORKS))
        self.network_combo.setToolTip(
            "Volumes: a 2D network on slices (fast on a CPU), or a 3D network on volume patches\n"
            "(MONAI's BasicUNet, predicted by a 3D sliding window; much slower per step on a CPU, see\n"
            "docs/methods/three_d.md). 2D images always train on slices."
        )
        self.network_combo.currentTextChanged.connect(self._on_network_changed)
        self.depth_spin = QSpinBox()
        self.depth_spin.setRange(0, 512)
        self.depth_spin.setSingleStep(16)
        self.depth_spin.setSpecialValueText("= patch size")
        self.depth_spin.setToolTip("3D patches: extent along the slicing axis, a multiple of 16 (0: the patch size)")
        self._on_network_changed(self.network_combo.currentText())

    def advanced_rows(self) -> list[tuple[str, QWidget]]:
        """(label, widget) rows for the Train dock's Advanced section."""
        return [("Fill by", self.interpolation_combo), ("Context slices", self.context_spin),
                ("Network", self.network_combo), ("Patch depth (3D)", self.depth_spin)]

    def set_volumes(self, volumes: bool) -> None:
        """Offer 3D patches only when the chosen images are volumes (2D images: slices)."""
        if not volumes:
            self.network_combo.setCurrentText(SLICES)
        self.network_combo.setEnabled(volumes)

    def _on_network_changed(self, text: str) -> None:
        three_d = NETWORKS.get(text) == 3
        self.depth_spin.setEnabled(three_d)
        self.context_spin.setEnabled(not three_d)  # a 3D network sees its neighbours itself

    # --- config -------------------------------------------------------------------------
    def apply(self, cfg) -> None:
        """Write the controls into a TrainConfig."""
        cfg.prior.mode = "targets" if self.prior_check.isChecked() else "off"
        cfg.prior.interpolation = self.interpolation_combo.currentText()
        cfg.model.spatial_dims = NETWORKS[self.network_combo.currentText()]
        cfg.data.context_slices = self.context_spin.value() if cfg.model.spatial_dims == 2 else 0
        cfg.data.patch_depth = self.depth_spin.value() if cfg.model.spatial_dims == 3 else 0

    # --- fill ---------------------------------------------------------------------------
    def fill_between_slices(self, *, wait: bool = False) -> bool:
        """Interpolate the chosen pairs into their prediction layers (in a worker unless
        ``wait``). Returns False, with a notification, when there is nothing to fill."""
        try:
            cfg, pairs, images = self._prepare()  # images by name: the dock may hold layer proxies
        except (SemiclError, ValueError) as exc:
            notifications.show_warning(f"Cannot fill between slices: {exc}")
            return False
        kwargs = {"axis": cfg.data.axis, "unpainted": cfg.data.unpainted}
        method = cfg.prior.interpolation
        # the signed-distance fill first (well under a second), then the image-aware one
        # replaces it when it is done (seconds on a CPU)
        stages = ["sdf"] if method == "sdf" else ["sdf", method]
        self._request += 1
        if wait:
            for stage, name in enumerate(stages):
                self._show(images, self._request, stage, len(stages), fill_pairs(pairs, method=name, **kwargs))
            return True
        self.busy = True
        self.fill_button.setEnabled(False)
        for stage, name in enumerate(stages):
            start_worker(fill_pairs, pairs, method=name, errored=self._on_error,
                         returned=lambda out, r=self._request, st=stage: self._show(images, r, st, len(stages), out),
                         **kwargs)
        return True

    def _show(self, images, request: int, stage: int, n_stages: int, results) -> None:
        if request != self._request or stage < self._shown_stage.get(request, -1):
            return  # a newer fill, or the better stage already shown
        self._shown_stage[request] = stage
        last = stage == n_stages - 1
        if last:
            self.busy = False
            self.fill_button.setEnabled(True)
        messages = []
        for i, labels, message in results:
            messages.append(message)
            if labels is not None and i < len(images):
                self._show_labels(images[i], labels)
        text = "; ".join(messages)
        if not last:
            text += " (refining it by optical flow between the image slices...)"
        log.info("fill between slices: %s", text)
        if last:
            if any(labels is not None for _, labels, _ in results):
                notifications.show_info(f"Filled between slices: {text}")
            else:
                notifications.show_warning(f"Nothing filled: {text}")
        self._status(text)

    def _on_error(self, exc: Exception) -> None:
        self.busy = False
        self.fill_button.setEnabled(True)
        log.warning("fill between slices failed", exc_info=(type(exc), exc, exc.__traceback__))
        notifications.show_error(f"Fill between slices failed: {exc}")

    def _on_fill_clicked(self) -> None:
        self.fill_between_slices()

"""Smoke test: napari's viewer fixture works here (display + OpenGL, e.g. under Xvfb)."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_viewer_shows_an_image(make_napari_viewer):
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((4, 16, 16), dtype=np.float32), name="volume")
    assert len(viewer.layers) == 1
    assert viewer.layers["volume"] is layer
    assert viewer.dims.ndim == 3

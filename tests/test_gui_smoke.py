"""Smoke test of the plugin the way users meet it in napari: the sample through
File > Open Sample (the plugin's sample entry) and every dock through Plugins > napari-semicl
(``viewer.window.add_plugin_dock_widget``), with the names read from the plugin's manifest
(napari_semicl/napari.yaml). Needs a display with OpenGL (e.g. under Xvfb)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import napari_semicl

pytestmark = pytest.mark.gui

MANIFEST = Path(napari_semicl.__file__).parent / "napari.yaml"


@pytest.fixture(scope="module")
def manifest():
    npe2 = pytest.importorskip("npe2")
    return npe2.PluginManifest.from_file(MANIFEST)


def _open_sample(viewer, manifest):
    (sample,) = manifest.contributions.sample_data
    viewer.open_sample(manifest.name, sample.key)
    return sample


def test_the_sample_opens_through_the_plugin(make_napari_viewer, manifest):
    from napari.layers import Image, Labels

    viewer = make_napari_viewer()
    _open_sample(viewer, manifest)
    assert [type(layer) for layer in viewer.layers] == [Image, Labels]
    image, labels = viewer.layers
    assert labels.name == f"{image.name} reference"
    assert image.data.ndim == 3 and labels.data.shape == image.data.shape
    assert set(np.unique(labels.data)) <= {0, 1, 2, 3} and labels.data.max() > 0
    assert np.allclose(labels.scale, image.scale)


def test_every_dock_opens_through_the_plugin_menu(make_napari_viewer, manifest):
    viewer = make_napari_viewer()
    _open_sample(viewer, manifest)
    image_name = viewer.layers[0].name
    classes = {command.id: command.python_name.rsplit(":", 1)[1] for command in manifest.contributions.commands}
    widgets = {}
    for contribution in manifest.contributions.widgets:
        dock, widget = viewer.window.add_plugin_dock_widget(manifest.name, contribution.display_name)
        assert type(widget).__name__ == classes[contribution.command], contribution.display_name
        assert dock.widget() is not None
        widgets[type(widget).__name__] = widget
    assert len(widgets) == len(manifest.contributions.widgets) >= 6

    # The Train dock (holding a proxy viewer, not the viewer) sees the sample image.
    pairs = widgets["TrainWidget"].pairs()
    assert pairs and pairs[0][0].name == image_name

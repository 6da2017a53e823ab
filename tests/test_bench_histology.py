"""``bench histology``: tiles found by name, labelled/scored split, rows with CPU seconds.

The tiles are cut from scikit-image's bundled immunohistochemistry image
(``skimage.data.immunohistochemistry``: "No known copyright restrictions"); their masks are the
haematoxylin channel above its median (scikit-image's colour deconvolution), a stand-in for nuclei
that colour features separate, so the forest must score well on the unlabelled tiles.
"""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from skimage.color import rgb2hed
from skimage.data import immunohistochemistry

from napari_semicl.bench.histology import find_tiles, monuseg
from napari_semicl.errors import DataError

CELL = 96


@pytest.fixture
def tile_folder(tmp_path):
    img = immunohistochemistry()
    for i in range(3):
        tile = np.ascontiguousarray(img[:CELL, i * CELL:(i + 1) * CELL])
        haem = rgb2hed(tile)[..., 0]
        iio.imwrite(tmp_path / f"tile{i}.png", tile)
        iio.imwrite(tmp_path / f"tile{i}_gt.png", (haem > np.median(haem)).astype(np.uint8))
    (tmp_path / "orphan.png").write_bytes((tmp_path / "tile0.png").read_bytes())  # no mask: skipped
    return tmp_path


def test_find_tiles_pairs_images_with_masks_sorted(tile_folder, tmp_path_factory):
    cases = find_tiles(tile_folder)
    assert [c.name for c in cases] == ["tile0", "tile1", "tile2"]
    assert cases[0].image.data.shape[-1] == 3
    with pytest.raises(DataError, match="no NAME.png"):
        find_tiles(tmp_path_factory.mktemp("empty"))


def test_monuseg_scores_the_unlabelled_tiles_with_cpu_seconds(tile_folder, tmp_path):
    out = tmp_path / "r.json"
    data = monuseg(tile_folder, labelled=1, methods=["rf", "supervised"], budget_steps=2, out=out,
                   device=torch.device("cpu"), patch_size=32)
    assert data["labelled_tiles"] == ["tile0"] and data["scored_tiles"] == ["tile1", "tile2"]
    rf, sup = data["methods"]["rf"], data["methods"]["supervised"]
    assert [r["name"] for r in rf["per_volume"]] == ["tile1", "tile2"]
    assert rf["dice"] > 0.6  # the mask is a colour threshold: the forest learns it
    assert all(r["steps"] == 2 and r["train_cpu_s"] > 0 and r["cpu_s"] >= r["train_cpu_s"]
               for r in sup["per_volume"])
    assert out.exists()
    with pytest.raises(DataError, match="labelled must be"):
        monuseg(tile_folder, labelled=3, methods=["rf"], budget_steps=1, out=tmp_path / "x.json")

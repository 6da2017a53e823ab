"""``bench histology``: tiles found by name, labelled/scored split, rows with CPU seconds.

The tiles are cut from scikit-image's bundled immunohistochemistry image
(``skimage.data.immunohistochemistry``: "No known copyright restrictions"); their masks are the
haematoxylin channel above its median (scikit-image's colour deconvolution), a stand-in for nuclei
that colour features separate, so the forest must score well on the unlabelled tiles.
"""

from __future__ import annotations

import json

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
    assert all(r["steps"] == 2 and r["train_cpu_s"] > 0 and 0 <= r["recall"] <= 1 and r["cpu_s"] >= r["train_cpu_s"]
               for r in sup["per_volume"])
    assert out.exists()
    with pytest.raises(DataError, match="labelled must be"):
        monuseg(tile_folder, labelled=3, methods=["rf"], budget_steps=1, out=tmp_path / "x.json")


def test_monuseg_cpu_budget_calibrates_steps_and_stops_at_the_budget(tile_folder, tmp_path, monkeypatch):
    import napari_semicl.bench.histology as histology

    # the probe measures the CPU-seconds per step; the run gets the steps that fill the budget
    data = monuseg(tile_folder, labelled=1, methods=["supervised"], budget_cpu_s=0.5, out=tmp_path / "c.json",
                   device=torch.device("cpu"), patch_size=32)
    assert data["budget_cpu_s"] == 0.5 and data["budget_steps"] is None
    row = data["methods"]["supervised"]["per_volume"][0]
    assert row["planned_steps"] == max(1, int(0.5 / row["probe_cpu_s_per_step"]))
    assert 1 <= row["steps"] <= row["planned_steps"]
    # a probe that under-estimates the cost: the run stops once the budget is spent, not at its steps
    monkeypatch.setattr(histology, "calibrate_steps", lambda *a, **k: (10_000, 1e-4))
    data = monuseg(tile_folder, labelled=1, methods=["supervised"], budget_cpu_s=0.3, out=tmp_path / "d.json",
                   device=torch.device("cpu"), patch_size=32)
    row = data["methods"]["supervised"]["per_volume"][0]
    assert row["planned_steps"] == 10_000 and row["steps"] < 10_000
    with pytest.raises(DataError, match="one budget"):
        monuseg(tile_folder, labelled=1, methods=["rf"], out=tmp_path / "x.json")
    with pytest.raises(DataError, match="one budget"):
        monuseg(tile_folder, labelled=1, methods=["rf"], budget_steps=2, budget_cpu_s=1.0, out=tmp_path / "x.json")


def test_cli_histology_takes_a_cpu_second_budget(tile_folder, tmp_path):
    from napari_semicl.cli import main

    out = tmp_path / "cli.json"
    assert main(["bench", "histology", "--data", str(tile_folder), "--labelled", "1", "--methods", "supervised",
                 "--budget-cpu-s", "0.5", "--patch-size", "32", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["budget_cpu_s"] == 0.5


def test_monuseg_scores_each_network_with_and_without_adapt_batch_norm(tile_folder, tmp_path):
    """``adapt_batch_norm='both'``: one training, its tiles predicted both ways (paired rows);
    'on' alone gives the same adapted rows (the same seeded training)."""
    from napari_semicl.cli import main

    out = tmp_path / "both.json"
    assert main(["bench", "histology", "--data", str(tile_folder), "--labelled", "1", "--methods", "supervised",
                 "--budget-steps", "2", "--patch-size", "32", "--device", "cpu", "--adapt-batch-norm", "both",
                 "--out", str(out)]) == 0
    both = json.loads(out.read_text())
    plain, adapted = both["methods"]["supervised"]["per_volume"], both["methods"]["supervised +adabn"]["per_volume"]
    assert both["adapt_batch_norm"] == "both"
    assert [r["adapt_batch_norm"] for r in plain + adapted] == [False] * 2 + [True] * 2
    assert [r["name"] for r in adapted] == [r["name"] for r in plain] == ["tile1", "tile2"]
    assert all(a["train_cpu_s"] == p["train_cpu_s"] and a["steps"] == p["steps"] == 2 for a, p in zip(adapted, plain))
    on = monuseg(tile_folder, labelled=1, methods=["supervised"], budget_steps=2, out=tmp_path / "on.json",
                 device=torch.device("cpu"), patch_size=32, adapt_batch_norm="on")
    assert [r["dice"] for r in on["methods"]["supervised"]["per_volume"]] == [r["dice"] for r in adapted]
    with pytest.raises(DataError, match="adapt_batch_norm"):
        monuseg(tile_folder, labelled=1, methods=["rf"], budget_steps=2, out=tmp_path / "x.json",
                adapt_batch_norm="yes")


def test_nuclei_counts_separates_misses_from_false_alarms():
    from napari_semicl.bench.histology import nuclei_counts

    ref = np.zeros((4, 4), np.uint8)
    ref[:2] = 1                              # 8 nuclei pixels
    pred = np.zeros_like(ref)
    pred[:1] = 1                             # 4 of them found, no false alarm
    pred[3, :2] = 1                          # 2 false alarms
    c = nuclei_counts(pred, ref)
    assert c["recall"] == 0.5 and c["precision"] == 4 / 6
    assert c["fg_ref"] == 0.5 and c["fg_pred"] == 6 / 16

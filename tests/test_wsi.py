"""Whole-slide images: pyramids, tissue grid, tile dataset, stitched inference, CLI.

The slides are written at test time with tifffile from real H&E tiles: MoNuSeg tiles from
../shared/data/monuseg when present, otherwise scikit-image's bundled immunohistochemistry
image (``skimage.data.immunohistochemistry``: "No known copyright restrictions"), cut into
tiles. Nothing here is synthetic noise.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from napari_semicl.bench.slides import GLASS_RGB, Mosaic, write_mosaic_slide
from napari_semicl.data.annotation import IGNORE_INDEX
from napari_semicl.data.augment import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    hed_jitter,
    strong_augment,
)
from napari_semicl.data.tiles import (
    TileDataset,
    TileGrid,
    WSIConfig,
    make_dataset,
    saturation,
    snapshot_slide,
    tissue_mask,
    tissue_tiles,
)
from napari_semicl.engine import TrainConfig, Trainer
from napari_semicl.engine.config import DataConfig
from napari_semicl.engine.events import Preview
from napari_semicl.engine.slide_inference import predict_level, predict_slide
from napari_semicl.errors import ConfigError, DataError
from napari_semicl.io.wsi import is_slide, open_slide, read_tile_folder, write_pyramid

CELL = 256


def _he_tiles(n: int = 4) -> list[np.ndarray]:
    """``n`` real RGB histology tiles of CELL x CELL (uint8)."""
    folder = SHARED_DATA / "monuseg" / "train"
    if folder.is_dir():
        import imageio.v3 as iio

        files = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_gt"))[:n]
        return [np.ascontiguousarray(iio.imread(p)[:CELL, :CELL, :3]) for p in files]
    from skimage.data import immunohistochemistry

    img = immunohistochemistry()
    return [np.ascontiguousarray(img[(i // 2) * CELL:(i // 2 + 1) * CELL, (i % 2) * CELL:(i % 2 + 1) * CELL])
            for i in range(n)]


@pytest.fixture(scope="module")
def tiles():
    return _he_tiles()


@pytest.fixture(scope="module")
def layout():
    # 3 x 4 cells; glass (-1) in the corners and one cell in the middle
    return np.array([[-1, 0, 1, -1], [2, 3, -1, 0], [-1, 1, 2, -1]])


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory, tiles, layout):
    path = tmp_path_factory.mktemp("slide") / "slide.ome.tif"
    write_mosaic_slide(path, tiles, layout, tile=128, min_size=512)
    return path


def _painted(shape, cells, tiles_dark=True):
    """Labels painting two classes in ``cells`` ((row, col) of CELL-sized cells): a square
    scribble of class 1 and one of class 2 per cell (a user's scribbles)."""
    lab = np.zeros(shape, np.uint8)
    for r, c in cells:
        y, x = r * CELL, c * CELL
        lab[y + 20:y + 60, x + 20:x + 60] = 1
        lab[y + 150:y + 200, x + 150:x + 200] = 2
    return lab


# --------------------------------------------------------------------------- io


def test_pyramidal_tiff_opens_lazily_as_rgb_multiscale(slide_path, tiles, layout):
    assert is_slide(slide_path)
    with open_slide(slide_path) as slide:
        assert slide.rgb
        assert slide.shape == (3 * CELL, 4 * CELL)
        assert [tuple(lv.shape) for lv in slide.levels] == [(768, 1024, 3), (384, 512, 3)]
        # not numpy: the level is read chunk by chunk
        assert not isinstance(slide.levels[0], np.ndarray)
        np.testing.assert_array_equal(slide.levels[0][:CELL, CELL:2 * CELL], tiles[0])
        np.testing.assert_array_equal(slide.levels[0][5, 3], np.array(GLASS_RGB, np.uint8))
        assert slide.metadata["downsamples"] == [1.0, 2.0]
        np.testing.assert_array_equal(slide.levels[1][:, :], Mosaic(tiles, layout).at_level(1)[:, :])


def test_write_pyramid_levels_and_formats(tmp_path, tiles):
    base = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)  # 512 x 512 x 3
    levels = [base, base[::2, ::2], base[::4, ::4]]
    for name in ("he.ome.tif", "he.zarr"):
        path = write_pyramid(tmp_path / name, levels, rgb=True, tile=128, labels=False)
        assert is_slide(path)
        with open_slide(path) as slide:
            assert len(slide.levels) == 3
            assert slide.downsamples == [1.0, 2.0, 4.0]
            for got, want in zip(slide.levels, levels):
                np.testing.assert_array_equal(np.asarray(got[:, :]), want)
    with pytest.raises(Exception, match="exists"):
        write_pyramid(tmp_path / "he.zarr", levels, rgb=True, tile=128)
    with pytest.raises(Exception, match=r"\.ome\.tif"):
        write_pyramid(tmp_path / "he.png", levels, rgb=True, tile=128)
    zattrs = json.loads((tmp_path / "he.zarr" / ".zattrs").read_text())
    scales = [d["coordinateTransformations"][0]["scale"] for d in zattrs["multiscales"][0]["datasets"]]
    assert scales == [[1.0, 1.0, 1.0], [2.0, 2.0, 1.0], [4.0, 4.0, 1.0]]


def test_mosaic_levels_are_two_by_two_means(tiles, layout):
    base = Mosaic(tiles, layout)
    half = base.at_level(1)
    assert half.shape == (384, 512, 3)
    block = base[:4, CELL:CELL + 4].astype(np.float64)
    expect = np.round(0.25 * (block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]))
    np.testing.assert_array_equal(half[:2, CELL // 2:CELL // 2 + 2], expect.astype(np.uint8))


def test_read_tile_folder_stacks_tiles_and_aligns_masks(tmp_path, tiles):
    import imageio.v3 as iio

    for i, t in enumerate(tiles[:3]):
        iio.imwrite(tmp_path / f"t{i}.png", t)
    iio.imwrite(tmp_path / "t1_mask.png", np.full((CELL, CELL), 2, np.uint8))
    stack = read_tile_folder(tmp_path)
    assert stack.data.shape == (3, CELL, CELL, 3) and stack.rgb
    assert stack.metadata["tile_names"] == ["t0", "t1", "t2"]
    masks = read_tile_folder(tmp_path, kind="labels", names=stack.metadata["tile_names"])
    assert masks.data.shape == (3, CELL, CELL)
    assert masks.data[0].max() == 0 and masks.data[1].min() == 2 and masks.data[2].max() == 0


# --------------------------------------------------------------------------- tissue and grid


def test_saturation_matches_hand_computation():
    px = np.array([[[200, 100, 50], [0, 0, 0], [90, 90, 90]]], np.uint8)
    np.testing.assert_allclose(saturation(px)[0], [150 / 200, 0.0, 0.0])


def test_tissue_mask_finds_the_tiles_and_skips_glass(slide_path, layout):
    with open_slide(slide_path) as slide:
        thumb = np.asarray(slide.levels[-1][:, :])
        mask = tissue_mask(thumb, rgb=True)
        grid = TileGrid(slide.shape, CELL)
        found = tissue_tiles(grid, mask, 0.05)
    expected = {tuple(rc) for rc in np.argwhere(layout >= 0)}
    assert found == expected


def test_tile_grid_bounds_clip_at_the_edge():
    grid = TileGrid((700, 1000), 256)
    assert (grid.n_rows, grid.n_cols) == (3, 4)
    assert grid.bounds(2, 3) == (512, 700, 768, 1000)
    assert len(grid.tiles()) == 12


def test_wsi_config_is_checked():
    with pytest.raises(ConfigError, match="wsi.tile_size"):
        WSIConfig(tile_size=100).validate()
    with pytest.raises(ConfigError, match="wsi.overlap"):
        WSIConfig(overlap=12).validate()
    cfg = TrainConfig()
    cfg.wsi.level = 1
    again = TrainConfig.from_json(cfg.to_json())
    assert again.wsi.level == 1


# --------------------------------------------------------------------------- dataset


def test_snapshot_and_tile_dataset(slide_path, layout):
    with open_slide(slide_path) as slide:
        labels = _painted(slide.shape, [(0, 1), (1, 3)])
        wsi = WSIConfig(tile_size=CELL)
        pair = snapshot_slide(slide.levels, labels, rgb=True, wsi=wsi, name=slide.name)
        assert set(pair.painted) == {(0, 1), (1, 3)}
        np.testing.assert_array_equal(pair.painted[(0, 1)], labels[:CELL, CELL:2 * CELL])
        cfg = DataConfig(patch_size=64, batch_labelled=3, batch_unlabelled=5)
        ds = make_dataset([pair], cfg, wsi)
        assert isinstance(ds, TileDataset)
        assert ds.class_values == [1, 2]
        tissue = {tuple(rc) for rc in np.argwhere(layout >= 0)}
        assert {k for _, k in ds.unlabelled} == tissue - {(0, 1), (1, 3)}
        assert ds.summary()["labelled"] == 2 and ds.summary()["unlabelled"] == len(tissue) - 2
        rng = np.random.default_rng(0)
        batch = ds.sample_batch(rng, torch.device("cpu"))
        assert batch.x_l.shape == (3, 3, 64, 64) and batch.x_u.shape == (5, 3, 64, 64)
        assert batch.y_l.dtype == torch.int64
        # every labelled crop sees painted pixels; targets only hold classes or IGNORE
        assert all(((y == 0) | (y == 1)).any() for y in batch.y_l)
        assert set(torch.unique(batch.y_l).tolist()) <= {IGNORE_INDEX, 0, 1}
        assert 0.0 <= float(batch.x_l.min()) and float(batch.x_l.max()) <= 1.0
        # a window read through the cache equals the normalised level
        win = ds.read_window(0, 10, CELL - 20, 64)
        raw = np.asarray(slide.levels[0][10:74, CELL - 20:CELL + 44], np.float32)
        expect = np.clip((raw - pair.lo) / (pair.hi - pair.lo), 0, 1).transpose(2, 0, 1)
        np.testing.assert_allclose(win, expect, atol=1e-6)
        assert len(ds._cache) <= 64


def test_no_painted_tile_is_a_data_error(slide_path):
    with open_slide(slide_path) as slide:
        pair = snapshot_slide(slide.levels, np.zeros(slide.shape, np.uint8), rgb=True, wsi=WSIConfig(tile_size=CELL))
        with pytest.raises(DataError, match="no painted tile"):
            make_dataset([pair], DataConfig())
        with pytest.raises(DataError, match="level 3 does not exist"):
            snapshot_slide(slide.levels, None, rgb=True, wsi=WSIConfig(level=3))
        with pytest.raises(DataError, match="does not match"):
            snapshot_slide(slide.levels, np.zeros((10, 10), np.uint8), rgb=True, wsi=WSIConfig())


# --------------------------------------------------------------------------- stain jitter


def test_hed_jitter_is_identity_without_jitter_and_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 0.9 + 0.05
    same = hed_jitter(x, generator=g, alpha=torch.ones(2, 3), beta=torch.zeros(2, 3))
    torch.testing.assert_close(same, x, atol=1e-9, rtol=0)
    alpha = torch.tensor([[1.2, 0.9, 1.0], [1.0, 1.0, 1.0]])
    beta = torch.tensor([[0.05, -0.02, 0.0], [0.0, 0.0, 0.1]])
    out = hed_jitter(x, generator=g, alpha=alpha, beta=beta)
    # by hand for one pixel: optical density -> stains -> jitter -> back
    from skimage.color import hed_from_rgb, rgb_from_hed

    rgb = x[0, :, 1, 2].numpy()
    stains = (-np.log(rgb)) @ hed_from_rgb
    stains = stains * alpha[0].numpy() + beta[0].numpy()
    expect = np.clip(np.exp(-(stains @ rgb_from_hed)), 0, 1)
    np.testing.assert_allclose(out[0, :, 1, 2].numpy(), expect, rtol=1e-6)
    np.testing.assert_allclose(HED_FROM_RGB.numpy() @ RGB_FROM_HED.numpy(), np.eye(3), atol=1e-12)


def test_strong_augment_uses_stain_jitter_only_for_rgb():
    x = torch.full((2, 3, 16, 16), 0.5)
    a = strong_augment(x, generator=torch.Generator().manual_seed(1), stain=0.0, p=1.0, cutout=0, noise_std=0)
    b = strong_augment(x, generator=torch.Generator().manual_seed(1), stain=0.2, p=1.0, cutout=0, noise_std=0)
    assert not torch.allclose(a, b)
    grey = torch.full((2, 1, 16, 16), 0.5)
    strong_augment(grey, generator=torch.Generator().manual_seed(1), stain=0.2)  # no error, no jitter
    with pytest.raises(ValueError, match="3 RGB channels"):
        hed_jitter(grey, generator=torch.Generator())


# --------------------------------------------------------------------------- inference


class _RedThreshold(torch.nn.Module):
    """A per-pixel 'network': class 1 where the normalised red channel exceeds 0.5."""

    multiple = 16

    def forward(self, x):
        red = x[:, :1]
        return torch.cat([torch.zeros_like(red), 20.0 * (red - 0.5)], dim=1)


@pytest.mark.parametrize(("tile", "overlap"), [(64, 16), (128, 0), (96, 40)])
def test_stitched_prediction_equals_the_per_pixel_answer(slide_path, tile, overlap):
    """Any tile size and overlap: stitching and blending give exactly the pixel-wise
    answer on tissue tiles, and 0 on the tiles that were skipped."""
    with open_slide(slide_path) as slide:
        level = slide.levels[0]
        full = np.asarray(level[:, :], np.float32)
        lo, hi = np.array([0, 0, 0], np.float32), np.array([255, 255, 255], np.float32)
        out = np.zeros(slide.shape, np.uint8)
        grid = TileGrid(slide.shape, tile)
        todo = {t for t in grid.tiles() if (t[0] + t[1]) % 3}
        info = predict_level(_RedThreshold(), level, out, class_values=[3, 7], lo=lo, hi=hi, rgb=True,
                             device=torch.device("cpu"), tile=tile, overlap=overlap, tiles=todo, batch_size=3)
        assert info["tiles"] == len(todo)
        expect = np.where(full[..., 0] / 255.0 > 0.5, 7, 3)
        for r, c in grid.tiles():
            y0, y1, x0, x1 = grid.bounds(r, c)
            if (r, c) in todo:
                np.testing.assert_array_equal(out[y0:y1, x0:x1], expect[y0:y1, x0:x1])
            elif overlap == 0:
                assert not out[y0:y1, x0:x1].any()


def test_predict_slide_writes_a_label_pyramid(slide_path, tmp_path, layout):
    with open_slide(slide_path) as slide:
        pyramid, info = predict_slide(_RedThreshold(), slide.levels, tmp_path / "pred.zarr", class_values=[1, 2],
                                      device=torch.device("cpu"), tile=CELL, overlap=0)
    assert info["tissue_tiles"] == int((layout >= 0).sum()) and info["grid_tiles"] == layout.size
    shapes = [tuple(a.shape) for a in pyramid]
    assert shapes == [(768, 1024), (384, 512), (192, 256)]
    np.testing.assert_array_equal(np.asarray(pyramid[1][:]), np.asarray(pyramid[0][:])[::2, ::2])
    with open_slide(tmp_path / "pred.zarr") as back:
        assert not back.rgb and len(back.levels) == 3
        # glass cells were never predicted
        assert not np.asarray(back.levels[0][:CELL, :CELL]).any()


# --------------------------------------------------------------------------- training


def test_trainer_trains_on_painted_tiles_and_previews_every_level(tmp_path):
    tiles = _he_tiles(4)
    layout = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [-1, 0, 1, -1], [-1, -1, -1, -1]])
    path = write_mosaic_slide(tmp_path / "s.ome.tif", tiles, layout, tile=128)
    with open_slide(path) as slide:
        # pyramid: 1024 -> 512
        assert len(slide.levels) == 1 or slide.levels[1].shape[0] == slide.levels[0].shape[0] // 2
        labels = _painted(slide.shape, [(0, 0), (1, 2)])
        cfg = TrainConfig(method="mean_teacher", iterations=4, seed=0, refresh_every=2)
        cfg.data.patch_size = 64
        cfg.data.batch_labelled = cfg.data.batch_unlabelled = 2
        cfg.wsi = WSIConfig(level=0, tile_size=CELL, overlap=32)
        pair = snapshot_slide(slide.levels, labels, rgb=True, wsi=cfg.wsi, name="s")
        trainer = Trainer(cfg, [pair], device=torch.device("cpu"), out_dir=tmp_path / "run")
        events = list(trainer.run())
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and all(e.kind == "prediction" for e in previews)
    pyramid = previews[-1].array
    assert tuple(pyramid[0].shape) == (1024, 1024)
    assert len(pyramid) >= 3
    for a, b in itertools.pairwise(pyramid):
        assert b.shape[0] == math.ceil(a.shape[0] / 2)
    top = np.asarray(pyramid[0][:])
    assert set(np.unique(top)) <= {0, 1, 2} and np.isin(top[:CELL, :CELL], [1, 2]).all()
    assert not top[3 * CELL + 32:, :].any()  # glass row: skipped (but for the 32-pixel overlap)
    assert trainer.step == 4 and np.isfinite(trainer.last_losses["total"])
    # only the last two previews are kept on disk
    assert len(list((tmp_path / "run" / "previews").glob("*.zarr"))) <= 2
    # the painted tiles (not the slide) are autosaved and read back exactly
    from napari_semicl.engine.autosave import load_annotations

    (saved,) = load_annotations(tmp_path / "run")
    assert saved["labels"] is None and saved["level"] == 0 and saved["tile_size"] == CELL
    assert set(saved["tiles"]) == set(pair.painted)
    for key, (tile_labels, bounds) in saved["tiles"].items():
        np.testing.assert_array_equal(tile_labels, pair.painted[key])
        assert bounds == pair.grid.bounds(*key)


# --------------------------------------------------------------------------- CLI


def test_cli_train_and_predict_a_slide(tmp_path):
    from napari_semicl.cli import main

    tiles = _he_tiles(4)
    layout = np.array([[0, 1, -1], [2, 3, 0]])
    slide = write_mosaic_slide(tmp_path / "slide.ome.tif", tiles, layout, tile=128)
    labels = write_pyramid(tmp_path / "painted.ome.tif", [_painted((2 * CELL, 3 * CELL), [(0, 0), (1, 1)])],
                           tile=128, labels=True)
    out = tmp_path / "run"
    rc = main(["-q", "train", "--image", str(slide), "--labels", str(labels), "--iterations", "3",
               "--patch-size", "64", "--tile-size", str(CELL), "--out", str(out)])
    assert rc == 0
    with open_slide(out / "prediction.ome.tif") as pred:
        assert pred.levels[0].shape == (2 * CELL, 3 * CELL)
        assert not np.asarray(pred.levels[0][:CELL - 64, 2 * CELL + 64:]).any()  # glass, beyond the overlap
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["labelled"] == 2 and metrics["data"]["unit"] == "tiles"
    rc = main(["-q", "predict", "--checkpoint", str(out / "checkpoint.pt"), "--image", str(slide),
               "--out", str(tmp_path / "mask.zarr")])
    assert rc == 0
    with open_slide(tmp_path / "mask.zarr") as pred:
        assert pred.levels[0].shape == (2 * CELL, 3 * CELL)
    # a second run without --overwrite is refused with one line; a non-pyramid suffix too
    assert main(["-q", "predict", "--checkpoint", str(out / "checkpoint.pt"), "--image", str(slide),
                 "--out", str(tmp_path / "mask.zarr")]) == 2
    assert main(["-q", "predict", "--checkpoint", str(out / "checkpoint.pt"), "--image", str(slide),
                 "--out", str(tmp_path / "mask.nii.gz")]) == 2

"""engine.apply: a trained network applied to new images and files, without Qt.

A tiny network trained a few steps on a 2.5D crop of the bundled sample; the same network
from the trainer in memory and from its checkpoint predicts the same; images that do not
fit (RGB, 2D for a 2.5D network, 4D) are refused with a message; files are written as
'<name>_mask' with the source geometry.
"""

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch

from napari_semicl.data import AnnotatedPair
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.engine import TrainConfig, Trainer, run_sync
from napari_semicl.engine.apply import Predictor, image_stem, mask_path, predict_file, predict_files
from napari_semicl.errors import CheckpointError, DataError
from napari_semicl.io import read_image, write_image
from napari_semicl.io.sample import load_sample_volume

CPU = torch.device("cpu")
CROP = slice(28, 44)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(trainer, checkpoint path, sample image) after 3 steps with 1 context slice."""
    torch.set_num_threads(1)
    image, reference = load_sample_volume()
    volume = image.data[CROP].astype(np.float32)
    painted = reveal_slices(reference.data[CROP], [2, 12], 0)
    cfg = TrainConfig(method="mean_teacher", iterations=3, refresh_every=1000, seed=0)
    cfg.data.patch_size = 64
    cfg.data.batch_labelled = cfg.data.batch_unlabelled = 2
    cfg.data.context_slices = 1
    cfg.data.unpainted = "background"
    cfg.data.class_names = {"1": "csf", "2": "grey matter"}
    cfg.model.base_channels, cfg.model.depth = 8, 3
    out = tmp_path_factory.mktemp("run")
    trainer = Trainer(cfg, [AnnotatedPair(volume, painted, name="t1")], out_dir=out, device=CPU)
    run_sync(trainer.run())
    return trainer, out / "checkpoint.pt", image


def test_the_run_and_its_checkpoint_predict_the_same(run):
    trainer, checkpoint, image = run
    other = np.ascontiguousarray(image.data[50:62, ::-1])  # another part of the brain, flipped
    live = Predictor.from_trainer(trainer)
    saved = Predictor.from_checkpoint(checkpoint, device=CPU)
    assert live.class_values == saved.class_values == trainer.dataset.class_values
    assert saved.class_names == {1: "csf", 2: "grey matter"}
    a = live.predict(other, with_entropy=True)
    b = saved.predict(other, with_entropy=True)
    assert a.labels.shape == b.labels.shape == other.shape and a.entropy.shape == other.shape
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5)
    assert set(np.unique(a.labels)) <= set(live.class_values)
    np.testing.assert_array_equal(a.labels, trainer.predict(other).labels)  # as the trainer itself predicts


def test_the_copy_is_independent_of_the_trainer(run):
    trainer, _, _ = run
    live = Predictor.from_trainer(trainer)
    net = trainer.method.inference_model()
    assert live.model is not net
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(live.model.parameters(), net.parameters()))


@pytest.mark.parametrize("shape, rgb, fragment", [
    ((16, 32, 3), True, "trained on grey images but this image is RGB"),
    ((4, 16, 32, 3), True, "trained on grey images but this image is RGB"),
    ((32, 32), False, "2.5D (each slice with 1 neighbour(s) on either side): it predicts 3D volumes, and this image is 2D"),
    ((2, 4, 16, 16), False, "4 spatial axes"),
])
def test_images_that_do_not_fit_are_refused_with_a_message(run, shape, rgb, fragment):
    saved = Predictor.from_checkpoint(run[1], device=CPU)
    with pytest.raises(DataError) as info:
        saved.predict(np.zeros(shape, np.float32), rgb=rgb)
    assert fragment in str(info.value)


def test_a_2d_network_refuses_a_volume_only_when_it_is_2_5d(run):
    saved = Predictor.from_checkpoint(run[1], device=CPU)
    saved.config.data.context_slices = 0  # as if trained on plain slices of 3 channels: RGB 2D
    with pytest.raises(DataError, match="trained on RGB images but this image is grey"):
        saved.check_image((8, 16, 16))


def test_an_untrusted_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": object()}, bad)
    with pytest.raises(CheckpointError):
        Predictor.from_checkpoint(bad)


def test_mask_names():
    assert image_stem("/d/case_01.nii.gz") == "case_01"
    assert image_stem("slide.ome.tif") == "slide"
    assert mask_path("/d/case.nii.gz", "/o").as_posix() == "/o/case_mask.nii.gz"
    assert mask_path("/d/cells.png", "/o").as_posix() == "/o/cells_mask.tif"
    assert mask_path("/d/cells.png", "/o", suffix=".nii.gz").name == "cells_mask.nii.gz"


def test_files_get_masks_with_the_source_geometry(run, tmp_path):
    trainer, checkpoint, image = run
    src = tmp_path / "src"
    src.mkdir()
    nifti = write_image(src / "second.nii.gz", image.data[CROP][::-1].copy(), metadata=image.metadata)
    tiff = write_image(src / "plain.tif", image.data[40:48].copy(), metadata={})
    rgb = src / "colour.tif"
    tifffile.imwrite(rgb, np.zeros((16, 16, 3), np.uint8), photometric="rgb")
    saved = Predictor.from_checkpoint(checkpoint, device=CPU)
    seen = []
    results = predict_files(saved, [nifti, tiff, rgb], tmp_path / "out",
                            progress=lambda done, total, r: seen.append((done, total, r.ok)))
    assert seen == [(1, 3, True), (2, 3, True), (3, 3, False)]
    assert [r.mask.name if r.ok else None for r in results] == ["second_mask.nii.gz", "plain_mask.tif", None]
    assert "RGB" in results[2].error
    source, written = nib.load(nifti), nib.load(results[0].mask)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    expected = saved.predict(read_image(nifti).data).labels
    np.testing.assert_array_equal(read_image(results[0].mask, kind="labels").data, expected)
    assert read_image(results[1].mask, kind="labels").data.shape == (8, *image.data.shape[1:])
    # an existing mask is kept unless asked
    again = predict_files(saved, [nifti], tmp_path / "out")
    assert not again[0].ok and "already exists" in again[0].error
    assert predict_file(saved, nifti, results[0].mask, overwrite=True).ok

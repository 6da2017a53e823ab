"""The session benchmark (issue 26): the simulated annotator's strategies and stop rule on
hand-checkable volumes, the fill, mci and network products end to end on tiny volumes, and
``napari-semicl bench session`` on tiny NIfTI files."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_semicl.bench import session as session_mod
from napari_semicl.bench.common import Case, find_cases
from napari_semicl.bench.mci import mci_available, mci_interpolate
from napari_semicl.bench.session import (
    FillProduct,
    Shown,
    annotate_volume,
    even_slices,
    next_painted,
    order_cases,
    run_session,
    suggested_slice,
    summarise,
    volume_dice,
    worst_slice,
    wrong_per_slice,
)
from napari_semicl.cli import main
from napari_semicl.engine import apply as apply_mod
from napari_semicl.engine.fusion import PairPredictions
from napari_semicl.engine.inference import Prediction
from napari_semicl.errors import DataError
from napari_semicl.io import ImageData

needs_itk = pytest.mark.skipif(not mci_available(), reason="ITK's MorphologicalContourInterpolator is not installed")


def _ellipsoid(seed: int = 0, shape=(20, 32, 32)):
    """A bright ellipsoid elongated along axis 0 (foreground on slices 3..16) in mild noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    r = np.sqrt(((z - 9.5) / 7.2) ** 2 + ((y - 16) / 10) ** 2 + ((x - 15) / 8) ** 2)
    ref = (r < 1).astype(np.uint8)
    img = (0.2 + 0.6 * ref + rng.normal(0, 0.03, shape)).astype(np.float32)
    return img, ref


def _case(img, ref, name="vol") -> Case:
    return Case(name, ImageData(img, name=name, scale=(1.0,) * img.ndim, metadata={}, rgb=False),
                ImageData(ref, name=f"{name}_gt", scale=(1.0,) * ref.ndim, metadata={}, rgb=False))


def _write_case(folder, name, img, ref):
    # NIfTI stores x fastest; the reader reverses axes, so write the transposed arrays
    nib.save(nib.Nifti1Image(img.T, np.eye(4)), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(ref.T, np.eye(4)), str(folder / f"{name}_gt.nii.gz"))


@pytest.fixture
def volume_dir(tmp_path):
    folder = tmp_path / "vols"
    folder.mkdir()
    for i in range(3):
        _write_case(folder, f"v{i}", *_ellipsoid(i))
    return folder


# --- the annotator ------------------------------------------------------------------------------
def test_even_spaces_k_slices_strictly_inside_the_foreground_range():
    ref = np.zeros((12, 4, 4), np.uint8)
    ref[2:8, 1:3, 1:3] = 1  # foreground on slices 2..7
    assert even_slices(ref, 1, 0) == [4]       # linspace(2, 7, 3)[1] = 4.5 -> 4 (round half to even)
    assert even_slices(ref, 2, 0) == [4, 5]    # 3.67, 5.33
    assert even_slices(ref, 4, 0) == [3, 4, 5, 6]  # 3, 4, 5, 6
    # along another axis: the same volume transposed
    assert even_slices(ref.transpose(1, 2, 0), 2, 2) == [4, 5]
    # the set is placed afresh at every k; a range too short for k slices ends the strategy
    mask = np.zeros_like(ref)
    assert next_painted("even", [4], reference=ref, axis=0, mask=mask) == [4, 5]
    # k = 5 inside (2.8, 3.7, 4.5, 5.3, 6.2) rounds onto 4 slices: the range's ends join (2, 3.25, 4.5, 5.75, 7)
    assert next_painted("even", [3, 4, 5, 6], reference=ref, axis=0, mask=mask) == [2, 3, 4, 6, 7]
    short = np.zeros((6, 2, 2), np.uint8)
    short[2:4] = 1  # two foreground slices, 2 and 3: k = 2 paints both (2.33, 2.67), k = 3 cannot (even with ends)
    assert even_slices(short, 2, 0) == [2, 3]
    assert next_painted("even", [2, 3], reference=short, axis=0, mask=np.zeros_like(short)) is None


def test_worst_picks_the_unpainted_foreground_slice_with_most_wrong_voxels():
    ref = np.zeros((6, 4, 4), np.uint8)
    ref[1:5, :2, :2] = 1               # foreground on slices 1..4, 4 voxels each
    mask = ref.copy()
    mask[2] = 0                        # slice 2: 4 wrong (missed)
    mask[3, 2:, 2:] = 1                # slice 3: 4 wrong (extra) ...
    mask[3, 0, 0] = 0                  # ... and one missed: 5 wrong
    mask[5] = 1                        # slice 5: 16 wrong, but no foreground in the reference
    assert wrong_per_slice(mask, ref, 0).tolist() == [0, 0, 4, 5, 0, 16]
    assert worst_slice(mask, ref, 0) == 3
    assert worst_slice(mask, ref, 0, painted=[3]) == 2
    assert worst_slice(mask, ref, 0, painted=[2, 3]) == 1   # nothing wrong left: the lowest index
    assert worst_slice(mask, ref, 0, painted=[1, 2, 3, 4]) is None
    # along axis 2
    assert worst_slice(mask.transpose(1, 2, 0), ref.transpose(1, 2, 0), 2) == 3
    assert next_painted("worst", [3], reference=ref, axis=0, mask=mask) == [3, 2]


def test_suggest_ranks_the_foreground_slices_by_entropy():
    ref = np.zeros((6, 4, 4), np.uint8)
    ref[1:5, :2, :2] = 1
    entropy = np.zeros(ref.shape, np.float32)
    entropy[0] = 1.0   # most uncertain, but no foreground there
    entropy[2] = 0.5
    entropy[4] = 0.25
    assert suggested_slice(entropy, ref, 0) == 2
    assert suggested_slice(entropy, ref, 0, painted=[2]) == 4
    # before any network (no entropy) the first slice is the middle of the structure
    assert next_painted("suggest", [], reference=ref, axis=0, mask=np.zeros_like(ref)) == even_slices(ref, 1, 0)
    with pytest.raises(DataError, match="strategy"):
        next_painted("largest-gap", [], reference=ref, axis=0, mask=ref)


class _PaintedOnly:
    """A product whose mask is the painted slices alone: its Dice is 2k / (k + n) after k of
    n equal foreground slices, which the stop rule can be checked against by hand."""

    name = "painted"

    def start(self, case):
        self.finished = False
        return Shown(np.zeros_like(case.reference.data))

    def paint(self, labels, painted):
        return Shown(labels.copy())

    def finish(self):
        self.finished = True
        return {}


def test_the_annotator_stops_at_the_target_or_at_max_slices(caplog):
    ref = np.zeros((24, 3, 3), np.uint8)
    ref[2:22] = 1  # 20 equal foreground slices
    case = _case(np.zeros(ref.shape, np.float32), ref)
    product = _PaintedOnly()
    # Dice 2k/(k+20): k = 6 -> 0.4615, k = 7 -> 0.5185: the target 0.5 is reached at 7 slices
    row = annotate_volume(case, product, strategy="worst", axis=0, target=0.5, max_slices=10)
    assert row["painted"] == 7 and row["reached"] and product.finished
    assert row["dice_trace"][0] == 0.0 and len(row["dice_trace"]) == 8
    assert row["dice_trace"][-2:] == [round(12 / 26, 4), round(14 / 27, 4)]
    assert row["dice"] == round(14 / 27, 4) and len(set(row["slices"])) == 7
    # out of reach: 10 slices, then stop (Dice 20/30), not reached
    row = annotate_volume(case, product, strategy="even", axis=0, target=0.99, max_slices=10)
    assert row["painted"] == 10 and not row["reached"] and row["dice"] == round(20 / 30, 4)
    assert row["slices"] == even_slices(ref, 10, 0)
    # a first mask already at the target: nothing to paint
    product.start = lambda c: Shown(c.reference.data.copy())
    with caplog.at_level("INFO", logger="napari_semicl.bench.session"):
        row = annotate_volume(case, product, strategy="worst", axis=0, target=0.9, max_slices=10)
    assert row["painted"] == 0 and row["dice_trace"] == [1.0] and row["reached"]
    # the log says the first mask's Dice (the figure a cohort's network is judged by) as it comes
    assert "vol: first mask (0 painted slices), Dice 1.0000" in caplog.text


def test_summary_counts_volumes_after_the_warmup_and_the_dice_is_over_foreground_classes():
    rows = [{"painted": p, "dice": 0.9, "reached": True, "cpu_s": 1.0} for p in (6, 5, 4, 2, 3)]
    s = summarise(rows, warmup=3)
    assert s["painted"]["mean"] == 4.0 and s["painted_after_warmup"] == {
        "mean": 2.5, "std": 0.5, "min": 2.0, "max": 3.0, "n": 2}
    assert summarise(rows[:2], warmup=3)["painted_after_warmup"] is None
    ref = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 2, 2, 0])
    assert volume_dice(pred, ref) == pytest.approx((2 / 3 + 4 / 5) / 2)
    with pytest.raises(DataError, match="no foreground"):
        volume_dice(pred, np.zeros_like(ref))


def test_order_by_name_random_or_given_names(volume_dir):
    cases = find_cases(volume_dir)
    assert [c.name for c in order_cases(cases, "name")] == ["v0", "v1", "v2"]
    assert sorted(c.name for c in order_cases(cases, "random", seed=1)) == ["v0", "v1", "v2"]
    assert [c.name for c in order_cases(cases, "v2, v0")] == ["v2", "v0"]
    with pytest.raises(DataError, match="no volume named"):
        order_cases(cases, "v7")


# --- the products -----------------------------------------------------------------------------
def test_fill_product_end_to_end_on_a_tiny_volume(tmp_path):
    img, ref = _ellipsoid()
    case = _case(img, ref)
    product = FillProduct(axis=0)
    row = annotate_volume(case, product, strategy="even", axis=0, target=0.9)
    assert row["reached"] and 2 <= row["painted"] <= 6  # one slice cannot fill a 14-slice ellipsoid to 0.9
    # the recorded Dice is the fill's of exactly those slices
    from napari_semicl.data.interpolation import interpolate_labels
    from napari_semicl.data.reveal import reveal_slices

    fill = interpolate_labels(reveal_slices(ref, row["slices"], 0), axis=0, image=img, method="flow",
                              unpainted="background").labels
    assert row["dice"] == round(volume_dice(fill, ref), 4)
    assert row["dice_trace"][0] == 0.0 and all(d < 0.9 for d in row["dice_trace"][:-1])


def test_run_session_writes_the_results_after_every_volume(volume_dir, tmp_path):
    out = tmp_path / "s.json"
    data = run_session(volume_dir, product="fill", strategy="worst", out=out, warmup=1, limit=2, order="v1,v0,v2")
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert [v["name"] for v in on_disk["volumes"]] == ["v1", "v0"] and on_disk["axis"] == 0
    assert on_disk["summary"]["volumes"] == 2 and on_disk["summary"]["painted_after_warmup"]["n"] == 1
    for v in on_disk["volumes"]:
        assert v["painted"] == len(v["slices"]) == len(v["dice_trace"]) - 1
        assert v["reached"] == (v["dice"] >= 0.9)
    with pytest.raises(DataError, match="suggest"):
        run_session(volume_dir, product="fill", strategy="suggest", out=out)


def test_network_product_trains_across_volumes_and_fuses(volume_dir, tmp_path):
    out = tmp_path / "net.json"
    data = run_session(volume_dir, product="network", strategy="suggest", out=out, limit=2, budget_steps=4,
                       max_slices=3, patch_size=32, warmup=1, threads=1, settings={"data.batch_labelled": "2",
                                                                         "data.batch_unlabelled": "2"})
    first, second = data["volumes"]
    assert first["dice_trace"][0] == 0.0  # no network yet: an empty first mask
    assert first["train_steps"] == 4 and second["train_steps"] == 4  # the whole budget, each volume
    assert second["total_steps"] == 8  # training went on from the first volume's weights
    assert 1 <= first["painted"] <= 3 and data["budget_steps"] == 4 and data["method"] == "recommended"
    with pytest.raises(DataError, match="budget"):
        run_session(volume_dir, product="network", out=out, limit=1)


def _network_with_island() -> np.ndarray:
    """A network's mask of ``_ellipsoid``: the structure short of its last slice (16), and a
    2x3x3 island past its end (slices 18-19, in a corner)."""
    _, ref = _ellipsoid()
    mask = ref.copy()
    mask[16] = 0
    mask[18:20, 0:3, 0:3] = 1
    return mask


@pytest.mark.parametrize("largest", [True, False])
def test_network_mask_keeps_the_largest_piece_with_predict_largest_component(volume_dir, tmp_path, monkeypatch,
                                                                           largest):
    """--set predict.largest_component=true: the mask the annotator corrects, a new volume's
    first mask (Trainer.predict) and the fused mask after each slice (Trainer.predict_pair),
    keeps each class's largest 3D piece, as with the Train dock's 'Keep largest piece'."""
    entropy = np.full(_network_with_island().shape, 0.1, np.float32)
    monkeypatch.setattr(apply_mod, "predict_volume", lambda *a, **k: Prediction(_network_with_island(), entropy))
    monkeypatch.setattr(PairPredictions, "predict_pair", lambda self, *a, **k: Prediction(_network_with_island(),
                                                                                          entropy))
    seen: list[np.ndarray] = []
    dice = session_mod.volume_dice
    monkeypatch.setattr(session_mod, "volume_dice", lambda mask, ref: (seen.append(mask.copy()), dice(mask, ref))[1])
    data = run_session(volume_dir, product="network", strategy="even", out=tmp_path / "s.json", limit=2,
                       budget_steps=2, max_slices=2, target=0.999, patch_size=32, warmup=1, threads=1,
                       settings={"predict.largest_component": str(largest).lower(), "data.batch_labelled": "2",
                                 "data.batch_unlabelled": "2"})
    first, second = data["volumes"]
    assert first["painted"] == second["painted"] == 2 and data["largest_component"] is largest
    # the Dice is taken of every mask the annotator sees and, with the setting on, of the same
    # mask before it was finished: after the first volume's empty first mask, 2 + 3 of each
    masks, before = (seen[1::2], seen[2::2]) if largest else (seen[1:], [])
    assert len(masks) == 5 and len(seen) == (11 if largest else 6)
    assert [ndimage.label(m == 1)[1] for m in masks] == [1 if largest else 2] * 5
    assert all(m[18:20, 0:3, 0:3].all() != largest for m in masks)
    assert all(np.array_equal(m, _network_with_island()) for m in before)
    _, ref = _ellipsoid()
    expected, island = _network_with_island(), _network_with_island()
    if largest:
        expected[18:20, 0:3, 0:3] = 0
    assert second["dice_trace"] == [round(volume_dice(expected, ref), 4)] * 3
    if largest:  # the paired diagnostic: the same masks' Dice with the island
        assert second["dice_trace_unfinished"] == [round(volume_dice(island, ref), 4)] * 3
        assert first["dice_trace_unfinished"][0] is None  # no network yet: nothing to finish
    else:
        assert "dice_trace_unfinished" not in second

@needs_itk
def test_mci_fills_between_slices_along_the_given_axis():
    lab = np.zeros((7, 16, 16), np.uint8)
    lab[1, 4:8, 4:8] = 1
    lab[5, 3:12, 3:12] = 1
    out = mci_interpolate(lab, axis=0)
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert np.array_equal(out[1], lab[1]) and np.array_equal(out[5], lab[5])  # painted slices kept
    areas = [int(out[s].sum()) for s in range(7)]
    assert areas[0] == areas[6] == 0  # nothing past the outermost painted slices
    assert 16 <= areas[2] <= areas[3] <= areas[4] <= 81  # grows from one painted shape to the other
    # the same along axis 2, and several labels with their own slices
    assert np.array_equal(mci_interpolate(lab.transpose(1, 2, 0), axis=2), out.transpose(1, 2, 0))
    two = lab.copy()
    two[1, 10:14, 10:14] = 2
    two[3, 10:14, 10:14] = 2
    out2 = mci_interpolate(two, axis=0)
    assert (out2[2] == 2).sum() > 0 and (out2[4] == 2).sum() == 0  # label 2 only between its own slices
    assert not mci_interpolate(np.zeros_like(lab), axis=0).any()


@needs_itk
def test_mci_product_end_to_end(volume_dir, tmp_path):
    data = run_session(volume_dir, product="mci", strategy="even", out=tmp_path / "m.json", limit=1)
    row = data["volumes"][0]
    assert row["painted"] >= 2 and row["dice_trace"][0] == 0.0


def test_mci_says_how_to_install_itk(monkeypatch):
    with pytest.raises(DataError, match="3D"):
        mci_interpolate(np.zeros((4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "itk", None)  # import itk -> ImportError
    assert not mci_available()
    lab = np.zeros((3, 4, 4), np.uint8)
    lab[1, 1:3, 1:3] = 1
    with pytest.raises(DataError, match=r"napari-semicl\[bench\]"):
        mci_interpolate(lab)


# --- the command line ---------------------------------------------------------------------------
def test_cli_bench_session_end_to_end(volume_dir, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["bench", "session", "--data", str(volume_dir), "--product", "fill", "--strategy", "even",
               "--limit", "2", "--warmup", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["protocol"] == "session" and data["product"] == "fill" and len(data["volumes"]) == 2
    assert "mean painted slices" in printed and "volumes 2..2" in printed and "v0" in printed
    rc = main(["bench", "session", "--data", str(volume_dir), "--product", "fill", "--strategy", "suggest",
               "--out", str(out)])
    assert rc == 2 and "--product network" in capsys.readouterr().err
    rc = main(["bench", "session", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err

"""The benchmark harness: slice reveal, labelled-volume choice, incremental results, the
random-forest baseline and both label-efficiency protocols end to end on tiny volumes."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_semicl.bench.common import ResultsFile, find_cases, score, thinnest_axis
from napari_semicl.bench.label_efficiency import (
    choose_labelled,
    cohort,
    split_spec,
    within_volume,
)
from napari_semicl.bench.report import dice_vs_k_plot, dice_vs_k_series, dice_vs_k_table, render
from napari_semicl.bench.rf import rf_segment
from napari_semicl.data.reveal import choose_reveal_slices, reveal_slices
from napari_semicl.errors import DataError


def _ball_volume(seed: int, shape=(8, 40, 40), radius=11.0):
    """A bright ball (class 1) with a darker core (class 2) in noise, slices along axis 0."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2 + rng.uniform(-2, 2, 3) * np.array([0.3, 1, 1])
    r = np.sqrt(((z - c[0]) * 4) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
    ref = np.zeros(shape, np.uint8)
    ref[r < radius] = 1
    ref[r < radius / 2] = 2
    img = (0.2 + 0.5 * (ref == 1) + 0.8 * (ref == 2) + rng.normal(0, 0.05, shape)).astype(np.float32)
    return img, ref


def _write_case(folder, name, img, ref):
    # NIfTI stores x fastest; the reader reverses axes, so write the transposed arrays
    nib.save(nib.Nifti1Image(img.T, np.eye(4)), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(ref.T, np.eye(4)), str(folder / f"{name}_gt.nii.gz"))


@pytest.fixture
def ball_dir(tmp_path):
    folder = tmp_path / "balls"
    folder.mkdir()
    for i in range(3):
        _write_case(folder, f"ball{i}", *_ball_volume(i))
    return folder


def test_reveal_is_evenly_spaced_over_the_foreground_range():
    ref = np.zeros((20, 3, 3), np.uint8)
    ref[4:15] = 1
    assert choose_reveal_slices(ref, 3, 0) == [4, 9, 14]
    assert choose_reveal_slices(ref, 1, 0) == [9]
    assert choose_reveal_slices(ref, 2, 0) == [4, 14]
    # 'inside': at i / (K + 1) of the range 4..14, the tips left unpainted
    assert choose_reveal_slices(ref, 2, 0, "inside") == [7, 11]
    assert choose_reveal_slices(ref, 4, 0, "inside") == [6, 8, 10, 12]
    assert choose_reveal_slices(ref, 1, 0, "inside") == [9]
    with pytest.raises(DataError, match="placement"):
        choose_reveal_slices(ref, 2, 0, "edges")
    painted = reveal_slices(ref, [4, 9], 0)
    assert painted[4].all() and painted[9].all() and painted.sum() == 18
    with pytest.raises(DataError, match="no foreground"):
        choose_reveal_slices(np.zeros((5, 2, 2)), 2, 0)


def test_labelled_volumes_are_spread_over_the_sorted_list():
    names = [f"p{i:02d}_f{j}" for i in range(5) for j in (1, 2)]  # 10 volumes, 2 per subject
    assert choose_labelled(names, 2) == [0, 5]            # p00_f1 and p02_f2: two subjects
    assert choose_labelled(names, 1) == [0]
    assert choose_labelled(names, 10) == list(range(10))
    assert choose_labelled(names, 3, ["p04_f2", "p01_f1"]) == [2, 9]
    with pytest.raises(DataError, match="1..10"):
        choose_labelled(names, 11)
    with pytest.raises(DataError, match="no training volume named"):
        choose_labelled(names, 1, ["nope"])


def test_split_spec_reads_method_variants():
    assert split_spec("arco:sampler=sg;grid=8") == ("arco", {"sampler": "sg", "grid": "8"})
    assert split_spec("supervised") == ("supervised", {})


def test_results_file_is_valid_json_after_every_row(tmp_path):
    out = tmp_path / "r.json"
    res = ResultsFile(out, {"protocol": "within-volume", "k": 3})
    assert json.loads(out.read_text())["methods"] == {}
    res.add("rf", {"name": "a", "dice": 0.5, "hd95": 2.0, "asd": 1.0, "train_s": 1.0, "steps": None})
    res.add("rf", {"name": "b", "dice": 0.7, "hd95": None, "asd": 3.0, "train_s": 3.0, "steps": None})
    data = json.loads(out.read_text())
    assert data["methods"]["rf"]["dice"] == pytest.approx(0.6)
    assert data["methods"]["rf"]["hd95"] == pytest.approx(2.0)   # None rows left out of the mean
    assert data["methods"]["rf"]["steps"] is None
    assert [r["name"] for r in data["methods"]["rf"]["per_volume"]] == ["a", "b"]


def test_score_keeps_only_the_unrevealed_slices():
    ref = np.zeros((4, 10, 10), np.uint8)
    ref[:, 2:8, 2:8] = 1
    pred = ref.copy()
    pred[0] = 0                                   # wrong only on slice 0
    assert score(pred, ref, keep_slices=[1, 2, 3])["dice"] == pytest.approx(1.0)
    assert score(pred, ref)["dice"] == pytest.approx(2 * 108 / (108 + 144))


def test_rf_baseline_segments_a_clear_ball_from_three_slices():
    img, ref = _ball_volume(0)
    revealed = choose_reveal_slices(ref, 3, 0)  # the middle one holds the core class
    painted = reveal_slices(ref, revealed, 0)
    pred, info = rf_segment(img, painted, painted_slices=revealed, axis=0, n_estimators=20, n_jobs=1)
    keep = np.setdiff1d(np.arange(ref.shape[0]), revealed)
    assert pred.shape == ref.shape and info["total_s"] > 0
    assert score(pred, ref, keep_slices=keep)["dice"] > 0.8


def test_within_volume_writes_the_documented_schema(ball_dir, tmp_path):
    out = tmp_path / "wv.json"
    data = within_volume(ball_dir, k=3, methods=["rf", "supervised"], budget_s=None, budget_steps=2,
                         out=out, limit=2, patch_size=32)
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert on_disk["protocol"] == "within-volume" and on_disk["k"] == 3 and "device" in on_disk
    for name in ("rf", "supervised"):
        m = on_disk["methods"][name]
        assert {"dice", "hd95", "asd", "train_s", "steps", "per_volume"} <= set(m)
        assert [r["name"] for r in m["per_volume"]] == ["ball0", "ball1"]
        assert all(len(r["revealed"]) == 3 for r in m["per_volume"])
    assert on_disk["methods"]["supervised"]["steps"] == 2
    assert on_disk["methods"]["rf"]["dice"] > 0.8
    md = render([out])
    assert "| rf |" in md and "| supervised |" in md
    png = dice_vs_k_plot([out], tmp_path / "k.png")
    assert png.stat().st_size > 0


def test_cohort_labels_the_chosen_volumes_and_scores_every_test_volume(ball_dir, tmp_path):
    out = tmp_path / "c.json"
    cohort(ball_dir, ball_dir, labelled=1, methods=["supervised"], budget_s=None, budget_steps=2, out=out,
           patch_size=32)
    data = json.loads(out.read_text())
    assert data["labelled_volumes"] == ["ball0"]
    assert [r["name"] for r in data["methods"]["supervised"]["per_volume"]] == ["ball0", "ball1", "ball2"]
    with pytest.raises(DataError, match="--labelled"):
        cohort(ball_dir, ball_dir, labelled=4, methods=["supervised"], budget_s=None, budget_steps=1, out=out)


def test_find_cases_and_thinnest_axis(ball_dir, tmp_path):
    cases = find_cases(ball_dir)
    assert [c.name for c in cases] == ["ball0", "ball1", "ball2"]
    assert cases[0].image.data.shape == (8, 40, 40) and thinnest_axis(cases[0].image.data.shape) == 0
    assert cases[0].reference.data.max() == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NAME.nii.gz"):
        find_cases(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        find_cases(tmp_path / "missing")


def test_dice_vs_k_series_takes_the_later_file_for_a_repeated_point(tmp_path):
    def results(name, k, methods):
        path = tmp_path / name
        path.write_text(json.dumps({"protocol": "within-volume", "k": k,
                                    "methods": {m: {"dice": d} for m, d in methods.items()}}))
        return path

    first = results("a.json", 5, {"rf": 0.7, "arco": 0.3})
    rerun = results("b.json", 5, {"arco": 0.6})
    other_k = results("c.json", 1, {"arco": 0.2, "rf": 0.5})
    cohort_file = tmp_path / "d.json"
    cohort_file.write_text(json.dumps({"protocol": "cohort", "methods": {"arco": {"dice": 0.9}}}))
    series = dice_vs_k_series([first, rerun, other_k, cohort_file])
    assert series == {"rf": {5: 0.7, 1: 0.5}, "arco": {5: 0.6, 1: 0.2}}
    table = dice_vs_k_table([first, rerun, other_k, cohort_file])
    assert table.splitlines() == ["| method | K = 1 | K = 5 |", "|---|---|---|",
                                  "| rf | 0.500 | 0.700 |", "| arco | 0.200 | 0.600 |"]
    assert dice_vs_k_table([cohort_file]) == ""

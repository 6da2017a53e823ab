"""The CLI end to end on the bundled sample, and its one-line errors."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_semicl.cli import main
from napari_semicl.data.reveal import reveal_slices
from napari_semicl.io import write_labels
from napari_semicl.io.sample import SAMPLE_IMAGE_FILE, load_sample_volume, sample_data_dir


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory):
    """The sample image path, a 'painted' file with two revealed slices, and the reference."""
    folder = tmp_path_factory.mktemp("sample")
    image, reference = load_sample_volume()
    painted = reveal_slices(reference.data, [30, 50], 0)
    return {
        "image": sample_data_dir() / SAMPLE_IMAGE_FILE,
        "painted": write_labels(folder / "painted.nii.gz", painted, metadata=image.metadata),
        "reference": write_labels(folder / "reference.nii.gz", reference.data, metadata=image.metadata),
    }


@pytest.fixture(scope="module")
def trained(sample_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main([
        "-q", "train", "--image", str(sample_files["image"]), "--labels", str(sample_files["painted"]),
        "--method", "mean_teacher", "--iterations", "6", "--patch-size", "64", "--unpainted", "background",
        "--seed", "1", "--out", str(out),
    ])
    assert code == 0
    return out


def test_train_writes_config_checkpoint_prediction_and_metrics(trained, sample_files):
    for name in ("config.json", "checkpoint.pt", "prediction.nii.gz", "metrics.json"):
        assert (trained / name).is_file(), name
    src = nib.load(sample_files["image"])
    pred = nib.load(trained / "prediction.nii.gz")
    assert pred.shape == src.shape
    np.testing.assert_allclose(pred.affine, src.affine)
    assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 3}
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["seconds"] > 0 and metrics["device"] == "cpu"
    assert {"ce", "dice", "consistency", "total"} <= set(metrics["losses"])
    config = json.loads((trained / "config.json").read_text())
    assert config["method"] == "mean_teacher" and config["data"]["class_values"] == [0, 1, 2, 3]


def test_predict_and_entropy_keep_geometry(trained, sample_files, tmp_path):
    mask, ent = tmp_path / "mask.nii.gz", tmp_path / "entropy.nii.gz"
    code = main(["-q", "predict", "--checkpoint", str(trained / "checkpoint.pt"), "--image",
                 str(sample_files["image"]), "--out", str(mask), "--entropy", str(ent)])
    assert code == 0
    src = nib.load(sample_files["image"])
    for path in (mask, ent):
        img = nib.load(path)
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine)
    values = np.asanyarray(nib.load(ent).dataobj)
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
    # the same checkpoint predicts what train wrote
    assert np.array_equal(np.asanyarray(nib.load(mask).dataobj), np.asanyarray(nib.load(trained / "prediction.nii.gz").dataobj))


def test_predict_suggest_ranks_slices_by_mean_entropy(trained, sample_files, tmp_path, capsys):
    from napari_semicl.analysis import slice_means
    from napari_semicl.io import read_image

    ent = tmp_path / "entropy.nii.gz"
    capsys.readouterr()
    code = main(["-q", "predict", "--checkpoint", str(trained / "checkpoint.pt"), "--image",
                 str(sample_files["image"]), "--out", str(tmp_path / "mask.nii.gz"), "--entropy", str(ent),
                 "--suggest", "5"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    ranked = result["annotate_next"]
    assert len(ranked) == 5
    means = slice_means(read_image(ent).data, result["axis"])
    assert [r["slice"] for r in ranked] == list(np.argsort(-means, kind="stable")[:5])
    assert ranked[0]["mean_entropy"] == pytest.approx(means.max(), abs=1e-5)


def test_evaluate_prints_monai_metrics(trained, sample_files, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(trained / "prediction.nii.gz"), "--reference", str(sample_files["reference"])]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["classes"]) == {"1", "2", "3"}
    assert 0 <= result["mean"]["dice"] <= 1
    assert result["spacing"] == [2.0, 2.0, 2.0]
    # a perfect prediction
    assert main(["evaluate", "--pred", str(sample_files["reference"]), "--reference", str(sample_files["reference"])]) == 0
    perfect = json.loads(capsys.readouterr().out)
    assert perfect["mean"] == {"dice": 1.0, "hd95": 0.0, "asd": 0.0}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--image", "missing.nii.gz", "--out", "{tmp}/o"], "missing.nii.gz"),
        (["predict", "--checkpoint", "{tmp}/none.pt", "--image", "{image}", "--out", "{tmp}/m.nii.gz"], "does not exist"),
        (["train", "--image", "{image}", "--labels", "{empty}", "--out", "{tmp}/o"], "no labelled slice"),
        (["train", "--image", "{image}", "--labels", "{small}", "--out", "{tmp}/o"], "shape"),
        (["train", "--image", "{image}", "--labels", "{painted}", "--config", "{badcfg}", "--out", "{tmp}/o"], "unknown key(s): learning_rate"),
    ],
)
def test_errors_are_one_line_and_exit_2(argv, fragment, sample_files, tmp_path, capsys):
    empty = write_labels(tmp_path / "empty.nii.gz", np.zeros((80, 94, 77), np.uint8),
                         metadata=load_sample_volume()[0].metadata)
    small = write_labels(tmp_path / "small.nii.gz", np.ones((4, 4, 4), np.uint8))
    badcfg = tmp_path / "bad.json"
    badcfg.write_text(json.dumps({"learning_rate": 1}))
    fill = {"tmp": tmp_path, "image": sample_files["image"], "empty": empty, "small": small,
            "painted": sample_files["painted"], "badcfg": badcfg}
    capsys.readouterr()
    code = main(["-q", *[a.format(**fill) for a in argv]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("napari-semicl: error:") and fragment in err[0], err


def test_predict_never_overwrites_silently(trained, sample_files, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(b"precious")
    code = main(["-q", "predict", "--checkpoint", str(trained / "checkpoint.pt"), "--image",
                 str(sample_files["image"]), "--out", str(mask)])
    assert code == 2 and mask.read_bytes() == b"precious"
    assert "already exists" in capsys.readouterr().err


def test_console_script_demo_runs_the_whole_loop(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "napari_semicl.cli", "demo", "--out", str(out), "--iterations", "3", "--reveal", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"mask written to {out / 'prediction.nii.gz'}" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["revealed_slices"]) == 2 and "dice" in metrics["unrevealed_scores"]["mean"]

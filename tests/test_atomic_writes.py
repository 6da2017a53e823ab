"""One atomic write (``io.atomic.atomic_path``) under every file the package replaces.

Each writer is made to fail halfway through; the file (or folder) that was there before must
be left as it was, with no temporary file beside it.
"""

from __future__ import annotations

import ast
import json
import pathlib

import numpy as np
import pytest
import torch

import napari_semicl
from napari_semicl import cli
from napari_semicl.bench.common import ResultsFile
from napari_semicl.engine import load_checkpoint, save_checkpoint
from napari_semicl.io.errors import WriteError
from napari_semicl.io import atomic_path
from napari_semicl.io.atomic import write_json
from napari_semicl.io.wsi import write_pyramid

PACKAGE = pathlib.Path(napari_semicl.__file__).parent


def _names(folder: pathlib.Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


class _Boom(RuntimeError):
    pass


class _FailingLevel:
    """A level that reads like a numpy array until its second row of tiles."""

    def __init__(self, array: np.ndarray, tile: int) -> None:
        self.array, self.tile = array, tile
        self.shape, self.dtype = array.shape, array.dtype

    def __getitem__(self, key):
        if key[0].start >= self.tile:
            raise _Boom("the source went away")
        return self.array[key]


def test_atomic_path_folder_replaces_the_old_folder_only_on_success(tmp_path):
    target = tmp_path / "group.zarr"
    with atomic_path(target, directory=True) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.endswith(".zarr")
        (tmp / "a").write_text("old")
    assert (target / "a").read_text() == "old"

    with pytest.raises(_Boom), atomic_path(target, directory=True) as tmp:
        (tmp / "a").write_text("half")
        raise _Boom
    assert (target / "a").read_text() == "old"
    assert _names(tmp_path) == {"group.zarr"}

    with atomic_path(target, directory=True) as tmp:
        (tmp / "b").write_text("new")
    assert _names(target) == {"b"}
    assert _names(tmp_path) == {"group.zarr"}

    with pytest.raises(FileExistsError):
        with atomic_path(target, directory=True, overwrite=False):
            pass
    assert _names(tmp_path) == {"group.zarr"}


def test_failed_checkpoint_leaves_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model.pt", {"weights": torch.ones(3)})
    before = path.read_bytes()

    def half_then_fail(obj, f, *args, **kwargs):
        pathlib.Path(f).write_bytes(b"half a checkpoint")
        raise _Boom("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(_Boom):
        save_checkpoint(path, {"weights": torch.zeros(3)})
    assert path.read_bytes() == before
    assert _names(tmp_path) == {"model.pt"}
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["weights"], torch.ones(3))


@pytest.mark.parametrize("name", ["he.ome.tif", "he.zarr"])
def test_failed_pyramid_leaves_the_old_one(tmp_path, name):
    tile = 16
    first = np.full((2 * tile, 2 * tile), 7, np.uint8)
    path = write_pyramid(tmp_path / name, [first], tile=tile)
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    content = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    with pytest.raises(_Boom):
        write_pyramid(path, [_FailingLevel(np.zeros_like(first), tile)], tile=tile, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == content

    with pytest.raises(WriteError, match="exists"):
        write_pyramid(path, [first], tile=tile)
    second = write_pyramid(path, [np.zeros_like(first)], tile=tile, overwrite=True)
    assert _names(tmp_path) == {name} and second == path


def test_failed_results_write_leaves_the_old_file(tmp_path):
    out = tmp_path / "results.json"
    res = ResultsFile(out, {"protocol": "p"})
    before = out.read_text()
    res.data["bad"] = object()  # not JSON: the write fails after the temporary file exists
    with pytest.raises(TypeError):
        res.write()
    assert out.read_text() == before
    assert _names(tmp_path) == {"results.json"}
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others, as results are shared


def test_failed_json_write_leaves_the_old_file(tmp_path):
    """``io.atomic.write_json``, the CLI's metrics.json writer (the CLI's own cases:
    tests/test_cli_package.py, a disk that fills halfway through metrics.json)."""
    out = tmp_path / "metrics.json"
    write_json(out, {"dice": 0.5})
    with pytest.raises(TypeError):
        write_json(out, {"dice": object()})
    assert json.loads(out.read_text()) == {"dice": 0.5}
    assert _names(tmp_path) == {"metrics.json"}


def _crash_halfway(monkeypatch, name: str) -> list[str]:
    """Every ``Path.write_text`` of a file whose name contains ``name`` writes half its text and
    then fails, as a killed process or a full disk would; returns the names it was asked to write."""
    real = pathlib.Path.write_text
    crashed: list[str] = []

    def write_text(self, data, *args, **kwargs):
        if name not in self.name:
            return real(self, data, *args, **kwargs)
        crashed.append(self.name)
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise _Boom(f"killed halfway through writing {self.name}")

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    return crashed


def test_train_on_a_slide_killed_while_writing_metrics_leaves_the_old_file(tmp_path, monkeypatch):
    """``train`` on a whole-slide image replaces metrics.json in one step: killed halfway
    through the write, the previous run's file is there byte for byte, and no temporary file."""
    from napari_semicl.bench.slides import write_mosaic_slide

    cell = 128
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 255, (cell, cell, 3), dtype=np.uint8) for _ in range(2)]
    slide = write_mosaic_slide(tmp_path / "slide.ome.tif", tiles, np.array([[0, 1]]), tile=cell)
    painted = np.zeros((cell, 2 * cell), np.uint8)
    painted[:, :cell] = 1
    painted[32:96, 32:96] = 2
    labels = write_pyramid(tmp_path / "painted.ome.tif", [painted], tile=cell, labels=True)
    out = tmp_path / "run"
    out.mkdir()
    previous = json.dumps({"dice": 0.5, "from": "the previous run"}, indent=2) + "\n"
    (out / "metrics.json").write_text(previous)

    crashed = _crash_halfway(monkeypatch, "metrics")
    try:
        rc = cli.main(["-q", "train", "--image", str(slide), "--labels", str(labels), "--iterations", "1",
                       "--patch-size", "64", "--tile-size", str(cell), "--out", str(out)])
    except _Boom:
        rc = None
    assert crashed, "the run never wrote metrics.json (so the crash was not simulated)"
    assert rc != 0
    monkeypatch.undo()
    assert (out / "metrics.json").read_text() == previous
    assert not [p.name for p in out.iterdir() if "metrics" in p.name and p.name != "metrics.json"]
    assert (out / "checkpoint.pt").exists()  # the run itself got that far


def test_only_io_atomic_renames_files():
    """No module but io/atomic.py replaces files itself (``os.replace``/``os.rename``/``mkstemp``)."""
    offenders = []
    for module in sorted(PACKAGE.rglob("*.py")):
        if module == PACKAGE / "io" / "atomic.py":
            continue
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in {"replace", "rename", "mkstemp"}:
                if isinstance(node.value, ast.Name) and node.value.id in {"os", "tempfile"}:
                    offenders.append(f"{module.relative_to(PACKAGE)}:{node.lineno} {node.value.id}.{node.attr}")
    assert not offenders, "use napari_semicl.io.atomic.atomic_path instead: " + ", ".join(offenders)

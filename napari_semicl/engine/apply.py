"""Apply a trained network to new images: the engine under the "Apply model" dock and
``napari-semicl predict``.

A :class:`Predictor` is a network with the config it was trained under (slicing axis,
normalisation, 2.5D context, class table and names), from a checkpoint file
(:meth:`Predictor.from_checkpoint`) or from a trainer in memory (:meth:`Predictor.from_trainer`,
a copy of its predicting network, so that training may go on meanwhile). It checks that an
image fits the network before predicting (:meth:`Predictor.check_image`): grey against RGB,
2D against the volumes a 2.5D network needs, more than three spatial axes.

:func:`predict_file` reads one image file, predicts it and writes the mask (and on request
the entropy map) with the source geometry; :func:`predict_files` does so for many files into
one folder, naming each mask ``<name>_mask`` with :func:`mask_path`.

Examples
--------
>>> predictor = Predictor.from_checkpoint("run/checkpoint.pt")        # doctest: +SKIP
>>> prediction = predictor.predict(volume, with_entropy=True)          # doctest: +SKIP
>>> results = predict_files(predictor, ["a.nii.gz", "b.nii.gz"], "masks")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, SemiclError
from ..io import ImageData, read_image, write_image, write_labels
from .config import TrainConfig
from .inference import Prediction, predict_volume
from .persistence import load_predictor
from .postprocess import finish_prediction

log = logging.getLogger(__name__)

#: File name endings taken off an image's name to name its mask (longest first).
IMAGE_SUFFIXES = (".ome.tiff", ".ome.tif", ".nii.gz", ".nii", ".tiff", ".tif", ".png", ".jpeg", ".jpg")
#: Mask format by source format: NIfTI sources get NIfTI masks (their geometry), others TIFF.
MASK_SUFFIX = {"nifti": ".nii.gz"}
DEFAULT_MASK_SUFFIX = ".tif"

_KIND = {1: "grey", 3: "RGB"}


def read_input_image(path: str | Path) -> ImageData:
    """An image file, or a folder of equal-size tiles as a stack (one tile per slice)."""
    from ..io.wsi import read_tile_folder

    path = str(path)
    return read_tile_folder(path) if Path(path).is_dir() and not path.rstrip("/").endswith(".zarr") else read_image(path)


@dataclass
class Predictor:
    """A trained network ready to predict images like the ones it was trained on.

    Attributes
    ----------
    model : torch.nn.Module
        The predicting network (the teacher when the method has one), on ``device``.
    config : TrainConfig
        The config it was trained under: ``data.axis``, ``data.normalise``,
        ``data.context_slices``, ``data.class_values`` and ``data.class_names`` are used.
    device : torch.device
    source : str
        Where it came from, for messages ("the current run", a checkpoint path).
    """

    model: torch.nn.Module
    config: TrainConfig
    device: torch.device
    source: str = ""
    #: whether ``model`` is a live trainer's own network (:meth:`Trainer.predictor`), which
    #: training goes on changing: :meth:`from_trainer` then copies it
    shared: bool = False

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: torch.device | None = None) -> Predictor:
        """Load a checkpoint (plain data only: an untrusted file raises CheckpointError)."""
        model, config = load_predictor(path, device=device)
        return cls(model, config, next(model.parameters()).device, str(path))

    @classmethod
    def from_trainer(cls, trainer) -> Predictor:
        """A copy of ``trainer``'s predicting network and config, independent of it (the
        trainer may train on while this one predicts). Take it between steps (not while a
        step runs in another thread). A run on several devices (``DistributedRun``) gives its
        last checkpoint's (its :meth:`predictor` loads it)."""
        predictor = trainer.predictor()
        return predictor.copy() if predictor.shared else predictor

    def copy(self) -> Predictor:
        """A frozen copy of the network and the config, sharing nothing with the original."""
        model = copy.deepcopy(self.model).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return Predictor(model, copy.deepcopy(self.config), self.device, self.source)

    # --- what the network expects ----------------------------------------------------------
    @property
    def class_values(self) -> list[int]:
        return [int(v) for v in self.config.data.class_values]

    @property
    def class_names(self) -> dict[int, str]:
        """Label value -> name, for the values the config names."""
        return {int(v): str(n) for v, n in (self.config.data.class_names or {}).items() if str(n)}

    @property
    def needs_volumes(self) -> bool:
        """Whether the network is 2.5D (trained on volumes, each slice with neighbours as
        channels): it then predicts 3D volumes only (a 3D network, ``model.spatial_dims =
        3``, too: :meth:`check_image` says so)."""
        context = int(self.config.data.context_slices)
        return context > 0 and int(self.config.model.in_channels) % (2 * context + 1) == 0

    @property
    def channels(self) -> int:
        """Channels of one slice of the images it was trained on (1 grey, 3 RGB)."""
        n = int(self.config.model.in_channels)
        return n // (2 * int(self.config.data.context_slices) + 1) if self.needs_volumes else n

    def check_image(self, shape: tuple[int, ...], *, rgb: bool = False) -> None:
        """Raise :class:`DataError`, with what to do, unless an image of ``shape`` fits.

        ``shape`` is the array shape (with the RGB axis last when ``rgb``).
        """
        spatial = len(shape) - (1 if rgb else 0)
        if spatial not in (2, 3):
            raise DataError(
                f"the image has {spatial} spatial axes {tuple(shape)}: apply the network to a 2D image or a "
                "3D volume (split time series or channels into separate images first)"
            )
        have = 3 if rgb else 1
        if have != self.channels:
            want = _KIND.get(self.channels, f"{self.channels}-channel")
            raise DataError(
                f"the network was trained on {want} images but this image is {_KIND[have]}: "
                "apply it to images like the ones it was trained on"
            )
        if spatial == 2 and int(self.config.model.spatial_dims) == 3:
            raise DataError("the network is 3D (trained on volume patches): it predicts 3D volumes, and this image is 2D")
        if spatial == 2 and self.needs_volumes:
            raise DataError(
                f"the network is 2.5D (each slice with {self.config.data.context_slices} neighbour(s) on either "
                "side): it predicts 3D volumes, and this image is 2D"
            )
        if spatial == 3 and not 0 <= self.config.data.axis < 3:
            raise DataError(f"the network slices along axis {self.config.data.axis}: a volume has axes 0, 1, 2")

    def predict(self, image: np.ndarray, *, rgb: bool = False, with_entropy: bool = False,
                batch_size: int = 8) -> Prediction:
        """Label map (label values, the image's spatial shape) and optional normalised entropy."""
        image = np.asarray(image)
        self.check_image(image.shape, rgb=rgb)
        d = self.config.data
        return finish_prediction(predict_volume(
            self.model, image, class_values=self.class_values, axis=d.axis, rgb=rgb, normalise=d.normalise,
            device=self.device, batch_size=batch_size, with_entropy=with_entropy,
            context_slices=d.context_slices if self.needs_volumes else 0,
            adapt_batch_norm=bool(getattr(self.config.predict, "adapt_batch_norm", False)),
        ), self.config.predict)


# --- files -------------------------------------------------------------------------------------
def image_stem(path: str | Path) -> str:
    """``path``'s name without its image suffix ('case_01.nii.gz' -> 'case_01')."""
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def mask_path(image_path: str | Path, out_dir: str | Path, *, fmt: str | None = None,
              suffix: str | None = None) -> Path:
    """``out_dir/<name>_mask<suffix>``: ``.nii.gz`` for NIfTI sources (``fmt`` 'nifti', else
    guessed from the name), ``.tif`` otherwise, unless ``suffix`` is given."""
    if suffix is None:
        if fmt is None:
            fmt = "nifti" if str(image_path).lower().endswith((".nii", ".nii.gz")) else "other"
        suffix = MASK_SUFFIX.get(fmt, DEFAULT_MASK_SUFFIX)
    return Path(out_dir) / f"{image_stem(image_path)}_mask{suffix}"


@dataclass
class FileResult:
    """What :func:`predict_file` did with one image file."""

    image: Path
    mask: Path | None = None
    entropy_map: Path | None = None
    shape: tuple[int, ...] = ()
    error: str | None = None
    prediction: Prediction | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None


def predict_file(
    predictor: Predictor,
    image_path: str | Path,
    out: str | Path,
    *,
    entropy: str | Path | None = None,
    with_entropy: bool = False,
    overwrite: bool = False,
) -> FileResult:
    """Read ``image_path``, predict it and write the mask to ``out`` (and the normalised
    entropy map to ``entropy``) with the source geometry (NIfTI affine and header, axis order).

    Raises
    ------
    SemiclError
        The image does not fit the network, cannot be read, or ``out`` exists without
        ``overwrite``.
    """
    img = read_input_image(image_path)
    pred = predictor.predict(img.data, rgb=img.rgb, with_entropy=with_entropy or entropy is not None)
    path = write_labels(Path(out), pred.labels, metadata=img.metadata, overwrite=overwrite)
    log.info("mask of %s written to %s", img.name, path)
    epath = None
    if entropy is not None:
        epath = write_image(Path(entropy), pred.entropy, metadata=img.metadata, overwrite=overwrite)
    return FileResult(Path(image_path), path, epath, tuple(pred.labels.shape), prediction=pred)


def predict_files(
    predictor: Predictor,
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    suffix: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, FileResult], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[FileResult]:
    """Predict each image file into ``out_dir/<name>_mask.nii.gz`` (NIfTI sources) or
    ``.tif`` (others; ``suffix`` forces one), with the source geometry.

    A file that fails (unreadable, does not fit the network, mask exists without
    ``overwrite``) is reported in its :class:`FileResult` and the others go on.
    ``progress(done, total, result)`` is called after each file; ``should_stop()`` is
    asked before each.
    """
    paths = [Path(p) for p in paths]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [mask_path(p, out_dir, suffix=suffix) for p in paths]
    results: list[FileResult] = []
    for i, (path, target) in enumerate(zip(paths, targets)):
        if should_stop is not None and should_stop():
            break
        if targets.count(target) > 1:
            result = FileResult(path, error=f"{target.name} would be written by several of the files: rename them")
        else:
            try:
                result = predict_file(predictor, path, target, overwrite=overwrite)
                result.prediction = None  # keep only the files, not every volume in memory
            except (SemiclError, OSError, ValueError) as exc:
                log.warning("could not predict %s: %s", path, exc)
                result = FileResult(path, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        results.append(result)
        if progress is not None:
            progress(i + 1, len(paths), result)
    return results

"""The bundled sample: a 2 mm MNI152 (ICBM 2009a) T1 brain and tissue labels.

The files live in the repository's top-level ``sample_data/`` folder (source
checkouts and editable installs). A built wheel installs them under
``<prefix>/share/napari-semicl/sample_data`` (see ``[tool.setuptools.data-files]``
in ``pyproject.toml``); a copy inside the package, ``napari_semicl/sample_data``,
is found too. ``sample_data/README.md`` gives the source, the licence notice
and how the files were derived (``sample_data/make_sample.py``).

Examples
--------
>>> from napari_semicl.io.sample import load_sample_volume, SAMPLE_CLASSES
>>> image, reference = load_sample_volume()
>>> image.data.shape == reference.data.shape
True
>>> sorted(SAMPLE_CLASSES)
[0, 1, 2, 3]
"""

from __future__ import annotations

import logging
import pathlib
import site
import sys
import sysconfig

from .readers import ImageData, read_image, read_labels

__all__ = [
    "SAMPLE_CLASSES",
    "SAMPLE_IMAGE_FILE",
    "SAMPLE_LABELS_FILE",
    "load_sample_volume",
    "sample_data_dir",
]

logger = logging.getLogger(__name__)

#: File name of the sample T1 volume.
SAMPLE_IMAGE_FILE = "mni152_t1.nii.gz"
#: File name of the sample reference labels.
SAMPLE_LABELS_FILE = "mni152_tissue.nii.gz"
#: Classes of the reference labels (0 = background, as everywhere in the package).
SAMPLE_CLASSES: dict[int, str] = {
    0: "background",
    1: "grey matter",
    2: "white matter",
    3: "CSF and other intracranial",
}

_SHARE_SUBDIR = pathlib.Path("share", "napari-semicl", "sample_data")


def _candidate_dirs() -> list[pathlib.Path]:
    """Folders that may hold the sample files, most specific first."""
    here = pathlib.Path(__file__).resolve()
    package_root = here.parents[1]  # .../napari_semicl
    candidates = [
        package_root.parent / "sample_data",  # source checkout / editable install
        package_root / "sample_data",  # copy shipped inside the package
    ]
    prefixes = [sysconfig.get_path("data"), sys.prefix, sys.exec_prefix, sys.base_prefix]
    user_base = getattr(site, "USER_BASE", None)
    if user_base:
        prefixes.append(user_base)
    for prefix in prefixes:
        if prefix:
            candidates.append(pathlib.Path(prefix) / _SHARE_SUBDIR)
    unique: list[pathlib.Path] = []
    for folder in candidates:
        if folder not in unique:
            unique.append(folder)
    return unique


def sample_data_dir() -> pathlib.Path:
    """Return the folder holding the sample files.

    Returns
    -------
    pathlib.Path
        A folder containing :data:`SAMPLE_IMAGE_FILE` and
        :data:`SAMPLE_LABELS_FILE`.

    Raises
    ------
    FileNotFoundError
        None of the known locations holds both files; the message lists the
        folders searched.
    """
    searched = _candidate_dirs()
    for folder in searched:
        if (folder / SAMPLE_IMAGE_FILE).is_file() and (folder / SAMPLE_LABELS_FILE).is_file():
            logger.debug("Sample data found in %s", folder)
            return folder
    listing = "\n  ".join(str(folder) for folder in searched)
    raise FileNotFoundError(
        f"The napari-semicl sample files ({SAMPLE_IMAGE_FILE}, {SAMPLE_LABELS_FILE}) "
        f"were not found. Searched:\n  {listing}\nReinstall napari-semicl (pip "
        "install --force-reinstall napari-semicl), or in a source checkout restore "
        "the sample_data/ folder (see sample_data/README.md)."
    )


def load_sample_volume() -> tuple[ImageData, ImageData]:
    """Load the sample T1 volume and its reference tissue labels.

    Returns
    -------
    image : ImageData
        The MNI152 2009a symmetric T1 template at 2 mm, cropped to the brain,
        ``uint8``, axes ``(k, j, i)`` (axial slices on napari's slider).
    labels : ImageData
        Tissue classes on the same grid, ``uint8``; see :data:`SAMPLE_CLASSES`.

    Raises
    ------
    FileNotFoundError
        The sample files are missing (see :func:`sample_data_dir`).
    """
    folder = sample_data_dir()
    image = read_image(folder / SAMPLE_IMAGE_FILE, kind="image")
    labels = read_labels(folder / SAMPLE_LABELS_FILE, like=image)
    return image, labels

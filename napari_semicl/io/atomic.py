"""Atomic file replacement: write a temporary file beside the target, then rename.

A reader of ``path`` sees either the old file or the complete new one, never a
half-written file, and a write that fails leaves no temporary file behind.

Examples
--------
>>> import pathlib, tempfile
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> with atomic_path(folder / "mask.nii.gz") as tmp:
...     _ = tmp.write_bytes(b"payload")     # a library would write here
>>> (folder / "mask.nii.gz").read_bytes()
b'payload'
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["atomic_path", "atomic_write", "full_suffix", "write_json"]

logger = logging.getLogger(__name__)

#: Suffixes made of two parts that libraries use to pick a format.
_DOUBLE_SUFFIXES = (".nii.gz", ".ome.tif", ".ome.tiff", ".tar.gz")


def full_suffix(path: str | os.PathLike) -> str:
    """Return the format suffix of ``path``, keeping known double suffixes.

    Parameters
    ----------
    path : str or path-like
        A file name.

    Returns
    -------
    str
        ``".nii.gz"`` for ``"brain.nii.gz"``, ``".tif"`` for ``"a.b.tif"``,
        ``""`` when the name has no suffix. The case of the name is kept.

    Examples
    --------
    >>> full_suffix("case.001.nii.gz")
    '.nii.gz'
    >>> full_suffix("stack.TIF")
    '.TIF'
    """
    name = pathlib.Path(path).name
    lower = name.lower()
    for double in _DOUBLE_SUFFIXES:
        if lower.endswith(double) and len(name) > len(double):
            return name[-len(double) :]
    return pathlib.Path(name).suffix


def _current_umask() -> int:
    """The process umask (read once, at import)."""
    # os.umask can only be read by setting it; restore it at once.
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _current_umask()
_NEW_FILE_MODE = 0o666 & ~_UMASK


def _remove(path: pathlib.Path) -> None:
    """Delete a file or a folder tree; nothing if it is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace_folder(tmp: pathlib.Path, path: pathlib.Path) -> None:
    """Rename the folder ``tmp`` onto ``path``, moving an existing ``path`` aside first."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    os.rmdir(aside)  # only the unique name is wanted
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    _remove(aside)


def _fsync_file(path: pathlib.Path) -> None:
    with open(path, "rb+") as handle:
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename durable; not possible (nor needed) on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - exotic file systems
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(fd)


def _refuse_existing(path: pathlib.Path) -> None:
    if path.exists():
        raise FileExistsError(
            f"{path} already exists and was left untouched. Pass overwrite=True "
            "to replace it, or choose another file name."
        )


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = True, directory: bool = False
) -> Iterator[pathlib.Path]:
    """Yield a temporary path to write to; move it onto ``path`` on success.

    The temporary file lies in the same folder as ``path`` (so that the final
    :func:`os.replace` is atomic) and keeps the format suffix of ``path``
    (``.nii.gz``, ``.tif``, ...) so that libraries that choose the format from
    the name write the right one. When the ``with`` block exits normally the
    temporary file is flushed to disk, then renamed onto ``path``. When it
    raises (any exception, ``KeyboardInterrupt`` included) the temporary file
    is removed and an existing file at ``path`` is left untouched.

    Parameters
    ----------
    path : str or path-like
        The final file. Its folder must exist.
    overwrite : bool, optional
        If False, raise :class:`FileExistsError` when ``path`` exists
        (checked before writing and again just before the rename).
    directory : bool, optional
        Write a folder (an OME-Zarr group, say) rather than a file. The
        temporary folder is renamed onto ``path``; an existing ``path`` is
        first moved aside and deleted only once the new folder is in place
        (two renames, so not atomic, but never a half-written ``path``; a
        failure between them puts the old one back).

    Yields
    ------
    pathlib.Path
        The temporary file (or folder), already created (empty) so that its
        name is reserved.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    FileNotFoundError
        The folder of ``path`` does not exist.
    """
    path = pathlib.Path(path)
    folder = path.parent
    if not overwrite:
        _refuse_existing(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Cannot write {path}: the folder {folder} does not exist. Create it "
            "first or choose another location."
        )
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    if directory:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder))
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)
        os.close(fd)
        tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        if not overwrite:
            _refuse_existing(path)
        if directory:
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private
            _replace_folder(tmp, path)
        else:
            _fsync_file(tmp)
            if path.exists():
                mode = path.stat().st_mode & 0o7777
            else:
                mode = _NEW_FILE_MODE
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_folder(folder)
    logger.debug("Wrote %s atomically", path)


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[pathlib.Path], object],
    *,
    overwrite: bool = True,
    directory: bool = False,
) -> pathlib.Path:
    """Call ``write_fn(tmp_path)`` and move the result onto ``path`` atomically.

    Parameters
    ----------
    path : str or path-like
        The final file.
    write_fn : callable
        ``write_fn(tmp_path)`` writes the complete file at ``tmp_path`` (a
        :class:`pathlib.Path` with the same suffix as ``path``). Its return
        value is ignored.
    overwrite : bool, optional
        If False, refuse to replace an existing ``path``.
    directory : bool, optional
        ``write_fn`` writes a folder (see :func:`atomic_path`).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.

    See Also
    --------
    atomic_path : the context manager this wraps.
    """
    path = pathlib.Path(path)
    with atomic_path(path, overwrite=overwrite, directory=directory) as tmp:
        write_fn(tmp)
    return path


def write_json(path: str | os.PathLike, data, *, overwrite: bool = True) -> pathlib.Path:
    """Write ``data`` as indented JSON (ending in a newline) to ``path`` atomically.

    Data that is not JSON (a ``TypeError`` from :func:`json.dumps`) leaves an existing
    ``path`` untouched and no temporary file behind.
    """
    text = json.dumps(data, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)

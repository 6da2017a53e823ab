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
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator

__all__ = ["atomic_path", "atomic_write", "full_suffix"]

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


def _default_file_mode() -> int:
    """The mode a newly created file gets under the current umask."""
    # os.umask can only be read by setting it; restore it at once.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _default_file_mode()


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
    path: str | os.PathLike, *, overwrite: bool = True
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

    Yields
    ------
    pathlib.Path
        The temporary file, already created (empty) so that its name is
        reserved.

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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        _fsync_file(tmp)
        if path.exists():
            mode = path.stat().st_mode & 0o7777
        else:
            mode = _NEW_FILE_MODE
        os.chmod(tmp, mode)
        if not overwrite:
            _refuse_existing(path)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_folder(folder)
    logger.debug("Wrote %s atomically", path)


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[pathlib.Path], object],
    *,
    overwrite: bool = True,
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
    with atomic_path(path, overwrite=overwrite) as tmp:
        write_fn(tmp)
    return path

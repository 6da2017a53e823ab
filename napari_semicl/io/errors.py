"""Exceptions raised by :mod:`napari_semicl.io`.

Both derive from :class:`ValueError` so that callers that only know about
``ValueError`` still catch them; the widget layer turns them into napari
notifications. Every message names the file concerned and says what the user
can do about it.
"""

from __future__ import annotations

from ..errors import SemiclError

__all__ = ["ReadError", "WriteError"]


class ReadError(SemiclError, ValueError):
    """A file could not be read: unreadable, truncated or unsupported.

    The message names the file and says what to do (for example which formats
    are supported, or which axis of a 4D volume to split).
    """


class WriteError(SemiclError, ValueError):
    """Labels could not be written: unsupported format or unsuitable data.

    The message names the target file and says what to do (for example which
    extensions are supported).
    """

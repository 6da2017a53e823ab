"""``python -m napari_semicl``: the same command line as the ``napari-semicl`` script.

Useful where the script is not on the PATH (a pyenv Python before ``pyenv rehash``, a
user install whose scripts folder is not on the PATH).
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

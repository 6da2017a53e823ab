"""Reading images and label maps, writing masks, and the bundled sample.

Everything here works on numpy arrays and plain dicts; nothing imports napari
or Qt (the npe2 glue in :mod:`napari_semicl.io._npe2` returns plain LayerData
tuples).
"""

from .atomic import atomic_path, atomic_write
from .errors import ReadError, WriteError
from .readers import ImageData, is_labels_file, read_image, read_labels
from .sample import load_sample_volume, sample_data_dir
from .writers import write_image, write_labels

__all__ = [
    "ImageData",
    "ReadError",
    "WriteError",
    "atomic_path",
    "atomic_write",
    "is_labels_file",
    "load_sample_volume",
    "read_image",
    "read_labels",
    "sample_data_dir",
    "write_image",
    "write_labels",
]

"""The annotation model and the datasets built from snapshots of image/labels pairs."""

from .annotation import (
    IGNORE_INDEX,
    UNLABELLED,
    AnnotatedPair,
    build_class_table,
    decode_classes,
    decoded_dtype,
    encode_targets,
    labelled_slice_indices,
)
from .dataset import Batch, SliceDataset, normalise_image, to_slices

__all__ = [
    "IGNORE_INDEX",
    "UNLABELLED",
    "AnnotatedPair",
    "Batch",
    "SliceDataset",
    "build_class_table",
    "decode_classes",
    "decoded_dtype",
    "encode_targets",
    "labelled_slice_indices",
    "normalise_image",
    "to_slices",
]

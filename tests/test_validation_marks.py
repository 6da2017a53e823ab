"""engine.validation.ValidationMarks: one mark per slice, keyed by a stable image key."""

from napari_semicl.engine.validation import ValidationMarks


def test_one_mark_per_slice_unmark_and_rename():
    marks = ValidationMarks()
    marks.mark("k1", "t1", 14)
    marks.mark("k1", "t1", 14)
    marks.mark("k1", "t1", 3)
    marks.mark("k2", "t2", 0)
    assert marks.slices("k1") == [3, 14]
    assert marks.describe() == "t1: 3, 14; t2: 0"
    assert marks.unmark("k1", 14) and not marks.unmark("k1", 14)
    assert marks.slices("k1") == [3] and marks.slices("unknown") == []
    marks.rename("k1", "t1 renamed")
    assert marks.describe({"k1"}) == "t1 renamed: 3"
    marks.unmark("k1", 3)
    assert marks.describe({"k1"}) == "none"

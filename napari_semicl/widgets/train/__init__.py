"""The "Train (semi-supervised)" dock as a small package: a Qt-free model of the run
(:mod:`.model`) and thin Qt views (:mod:`.pairs`, :mod:`.form`, :mod:`.controller`,
:mod:`.presenter`, :mod:`.marks`, :mod:`.prior`) that :mod:`.dock` assembles.

``TrainWidget`` is imported on first use, so that ``import napari_semicl.widgets.train.model``
loads no Qt.
"""

__all__ = ["TrainWidget"]


def __getattr__(name: str):
    if name == "TrainWidget":
        from .dock import TrainWidget

        return TrainWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

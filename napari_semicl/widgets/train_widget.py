"""The Train dock's old import path: the dock is now the :mod:`napari_semicl.widgets.train`
package (kept for scripts written against ``napari_semicl.widgets.train_widget``)."""

from .train import TrainWidget

__all__ = ["TrainWidget"]

"""Networks: the 2D U-Net backbone shared by every method."""

from .heads import ProjectionHead
from .unet import UNet2D, build_model

__all__ = ["ProjectionHead", "UNet2D", "build_model"]

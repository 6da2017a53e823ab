"""Networks: the 2D U-Net backbone shared by every method."""

from .unet import UNet2D, build_model

__all__ = ["UNet2D", "build_model"]

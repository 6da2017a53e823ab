"""Networks: the 2D U-Net backbone shared by every method."""

from .heads import AleatoricHead, ProjectionHead
from .unet import UNet2D, build_model

__all__ = ["AleatoricHead", "ProjectionHead", "UNet2D", "build_model"]

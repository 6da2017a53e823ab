"""Networks: the U-Net backbones (2D slices, 3D patches) shared by every method, and heads."""

from .heads import AleatoricHead, ProjectionHead
from .unet import UNet2D, UNet3D, build_model

__all__ = ["AleatoricHead", "ProjectionHead", "UNet2D", "UNet3D", "build_model"]

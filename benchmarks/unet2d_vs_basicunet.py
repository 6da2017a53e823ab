"""CPU seconds of one forward + backward pass: the hand-written UNet2D against MONAI's BasicUNet
in 2D with the same stage widths (docs/methods/three_d.md, why the 2D network stays UNet2D).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/unet2d_vs_basicunet.py
"""

from __future__ import annotations

import time

import torch
from monai.networks.nets import BasicUNet

from napari_semicl.models import UNet2D


def main() -> None:
    torch.set_num_threads(1)
    x = torch.rand(4, 1, 128, 128)
    widths = (16, 32, 64, 128, 256, 16)
    nets = {
        "UNet2D (ours, b=16, depth 4)": UNet2D(1, 2),
        "BasicUNet 2D, same widths, instance norm": BasicUNet(2, 1, 2, features=widths, dropout=0.1),
        "BasicUNet 2D, same widths, batch norm": BasicUNet(2, 1, 2, features=widths, dropout=0.1, norm="batch"),
    }
    for name, net in nets.items():
        net.train()
        for _ in range(2):
            net(x).sum().backward()
        t = time.process_time()
        for _ in range(5):
            net(x).sum().backward()
        print(f"{name}: {(time.process_time() - t) / 5:.3f} CPU-s per forward+backward (4 x 128^2)", flush=True)


if __name__ == "__main__":
    main()

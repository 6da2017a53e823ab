"""A per-class FIFO memory bank of embeddings (keys kept across steps, checkpointed).

Used by Semi-AGCL for its hard negatives (Eq. 6 draws from "a memory bank Q"). Layout:
(K, size, D) storage, a fill count and a write pointer per class; the state round-trips
through :meth:`ClassMemoryBank.state_dict` (tensors only, safe for ``torch.load`` with
``weights_only=True``) in the same format as PLGCL's queue ('queue', 'queue_len',
'queue_ptr').
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError


class ClassMemoryBank:
    """``size`` embeddings per class, oldest overwritten first.

    Parameters
    ----------
    n_classes : int
        K.
    size : int
        Keys kept per class (0: the bank stays empty).
    dim : int
        Embedding dimension D.
    device : torch.device
        Where the keys live.
    name : str
        Used in error messages ("the AGCL memory bank ...").
    """

    def __init__(self, n_classes: int, size: int, dim: int, device, *, name: str = "memory bank") -> None:
        self.name = name
        self.device = torch.device(device)
        self.keys = torch.zeros(n_classes, size, dim, device=self.device)
        self.length = torch.zeros(n_classes, dtype=torch.long)
        self.pointer = torch.zeros(n_classes, dtype=torch.long)

    @property
    def n_classes(self) -> int:
        return self.keys.shape[0]

    @property
    def size(self) -> int:
        return self.keys.shape[1]

    def __len__(self) -> int:
        return int(self.length.sum())

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored keys (M, D) and their classes (M,) long, class by class."""
        keys, classes = [], []
        for c in range(self.n_classes):
            n = int(self.length[c])
            if n:
                keys.append(self.keys[c, :n])
                classes.append(torch.full((n,), c, dtype=torch.long, device=self.device))
        if not keys:
            return self.keys.new_zeros(0, self.keys.shape[-1]), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(keys), torch.cat(classes)

    @torch.no_grad()
    def push(self, keys: torch.Tensor, classes: torch.Tensor, generator: torch.Generator) -> None:
        """Store (M, D) ``keys`` of ``classes`` (M,); FIFO per class.

        When a class brings more keys than fit, a random subset (drawn with ``generator``,
        a CPU generator) is kept.
        """
        size = self.size
        if size == 0:
            return
        for c in range(self.n_classes):
            new = keys[classes == c].detach()
            m = new.shape[0]
            if m == 0:
                continue
            if m > size:
                new = new[torch.randperm(m, generator=generator)[:size].to(new.device)]
                m = size
            pos = (int(self.pointer[c]) + torch.arange(m)) % size
            self.keys[c, pos.to(self.device)] = new.to(self.keys.dtype)
            self.pointer[c] = (int(self.pointer[c]) + m) % size
            self.length[c] = min(int(self.length[c]) + m, size)

    def state_dict(self) -> dict:
        return {"queue": self.keys.detach().cpu().clone(), "queue_len": self.length.clone(), "queue_ptr": self.pointer.clone()}

    def load_state_dict(self, state: dict, *, hint: str = "") -> None:
        """Restore :meth:`state_dict`; CheckpointError when the shape does not match."""
        keys = state.get("queue")
        if keys is None or tuple(keys.shape) != tuple(self.keys.shape):
            got = None if keys is None else tuple(keys.shape)
            raise CheckpointError(
                f"the {self.name} in the checkpoint has shape {got}, this run needs "
                f"{tuple(self.keys.shape)}{f' ({hint})' if hint else ''}"
            )
        self.keys = keys.to(self.device).clone()
        self.length = state["queue_len"].clone().long()
        self.pointer = state["queue_ptr"].clone().long()

"""Training on several processes under ``torchrun``: every distributed piece, in one place.

The one training loop (:class:`~napari_semicl.engine.trainer.Trainer`) calls this module
at a few points and is otherwise the same with one process or many:

- construction: :func:`setup` joins the process group that ``torchrun`` describes in the
  environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): NCCL on
  CUDA (one GPU per local rank), gloo on the CPU. Without ``torchrun`` (``WORLD_SIZE``
  unset or 1) it returns :data:`SINGLE`, whose every call does nothing: no process group, no
  wrapper, the single-process behaviour unchanged.
- seeding: the network is built from the config's seed on every rank (the same weights
  everywhere); the crops and augmentations then come from :meth:`Distributed.rank_streams`,
  one stream per rank (no two ranks draw the same crops).
- the step: :meth:`Distributed.wrap` puts the student *and* the method's trainable heads
  under one :class:`~torch.nn.parallel.DistributedDataParallel`, whose forward is the
  method's whole loss computation (:class:`LossModule`). Methods keep calling their plain
  ``self.student`` (twice a step, with ``return_features=True``, ...); DDP averages the
  gradients of every parameter the losses reached. The EMA teachers read the plain
  student, whose weights DDP keeps equal on every rank.
- between steps: :meth:`Distributed.agree` is one small all-reduce that makes every rank
  leave at the same step (a stop asked on any rank, in practice rank 0) and that shares rank
  0's clock (a ``minutes`` budget and its learning-rate schedule are rank 0's);
  :meth:`Distributed.mean_losses` averages the losses for the logs (and a non-finite loss on
  any rank stops every rank).
- I/O: the trainer writes checkpoints, previews and annotations on rank 0 only
  (:attr:`Distributed.is_main`); the CLI writes predictions and ``metrics.json`` there too.

A rank that dies makes ``torchrun`` end the others; the last checkpoint (written atomically
by rank 0) stays usable. See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: torchrun's environment variables this module reads
ENV_WORLD_SIZE, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


def env_world_size() -> int:
    """How many processes ``torchrun`` started for this run (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get(ENV_WORLD_SIZE, "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    """This process's global rank under ``torchrun`` (0 without it)."""
    try:
        return int(os.environ.get(ENV_RANK, "0"))
    except ValueError:
        return 0


class LossModule(nn.Module):
    """The student and the method's heads as one module whose forward runs a closure.

    DistributedDataParallel synchronises the gradients of the parameters a forward's outputs
    reach; wrapping this module, the forward is the method's ``compute_losses`` (a dict of
    loss tensors), so every student pass, feature map and head of the step is covered by one
    wrapper, and the methods never see it.
    """

    def __init__(self, student: nn.Module, heads: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.heads = heads

    def forward(self, compute: Callable[[], dict]) -> dict:
        return compute()


@dataclass
class Distributed:
    """This process's place among the ranks of a run (``world_size`` 1: the only one).

    Attributes
    ----------
    world_size, rank, local_rank : int
    group : ProcessGroup or None
        The group for the small control messages (:meth:`agree`, :meth:`mean_losses`): a
        gloo group of this module's own (beside NCCL on CUDA, so they never touch the GPU);
        None with one process. On the CPU it also carries the DDP gradients and
        :meth:`broadcast_modules` (see :func:`setup` for why not torchrun's default group).
    """

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    group: object = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, previews, predictions and metrics."""
        return self.rank == 0

    # --- seeding --------------------------------------------------------------------------
    def rank_streams(self, seed: int) -> tuple[np.random.Generator, torch.Generator]:
        """(numpy, torch) random streams for this rank's crops and augmentations.

        Distinct per rank (seeded by ``(seed, rank)``), reproducible for a given seed and
        world size. Also reseeds torch's global generator per rank (dropout and the like).
        """
        state = np.random.SeedSequence([int(seed), self.rank]).generate_state(2, np.uint64)
        torch_seed, global_seed = (int(s) & (2**63 - 1) for s in state)
        torch.manual_seed(global_seed)
        return np.random.default_rng([int(seed), self.rank]), torch.Generator().manual_seed(torch_seed)

    def tensor_group(self, device: torch.device):
        """The group for the network's tensors on ``device`` (DDP's gradients, broadcasts):
        the default group (NCCL) on CUDA, :attr:`group` (gloo) elsewhere."""
        return None if torch.device(device).type == "cuda" else self.group

    # --- the step ---------------------------------------------------------------------------
    def wrap(self, student: nn.Module, heads: nn.Module, device: torch.device):
        """The student and the method's heads in one DistributedDataParallel, or None with
        one process. Rank 0's weights are broadcast to every rank when it is built.

        ``find_unused_parameters`` is on for methods with trainable heads: they sit out some
        steps (warm-ups, stages), and DDP must not wait for their gradients then; off for the
        others (the student takes part in every step), which saves a graph traversal a step.
        """
        if not self.active:
            return None
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        has_heads = any(p.requires_grad for p in heads.parameters())
        return DistributedDataParallel(LossModule(student, heads), device_ids=ids, find_unused_parameters=has_heads,
                                       process_group=self.tensor_group(device))

    def agree(self, stop: bool, elapsed_s: float) -> tuple[bool, float]:
        """(stop, elapsed) that every rank shares: stop if any rank asks, rank 0's clock.

        One all-reduce a step (two numbers over the control group); with one process,
        the arguments unchanged.
        """
        if not self.active:
            return stop, elapsed_s
        import torch.distributed as dist

        t = torch.tensor([1.0 if stop else 0.0, elapsed_s if self.is_main else 0.0], dtype=torch.float64)
        dist.all_reduce(t, group=self.group)
        return bool(t[0] > 0), float(t[1])

    def mean_losses(self, losses: dict[str, float]) -> dict[str, float]:
        """The losses averaged over the ranks (a key missing on a rank is averaged over the
        ranks that have it); with one process, ``losses`` itself."""
        if not self.active:
            return losses
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, losses, group=self.group)
        keys = list(dict.fromkeys(k for d in gathered for k in d))
        return {k: float(np.mean([d[k] for d in gathered if k in d])) for k in keys}

    def explain_failure(self, exc: BaseException, step: int) -> str:
        """The message of an error that ended this rank's training: a lost peer (a rank that
        died, its connection closed) is said in words; any other error as it is."""
        import torch.distributed as dist

        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        lost = isinstance(exc, getattr(dist, "DistError", ())) or any(
            key in str(exc) for key in ("Connection closed by peer", "Connection reset", "NCCL", "gloo")
        )
        if not lost:
            return str(exc)
        detail = text if len(text) <= 120 else text[:117] + "..."
        return (f"rank {self.rank} lost contact with the other ranks at step {step}: another rank ended (its own "
                f"error, or torchrun's summary, names it) [{detail}]")

    def broadcast_modules(self, *modules: nn.Module | None) -> None:
        """Copy rank 0's parameters and buffers of ``modules`` to every rank (e.g. after a
        method re-initialised its student from a per-rank random stream)."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for module in modules:
                if module is None:
                    continue
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0, group=self.tensor_group(tensor.device))


#: The single-process run: every call does nothing.
SINGLE = Distributed()


def setup(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join ``torchrun``'s process group if there is one; returns (Distributed, device).

    On CUDA the device becomes ``cuda:LOCAL_RANK`` and the backend NCCL; elsewhere gloo.
    Called by every :class:`Trainer`; the groups are made once per process and kept until
    :func:`shutdown` (which runs at exit too).

    Every collective of a CPU run goes over a gloo group made here, which :func:`shutdown`
    can free (its threads joined), and ``torch.distributed.nn`` is imported before the
    default group exists: its functions take the default group as a default argument, and
    imported later (DDP imports it) they would hold it, and its gloo threads, until the
    interpreter finalizes.
    """
    world = env_world_size()
    if world == 1:
        return SINGLE, device
    import torch.distributed as dist

    local_rank = int(os.environ.get(ENV_LOCAL_RANK, "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started local rank {local_rank} but this node shows {torch.cuda.device_count()} GPU(s): "
                f"use --nproc_per_node {torch.cuda.device_count()} (one process per GPU), or --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # DDP imports torch.distributed.nn, whose functions take the default group as a
        # default argument: imported after the group exists, they would pin it for good
        import torch.distributed.nn  # noqa: F401

        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"could not join torchrun's process group ({backend}): "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
        _leave_at_exit()
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return Distributed(dist.get_world_size(), dist.get_rank(), local_rank, _CONTROL_GROUP), device


_CONTROL_GROUP = None
_EXIT_HOOK = False


def _leave_at_exit() -> None:
    """Make :func:`shutdown` run at interpreter exit (once): a process that joined the group
    and never called it (a script around :class:`Trainer`) leaves it while Python is whole."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(shutdown)
        _EXIT_HOOK = True


def shutdown() -> None:
    """Leave the process group, if this process joined one, and end its worker threads now.

    Called at the end of a CLI command, and at interpreter exit by any process that joined
    (:func:`setup` registers it). ``destroy_process_group`` alone does not stop gloo's
    threads (a gloo group has nothing to shut down): they end when the group's last
    reference goes, and the trainers' DDP wrappers and :class:`Distributed` hold it. A rank
    whose gloo threads were still running while Python finalized aborted now and then
    after training had finished ("terminate called without an active exception", SIGABRT,
    raised on a non-Python thread while the main thread had no Python frame left); torchrun
    then killed the other ranks, rank 0 before its checkpoint or its last events. So the
    groups are destroyed here and the objects that hold them collected now: their threads
    are joined while Python is whole. A trainer still referenced elsewhere keeps them
    until it goes.
    """
    global _CONTROL_GROUP
    import torch.distributed as dist

    _CONTROL_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()  # trainers (reference cycles) hold DDP wrappers and the group: their threads end here

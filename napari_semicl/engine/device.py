"""Device choice: CUDA, then Apple MPS, then CPU; and a human description of it."""

from __future__ import annotations

import os

import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def pick_device(preferred: str = "auto") -> torch.device:
    """The training device: ``preferred`` if available, else CUDA > MPS > CPU.

    Parameters
    ----------
    preferred : {'auto', 'cuda', 'mps', 'cpu'}
    """
    if preferred not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {set(DEVICE_CHOICES)}, got {preferred!r}")
    if preferred in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if preferred in ("auto", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device, threads: int | None = None, precision=None) -> str:
    """E.g. 'CUDA (NVIDIA H100 80GB HBM3, bf16 autocast)', 'MPS (Apple GPU, fp32)',
    'CPU (2 threads, bf16 autocast)'.

    ``threads``: the torch threads training uses on the CPU; by default the calling
    thread's count (which differs between threads: say it when describing another's run).
    ``precision``: a :class:`~napari_semicl.engine.precision.Precision` or a
    ``model.precision`` setting; by default what 'auto' chooses on ``device``.
    """
    from .precision import Precision, resolve_precision

    if not isinstance(precision, Precision):
        precision = resolve_precision(precision or "auto", device)
    arithmetic = precision.describe()
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)}, {arithmetic})"
    if device.type == "mps":
        return f"MPS (Apple GPU, {arithmetic})"
    n = torch.get_num_threads() if not threads else int(threads)
    return f"CPU ({n} thread{'s' if n != 1 else ''}, {arithmetic})"


def cpu_thread_count() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where the
    system does not say): the CLI's and the benchmarks' torch threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """The cores not busy with other work: ``cores`` (default :func:`cpu_thread_count`) less
    the 1-minute load average (``load``, default ``os.getloadavg()[0]``; 0 where the system
    does not say), rounded, and at least 1."""
    cores = cpu_thread_count() if cores is None else int(cores)
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, cores - int(round(load))))


def default_cpu_threads() -> int:
    """Torch threads for the CLI and the benchmarks: ``OMP_NUM_THREADS`` where it is set (a
    launcher's or the user's choice), else the cores this process may use that are idle
    (:func:`idle_cores`).

    A thread on a core that another process keeps busy stalls every parallel operation of the
    step: on this project's 2-core machine, U-Net steps with 2 threads took 10x longer than
    with 1 while other processes ran (docs/results/speed_bf16.json, ``threads``), and about
    0.6x as long with the second core idle (issue 26).
    """
    forced = os.environ.get("OMP_NUM_THREADS", "").strip()
    if forced.isdigit() and int(forced) > 0:
        return int(forced)
    return idle_cores()


def set_threads(n: int | None) -> int:
    """Set torch's intra-op threads (``None`` or 0 leaves them as they are); returns the count.

    A GUI should leave a core to the Qt thread: OpenMP workers that spin-wait for a busy core
    slow every step down many times over (measured here: 0.37 s vs 4.9 s per U-Net step
    with 1 vs 2 threads on a 2-core machine with one other busy process).
    """
    if n:
        torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def gui_thread_count() -> int:
    """Threads for training behind a GUI: all cores but one (at least one).

    ``NAPARI_SEMICL_GUI_THREADS`` (a positive integer) overrides it, e.g. to measure the
    viewer's fluency (``bench ui``) with another count.
    """
    forced = os.environ.get("NAPARI_SEMICL_GUI_THREADS", "").strip()
    if forced.isdigit() and int(forced) > 0:
        return int(forced)
    return max(1, cpu_thread_count() - 1)

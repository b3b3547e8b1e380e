"""Where work runs: the torch device (params.yaml's `device:`) and how many CPUs and workers to use.

One policy for every stage. torch is imported only inside the functions that need it, so torch-free stages and the
torchrun launcher can count CPUs without paying for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from foodvision.core.errors import FoodVisionError, shown
from foodvision.core.params import DEVICE_PATTERN, DEVICES

if TYPE_CHECKING:
    import torch

MAX_LOADER_WORKERS = 8  # DataLoader processes per rank on a GPU: more only queue for the same disk


class DeviceError(FoodVisionError):
    pass


def cpu_count() -> int:
    """The CPUs this process may run on (a container's or taskset's limit, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(device: str) -> torch.device:
    """`auto` = CUDA, then Apple MPS, then CPU; anything else must exist on this machine."""
    import torch

    if not DEVICE_PATTERN.fullmatch(device):
        raise DeviceError(f"device {shown(device)} is not one of {', '.join(DEVICES)} (or cuda:N)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} asked for, but CUDA is not available here; use auto or cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} "
                              "CUDA device(s), numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' asked for, but MPS is not available here; use auto or cpu")
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored (the caller may be a test process)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def loader_workers(device_type: str) -> int:
    """Workers for train's augmented loop. On CPU, torch's kernels already use every core: decoding in
    workers would oversubscribe them. On a GPU every core decodes (unlike `decode_workers`, which leaves
    one to the main process: featurize's loop also writes features). The count is part of what an augmented
    run's bytes depend on (each worker has its own random stream), so it stays as first measured."""
    return 0 if device_type == "cpu" else min(MAX_LOADER_WORKERS, cpu_count())


def decode_workers(device_type: str, cpus: int | None = None, ranks_here: int = 1) -> int:
    """DataLoader worker processes that decode while the backbone runs.

    On a GPU the CPU only decodes: use the cores (up to 8 per process). On a CPU the backbone already
    uses every core; one worker process pays once there are 4 cores or more to share. Below that, the
    next batch is decoded on threads instead (`data.threaded`), which measured faster than a worker
    process on 2 cores (docs/scale.md). `ranks_here` processes on this node share its cores.
    """
    cpus = max(1, (cpus or cpu_count()) // ranks_here)
    if device_type != "cpu":
        return max(1, min(MAX_LOADER_WORKERS, cpus - 1))
    return 1 if cpus >= 4 else 0


def io_threads() -> int:
    """Threads for work that waits on the disk more than the CPU (prepare's header checks)."""
    return min(32, 4 * cpu_count())


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere): bf16 pays only with AVX-512-BF16 or AMX."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())

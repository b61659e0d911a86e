"""What this machine has left for this process: memory that can still be allocated, on the host or a CUDA device.

Below every stage of the pipeline (a checkpoint reader in ``models`` needs it as much as training's batch checks in
:mod:`theseus_cli.training.memory`). On the CPU the figure is the least of ``MemAvailable`` (``/proc/meminfo``: the
OS's own estimate of what can be allocated without swapping), a container's cgroup limit less its usage (which
``MemAvailable`` does not see), and ``ulimit -v`` less this process's virtual size.
"""

from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device``; None where it cannot be known."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits = [v for v in (_mem_available(), _cgroup_headroom(), _address_space_headroom()) if v is not None]
    return min(limits) if limits else None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_headroom() -> int | None:
    """A container's memory limit less what it uses (cgroup v2, else v1): MemAvailable sees the host, not this."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:  # v1 writes a huge number for no limit
            return max(0, cap - used)
    return None


def _address_space_headroom() -> int | None:
    """``ulimit -v`` (RLIMIT_AS) less this process's virtual size: past it every allocation fails."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as fh:
            size = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return None
    return max(0, soft - size)


def gib(n: float) -> str:
    return f"{n / 1024**3:,.1f} GiB" if n >= 1024**3 / 10 else f"{n / 1024**2:,.1f} MiB"


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the allocator running out of host or device memory (MemoryError, or the RuntimeError
    PyTorch's CPU allocator raises)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("not enough memory" in text or "DefaultCPUAllocator" in text
                                              or "out of memory" in text)

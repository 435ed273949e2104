"""How much memory this process may still take, the base of the run's memory budgets (a size
probe's activations, a group's distance blocks: issue 19).

What the machine has free (``MemAvailable``; physical memory where that is not readable),
lowered to what the process' own limits leave (``ulimit -v`` / ``-d``: ``RLIMIT_AS`` and
``RLIMIT_DATA`` less what is mapped already), so that a run under a cap stays under it.
"""
from __future__ import annotations

import os

#: Assumed where nothing can be read (no /proc, no sysconf).
UNKNOWN_MEMORY_BYTES = 8 << 30


def available_bytes() -> int:
    """Bytes this process may still allocate (an estimate; never negative)."""
    free = _meminfo("MemAvailable")
    if free is None:
        free = _physical_bytes()
    try:
        import resource  # Unix only
    except ImportError:
        return free
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        try:
            soft = resource.getrlimit(limit)[0]
        except (ValueError, OSError):
            continue
        if soft != resource.RLIM_INFINITY and soft >= 0:
            free = min(free, max(0, soft - (_status(used) or 0)))
    return free


def _physical_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return UNKNOWN_MEMORY_BYTES


def _meminfo(key: str) -> int | None:
    """A ``/proc/meminfo`` entry in bytes (None where not readable)."""
    return _kib_field("/proc/meminfo", key)


def _status(key: str) -> int | None:
    """A ``/proc/self/status`` entry in bytes (None where not readable)."""
    return _kib_field("/proc/self/status", key)


def _kib_field(path: str, key: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as lines:
            for line in lines:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

"""This process's memory as Linux reports it, for the benchmarks that measure a child process alone."""

from __future__ import annotations

from pathlib import Path


def memory_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process in MB, from ``/proc/self/status``.

    VmHWM, not ``ru_maxrss``: Linux carries the parent's peak over fork and exec into a child's
    ``ru_maxrss``, so a child's own peak is only in VmHWM.
    """
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")) / 1024

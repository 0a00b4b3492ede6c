"""How many worker processes a CPU-bound step should start."""

from __future__ import annotations

import os


def worker_count(items: int, min_items: int, max_workers: int) -> int:
    """One process below `min_items` (starting workers costs seconds), else the usable CPUs, capped."""
    if items < min_items:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(max_workers, cpus))

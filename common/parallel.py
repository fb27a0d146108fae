"""How many threads the scorer's independent pieces of work may use at once, and a map over them.

The scorer's native parts (COLMAP, OpenCV, torch kernels) release the GIL, so two Python threads
keep two cores busy where one library call would use one. The count follows torch's thread count,
which Ray sets to the CPUs a replica or task reserved: a replica given one CPU runs everything in
turn. Only work whose result does not depend on what runs beside it is split this way, so a score
is bit-identical for any count (tests/common/test_parallel.py).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


def cpu_workers(limit: int = 2) -> int:
    """Threads to use at once: torch's thread count, at most `limit` (at least 1)."""
    return max(1, min(limit, torch.get_num_threads()))


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """`map(function, items)` on `workers` threads, results in the items' order (plain `map` for 1)."""
    if workers < 2:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(function, items)

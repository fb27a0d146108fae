"""How many threads the scorer's independent pieces of work may use at once, and a map over them.

The scorer's native parts (COLMAP, OpenCV, torch kernels) release the GIL, so two Python threads
keep two cores busy where one library call would use one. The count follows torch's thread count,
which Ray sets to the CPUs a replica or task reserved: a replica given one CPU runs everything in
turn. Only work whose result does not depend on what runs beside it is split this way, so a score
is bit-identical for any count (tests/common/test_parallel.py).
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Hashable, Iterable, Iterator, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")
Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


def cpu_workers(limit: int = 2) -> int:
    """Threads to use at once: torch's thread count, at most `limit` (at least 1)."""
    return max(1, min(limit, torch.get_num_threads()))


def ordered_map(function: Callable[[Item], Result], items: Iterable[Item], workers: int) -> Iterator[Result]:
    """`map(function, items)` on `workers` threads, results in the items' order (plain `map` for 1).

    At most `workers` + 1 items are started and not yet taken by the caller (`Executor.map` would
    start them all at once and hold every result until it is taken): a caller that fuses large
    results as they come holds a few of them, not all.
    """
    if workers < 2:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        started: deque[Future[Result]] = deque()
        for item in items:
            started.append(pool.submit(function, item))
            if len(started) > workers:
                yield started.popleft().result()
        while started:
            yield started.popleft().result()


class OnceCache(Generic[Key, Value]):
    """A cache whose values are computed once per key, also when several threads ask at once.

    A second thread asking for a key being computed waits for it instead of computing it again;
    threads asking for different keys compute side by side.
    """

    def __init__(self) -> None:
        self._values: dict[Key, Value] = {}
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: Key, compute: Callable[[], Value]) -> Value:
        if key in self._values:
            return self._values[key]
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._values:
                self._values[key] = compute()
        return self._values[key]

    def __contains__(self, key: object) -> bool:
        return key in self._values


class Prefetch(Generic[Value]):
    """`compute()` run on a thread of its own from `start()` on (where `background`), else when first asked for.

    For work that is likely to be needed and can run beside a stage that keeps only one core busy
    (COLMAP's matching and mapping): its result is ready when asked for. It must not depend on what
    runs beside it (it reads shared inputs, such as a `OnceCache`, only), so the result is the same
    either way.
    """

    def __init__(self, compute: Callable[[], Value], background: bool) -> None:
        self._compute = compute
        self._background = background
        self._done = threading.Event()
        self._value: Value
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start computing on another thread (once; nothing where not `background`)."""
        if self._background and self._thread is None and not self._done.is_set():
            context = contextvars.copy_context()  # the caller's deadline scope
            self._thread = threading.Thread(target=context.run, args=(self._run,), name="vgpa-prefetch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._compute()
        except BaseException as error:  # raised again to whoever asks for the value
            self._error = error
        finally:
            self._done.set()

    def join(self) -> None:
        """Wait for a started computation to end (its error stays for `get`)."""
        if self._thread is not None:
            self._thread.join()

    def get(self) -> Value:
        """The value (computed now if it was not started), or the error its computation raised."""
        if self._thread is None and not self._done.is_set():
            self._run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value

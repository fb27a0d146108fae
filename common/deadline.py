"""A deadline for the work of one request, checked between steps, so that nobody's abandoned work runs on.

The service sets it around one scoring (`with deadline_scope(at, cancelled): score_video(...)`);
the decoder checks it for every frame or image and the scorer between stages. Outside a scope
(the CLI, the mining job) `check_deadline` does nothing. A context variable, so concurrent
scorings in other threads each see their own.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

from common.errors import DeadlineExceededError


@dataclass(frozen=True)
class _Deadline:
    at: Optional[float]  # time.time() after which the work is abandoned
    cancelled: Optional[threading.Event]  # set when the caller gave up (e.g. the request was cancelled)


_current: ContextVar[Optional[_Deadline]] = ContextVar("vgpa_deadline", default=None)


@contextmanager
def deadline_scope(at: Optional[float], cancelled: Optional[threading.Event] = None) -> Iterator[None]:
    """Within this block, `check_deadline()` raises once `at` has passed or `cancelled` is set."""
    token = _current.set(_Deadline(at, cancelled))
    try:
        yield
    finally:
        _current.reset(token)


def deadline_passed() -> bool:
    d = _current.get()
    if d is None:
        return False
    return (d.cancelled is not None and d.cancelled.is_set()) or (d.at is not None and time.time() > d.at)


def check_deadline() -> None:
    """Raise DeadlineExceededError when the current scope's deadline has passed or it was cancelled."""
    if deadline_passed():
        raise DeadlineExceededError("The request's deadline passed; its work was stopped.")

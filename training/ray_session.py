"""Connecting a driver (a job, a CLI command) to Ray: a cluster when one is named, else a local one."""

from __future__ import annotations

import os
from typing import Optional


def ensure_ray(address: Optional[str] = None, min_cpus: int = 1) -> None:
    """Connect to `address` (or RAY_ADDRESS); without one, start a local Ray with no dashboard.

    min_cpus: logical CPUs of the local cluster at least; jobs whose stages hold a CPU token while
    mostly waiting (actor pools calling Serve) set more than the machine has.
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
        return
    # Ray 2.60 switches token auth on by default and writes a token under $HOME; a local one needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(min_cpus, os.cpu_count() or 1), include_dashboard=False,
             configure_logging=False, log_to_driver=False)

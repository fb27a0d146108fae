"""Connecting a driver (a job, a CLI command) to Ray: a cluster when one is named, else a local one."""

from __future__ import annotations

import os
from typing import Optional


def ensure_ray(address: Optional[str] = None, min_cpus: int = 1) -> None:
    """Connect to `address` (or RAY_ADDRESS); without one, start a local Ray on loopback, with no dashboard.

    min_cpus: logical CPUs of the local cluster at least; jobs whose stages hold a CPU token while
    mostly waiting (actor pools calling Serve) set more than the machine has.
    """
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=False)
        return
    from services.local_ray import start_local_ray

    # No token auth (it would write a token under $HOME); nothing listens beyond loopback instead.
    start_local_ray(max(min_cpus, os.cpu_count() or 1), log_to_driver=False)

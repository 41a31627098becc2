"""Connecting jobs to Ray: the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else an embedded
local instance sized for small machines."""

from __future__ import annotations

import os

LOCAL_NUM_CPUS = 4  # logical CPUs for the embedded Ray: on 2 cores, Ray Data inside trainers needs headroom


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)  # a cluster: its resources are its own
    else:
        # a private, loopback-only instance: token auth would only get in the way of its own state API
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": always a fresh private instance, even when a `ray start` cluster runs here
        ray.init(address="local", num_cpus=num_cpus or max(LOCAL_NUM_CPUS, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)

"""Connect to a Ray cluster, or start a private local one.

Jobs run under ``ray job submit`` find their cluster through ``RAY_ADDRESS``; everything else (the demo on
a laptop, unit tests) starts its *own* local instance with ``address="local"``, so that a head someone
else started on the same machine with ``ray start`` is never joined by accident.
"""

from __future__ import annotations

import os

# "0": private local instances start without the dashboard (about 2 CPU-seconds less per start; the
# test suite sets it for the jobs it runs). Explicit ``include_dashboard`` wins.
DASHBOARD_ENV = "CPSAMPLE_RAY_DASHBOARD"


def init_ray(num_cpus: int | None = None, address: str | None = None, **kwargs) -> None:
    """``ray.init`` for jobs and the demo; a no-op when Ray is already initialised.

    ``address`` (or ``RAY_ADDRESS``) connects to an existing cluster, whose resources are then its own;
    otherwise a new local instance with ``num_cpus`` CPUs starts, its dashboard on 127.0.0.1 only
    (none when ``CPSAMPLE_RAY_DASHBOARD=0``).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **kwargs)
        return
    # Ray runs its workers at niceness 15 so that its own daemons stay responsive on busy nodes. On a
    # private laptop instance the workers *are* the job: at 15 they also yield to every other process.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # One machine, no spot nodes: Ray Train's preemption watcher (one more actor per run) has nothing
    # to watch, and its controller polls the workers every 0.5 s instead of 2, so that a short run ends
    # when its workers do. The workers inherit these from this process's environment.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if os.environ.get(DASHBOARD_ENV, "1") == "0":
        kwargs.setdefault("include_dashboard", False)
    ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)

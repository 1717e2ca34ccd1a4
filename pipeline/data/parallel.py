"""How much to run at once: sized by a laptop's own Ray, or by what a job asks of an autoscaling cluster.

A job that started its own local Ray (``pipeline.fanout.ray_init.init_ray`` without an address) can
only use that machine's CPUs. A job on a cluster (``ray job submit``) must not size its parallelism
from the CPUs present now: the head advertises none (cluster/), workers start at zero, and the
autoscaler adds nodes for queued demand.
"""

from __future__ import annotations


def private_local_ray() -> bool:
    """True when this process started its own Ray (:func:`init_ray` without an address): nothing can
    add nodes to it, so its CPUs bound how much runs at once. On a cluster (``RAY_ADDRESS``, ``ray job
    submit``) workers may start at zero (the head advertises 0 CPUs) and the autoscaler adds nodes for
    queued demand, so parallelism must not be sized from the CPUs present now."""
    import ray._private.worker

    node = ray._private.worker._global_node
    return node is not None and node.head


def parallelism(requested: int, local_cap: int) -> int:
    """Tasks or actors to run at once: ``requested`` on a cluster (the autoscaler supplies the nodes),
    at most ``local_cap`` (what this machine's CPUs allow) on a private local Ray; at least 1."""
    return max(1, requested if not private_local_ray() else min(requested, local_cap))


def read_fed_pool(requested: int) -> int:
    """Actors of one CPU each fed by Ray Data read tasks: :func:`parallelism` with one of a private
    local Ray's CPUs left to the reads (on a cluster, ``requested``)."""
    import ray

    return parallelism(requested, int(ray.cluster_resources().get("CPU", 1)) - 1)


def gpus_never_come() -> bool:
    """True when a GPU request can never be granted: a private local Ray with no GPU (nothing adds
    nodes to it). On a cluster a GPU request makes the autoscaler add a GPU node."""
    import ray

    return not ray.cluster_resources().get("GPU", 0) and private_local_ray()

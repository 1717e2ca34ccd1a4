"""Cluster configs (``cluster/aws.yaml``, ``cluster/kuberay/``): shape checks and a fake-node twin.

``gpu_worker_problems`` is the check that protects the autoscaling contract: every GPU worker type
starts at zero (``min_workers: 0``), may grow (``max_workers > 0``) and advertises at least one GPU,
so that ``num_gpus`` requests can be satisfied by scaling up and idle GPUs are released.

``fake_autoscaling_config`` turns a launcher config into one for Ray's ``fake_multinode`` provider,
which starts each "node" as extra Ray processes on this machine, so that the real autoscaler can
scale the real node types (same names, same logical GPUs) up and down without a cloud account.

``check_cluster_file`` is what ``jobs/check_cluster.py`` runs before ``ray up`` or ``kubectl apply``:
Ray's own validator (offline), then the GPU check. Ray is imported only there.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

# The fake provider tags the head it runs on with this node type name (it is fixed in Ray).
FAKE_HEAD_NODE_TYPE = "ray.head.default"


class ClusterConfigError(ValueError):
    """A cluster config that would not autoscale GPU workers as the project expects."""


def load_cluster_yaml(path: str | Path) -> dict[str, Any]:
    """A cluster launcher (or KubeRay) YAML file as a dict; a clear error if it is not a mapping."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ClusterConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The node types other than the head's."""
    head = config.get("head_node_type")
    return {k: v for k, v in (config.get("available_node_types") or {}).items() if k != head}


def gpu_worker_problems(config: dict[str, Any]) -> list[str]:
    """Why the config's GPU worker types would not autoscale; empty when they would.

    A GPU worker type is one whose name contains ``gpu`` or whose resources list a GPU. The config
    needs at least one, and each must have ``resources.GPU >= 1``, ``min_workers == 0`` and
    ``max_workers > 0``.
    """
    problems = []
    gpu_types = {
        name: spec
        for name, spec in worker_types(config).items()
        if "gpu" in name.lower() or "GPU" in (spec.get("resources") or {})
    }
    if not gpu_types:
        problems.append("no GPU worker type (a worker type named *gpu* with resources.GPU >= 1)")
    for name, spec in sorted(gpu_types.items()):
        gpus = (spec.get("resources") or {}).get("GPU", 0)
        if not (isinstance(gpus, (int, float)) and gpus >= 1):
            problems.append(f"worker type {name!r}: resources.GPU must be >= 1, got {gpus!r}")
        if spec.get("min_workers", 0) != 0:
            problems.append(
                f"worker type {name!r}: min_workers must be 0 (scale from zero), "
                f"got {spec.get('min_workers')!r}"
            )
        max_workers = spec.get("max_workers")
        if not (isinstance(max_workers, int) and max_workers > 0):
            problems.append(
                f"worker type {name!r}: max_workers must be a positive integer, got {max_workers!r}"
            )
    return problems


def check_gpu_worker_types(config: dict[str, Any], where: str = "cluster config") -> None:
    """Raise :class:`ClusterConfigError` listing every problem :func:`gpu_worker_problems` finds."""
    problems = gpu_worker_problems(config)
    if problems:
        raise ClusterConfigError(f"{where}: " + "; ".join(problems))


def autoscaling_config(data: dict[str, Any]) -> dict[str, Any]:
    """The autoscaler's view of a launcher YAML or a KubeRay ``RayCluster``, validated by Ray offline.

    A launcher config is merged with its provider's defaults (``prepare_config``, as ``ray up`` does);
    a ``RayCluster`` goes through Ray's KubeRay deriver. Both then pass ``validate_config``."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    if data.get("kind") == "RayCluster":
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _derive_autoscaling_config_from_ray_cr,
        )

        config = _derive_autoscaling_config_from_ray_cr(copy.deepcopy(data))
    elif data.get("kind"):
        raise ClusterConfigError(
            f"kind {data['kind']!r} is not a cluster: give a RayCluster manifest or a launcher YAML"
        )
    else:
        config = prepare_config(copy.deepcopy(data))
    try:
        validate_config(config)
    except ValueError as exc:  # jsonschema's ValidationError is a ValueError too
        raise ClusterConfigError(f"Ray's validator refuses it: {str(exc).splitlines()[0]}") from exc
    return config


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster file offline and check its GPU workers; a summary of its worker types.

    Raises :class:`ClusterConfigError` naming the file and every problem found."""
    data = load_cluster_yaml(path)
    try:
        config = autoscaling_config(data)
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"{path}: {exc}") from exc
    check_gpu_worker_types(config, str(path))
    return {
        "file": str(path),
        "kind": data.get("kind", "launcher"),
        "head": config.get("head_node_type"),
        "workers": {
            name: {
                "GPU": (spec.get("resources") or {}).get("GPU", 0),
                "min_workers": spec.get("min_workers", 0),
                "max_workers": spec.get("max_workers"),
            }
            for name, spec in sorted(worker_types(config).items())
        },
    }


def fake_node_types(
    config: dict[str, Any],
    max_workers: int = 1,
    cpus_per_node: int = 1,
    object_store_bytes: int = 150 * 1024**2,
) -> dict[str, dict[str, Any]]:
    """The config's worker types for the fake provider: same names and logical GPUs, min 0.

    CPUs are capped at ``cpus_per_node`` (a fake node is a few processes on this machine, and Ray
    prestarts a worker per CPU); a small object store keeps the fake nodes' shared memory small.
    """
    out = {}
    for name, spec in worker_types(config).items():
        resources = dict(spec.get("resources") or {})
        resources["CPU"] = min(int(resources.get("CPU", cpus_per_node)), cpus_per_node)
        resources["object_store_memory"] = object_store_bytes
        out[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(max_workers, int(spec.get("max_workers", max_workers))),
        }
    return out


def fake_autoscaling_config(
    config: dict[str, Any],
    gcs_address: str,
    head_cpus: int = 1,
    max_workers_per_type: int = 1,
    idle_timeout_minutes: float = 0.1,
) -> dict[str, Any]:
    """A ``fake_multinode`` autoscaling config mirroring ``config``'s worker types.

    The head type is renamed to the fake provider's fixed ``ray.head.default``. ``gcs_address``
    (``127.0.0.1:<port>``) tells the provider where the fake nodes join; without it they would
    look for a head on port 6379.
    """
    workers = fake_node_types(config, max_workers_per_type)
    if FAKE_HEAD_NODE_TYPE in workers:
        raise ClusterConfigError(f"worker type name {FAKE_HEAD_NODE_TYPE!r} is reserved")
    empty_lists = (
        "cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
        "setup_commands", "head_setup_commands", "worker_setup_commands",
        "head_start_ray_commands", "worker_start_ray_commands",
    )  # fmt: skip
    return {
        "cluster_name": f"fake-{config.get('cluster_name', 'cluster')}",
        "max_workers": sum(t["max_workers"] for t in workers.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {},
        "docker": {},
        "head_node_type": FAKE_HEAD_NODE_TYPE,
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {
                "resources": {"CPU": head_cpus},
                "node_config": {},
                "max_workers": 0,
            },
            **copy.deepcopy(workers),
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }

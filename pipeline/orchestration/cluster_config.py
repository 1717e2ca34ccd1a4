"""Cluster configs (``cluster/aws.yaml``, ``cluster/kuberay/``): shape checks and a fake-node twin.

The checks protect the autoscaling contract (DESIGN.md section 8):

- ``gpu_worker_problems``: every GPU worker type starts at zero (``min_workers: 0``), may grow
  (``max_workers > 0``) and advertises at least one GPU, so that ``num_gpus`` requests can be satisfied
  by scaling up and idle GPUs are released.
- ``cpu_worker_problems``: a CPU worker type (no GPUs, ``resources.CPU >= 1``, from zero) exists, so
  that CPU-only work (make_shards, index builds) scales out instead of queueing.
- ``head_problems`` / ``kuberay_problems``: the head advertises no CPU (Ray's ``num-cpus: 0``), so no
  task lands on the node that runs the GCS; in KubeRay every Ray container mounts a memory-backed
  ``/dev/shm`` big enough for Ray's default object store.

``fake_autoscaling_config`` turns a launcher config into one for Ray's ``fake_multinode`` provider,
which starts each "node" as extra Ray processes on this machine, so that the real autoscaler can
scale the real node types (same names, same logical GPUs) up and down without a cloud account.

``check_cluster_file`` is what ``jobs/check_cluster.py`` runs before ``ray up`` or ``kubectl apply``:
Ray's own validator (offline), then all of the above. Ray is imported only there.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

# The fake provider tags the head it runs on with this node type name (it is fixed in Ray).
FAKE_HEAD_NODE_TYPE = "ray.head.default"
# Ray's default object store is this share of a node's memory
# (ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION); it lives in /dev/shm only if that holds it.
OBJECT_STORE_SHARE = 0.3
# Binary and decimal suffixes of Kubernetes quantities, in bytes.
_QUANTITY_UNITS = {
    "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


class ClusterConfigError(ValueError):
    """A cluster config Ray refuses, or one that would not place and scale work as the project expects."""


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


def is_gpu_type(name: str, spec: dict[str, Any]) -> bool:
    """A GPU worker type: its name contains ``gpu`` or its resources list a GPU (even 0)."""
    return "gpu" in name.lower() or "GPU" in (spec.get("resources") or {})


def _bounds_problems(name: str, spec: dict[str, Any]) -> list[str]:
    """``min_workers`` must be 0 (nothing runs, or costs, when idle) and ``max_workers`` positive."""
    problems = []
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


def gpu_worker_problems(config: dict[str, Any]) -> list[str]:
    """Why the config's GPU worker types would not autoscale; empty when they would.

    A GPU worker type is one :func:`is_gpu_type` accepts. The config needs at least one, and each
    must have ``resources.GPU >= 1``, ``min_workers == 0`` and ``max_workers > 0``.
    """
    problems = []
    gpu_types = {n: s for n, s in worker_types(config).items() if is_gpu_type(n, s)}
    if not gpu_types:
        problems.append("no GPU worker type (a worker type named *gpu* with resources.GPU >= 1)")
    for name, spec in sorted(gpu_types.items()):
        gpus = (spec.get("resources") or {}).get("GPU", 0)
        if not (isinstance(gpus, (int, float)) and gpus >= 1):
            problems.append(f"worker type {name!r}: resources.GPU must be >= 1, got {gpus!r}")
        problems += _bounds_problems(name, spec)
    return problems


def cpu_worker_problems(
    config: dict[str, Any], field: str = "available_node_types"
) -> list[str]:  # fmt: skip
    """Why the config has no CPU worker type for ingest and index builds; empty when it has one.

    A CPU worker type is a worker type that :func:`is_gpu_type` rejects. The config needs at least
    one, and each must have ``resources.CPU >= 1``, ``min_workers == 0`` and ``max_workers > 0``.
    ``field`` names where the worker types live in the file (the error names it).
    """
    cpu_types = {n: s for n, s in worker_types(config).items() if not is_gpu_type(n, s)}
    if not cpu_types:
        return [
            f"{field}: no CPU worker type (a worker type without GPUs, resources.CPU >= 1, "
            "min_workers 0, max_workers > 0) for make_shards and index builds"
        ]
    problems = []
    for name, spec in sorted(cpu_types.items()):
        cpus = (spec.get("resources") or {}).get("CPU")
        if not (isinstance(cpus, (int, float)) and cpus >= 1):
            problems.append(f"worker type {name!r}: resources.CPU must be >= 1, got {cpus!r}")
        problems += _bounds_problems(name, spec)
    return problems


def head_problems(config: dict[str, Any]) -> list[str]:
    """Why tasks could land on a launcher config's head; empty when its resources say ``CPU: 0``.

    Without an explicit 0 the autoscaler gives the head its instance's CPUs and Ray schedules
    tasks there, next to the GCS."""
    head = config.get("head_node_type")
    spec = (config.get("available_node_types") or {}).get(head)
    if spec is None:
        return [f"head_node_type {head!r} is not one of available_node_types"]
    cpus = (spec.get("resources") or {}).get("CPU")
    if cpus != 0:
        return [
            f"available_node_types.{head}.resources.CPU must be 0 (no task on the head, Ray's "
            f"num-cpus 0), got {cpus!r}"
        ]
    return []


def check_gpu_worker_types(config: dict[str, Any], where: str = "cluster config") -> None:
    """Raise :class:`ClusterConfigError` listing every problem :func:`gpu_worker_problems` finds."""
    problems = gpu_worker_problems(config)
    if problems:
        raise ClusterConfigError(f"{where}: " + "; ".join(problems))


def k8s_bytes(quantity: Any) -> float:
    """Bytes of a Kubernetes quantity (``32Gi``, ``500M``, ``1024``); a clear error otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)([KMGTPE]i|[kMGTPE])?\s*", str(quantity))
    if not match:
        raise ClusterConfigError(f"{quantity!r} is not a Kubernetes quantity such as 16Gi")
    return float(match.group(1)) * _QUANTITY_UNITS[match.group(2) or ""]


def shm_problems(template: dict[str, Any], where: str) -> list[str]:
    """Why a pod template's Ray container (KubeRay's: the first) lacks a usable ``/dev/shm``.

    It needs a volume mounted at ``/dev/shm`` that is an ``emptyDir`` with ``medium: Memory`` and a
    ``sizeLimit`` of at least :data:`OBJECT_STORE_SHARE` of the container's memory limit: otherwise
    Ray finds Docker's 64 MB ``/dev/shm`` too small and puts the object store on disk (/tmp)."""
    pod = template.get("spec") or {}
    containers = pod.get("containers") or []
    if not containers:
        return [f"{where}.template.spec.containers: no Ray container"]
    container, at = containers[0], f"{where}.template.spec"
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
    if not mounts:
        return [
            f"{at}.containers[{container.get('name')!r}].volumeMounts: nothing at /dev/shm (Ray's "
            "object store needs an emptyDir with medium: Memory and a sizeLimit mounted there)"
        ]
    name = mounts[0].get("name")
    volume = next((v for v in pod.get("volumes") or [] if v.get("name") == name), None)
    if volume is None:
        return [f"{at}.volumes: no volume named {name!r} for the /dev/shm mount"]
    empty = volume.get("emptyDir")
    if not isinstance(empty, dict) or empty.get("medium") != "Memory":
        return [
            f"{at}.volumes[{name!r}]: /dev/shm must be an emptyDir with medium: Memory, "
            f"got { ({k: v for k, v in volume.items() if k != 'name'})!r}"
        ]
    size = empty.get("sizeLimit")
    if size is None:
        return [
            f"{at}.volumes[{name!r}].emptyDir.sizeLimit is missing (without it the volume may "
            "fill the node's memory)"
        ]
    memory = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    try:
        too_small = memory is not None and k8s_bytes(size) < OBJECT_STORE_SHARE * k8s_bytes(memory)
    except ClusterConfigError as exc:
        return [f"{at}.volumes[{name!r}].emptyDir.sizeLimit or the memory limit: {exc}"]
    if too_small:
        return [
            f"{at}.volumes[{name!r}].emptyDir.sizeLimit {size} is below "
            f"{OBJECT_STORE_SHARE:.0%} of the memory limit {memory}: Ray's object store would not fit"
        ]
    return []


def kuberay_problems(cr: dict[str, Any]) -> list[str]:
    """What a ``RayCluster`` manifest lacks beyond Ray's validator: the head's ``num-cpus: "0"`` and a
    memory-backed ``/dev/shm`` in every Ray container (head and each worker group)."""
    spec = cr.get("spec") or {}
    head = spec.get("headGroupSpec") or {}
    problems = []
    cpus = (head.get("rayStartParams") or {}).get("num-cpus")
    if str(cpus) != "0":
        problems.append(
            'spec.headGroupSpec.rayStartParams.num-cpus must be "0" (no task on the head), '
            f"got {cpus!r}"
        )
    groups = [("spec.headGroupSpec", head)] + [
        (f"spec.workerGroupSpecs[{g.get('groupName')!r}]", g)
        for g in spec.get("workerGroupSpecs") or []
    ]
    for where, group in groups:
        problems += shm_problems(group.get("template") or {}, where)
    return problems


def cluster_problems(data: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """Every problem of a cluster file: ``data`` as written, ``config`` the autoscaler's view of it.

    A launcher file is checked as written (Ray's defaults would fill in a missing ``max_workers``);
    a ``RayCluster`` through its derived node types (named by ``groupName``) plus the manifest."""
    if data.get("kind") == "RayCluster":
        return (
            gpu_worker_problems(config)
            + cpu_worker_problems(config, "spec.workerGroupSpecs")
            + kuberay_problems(data)
        )
    return gpu_worker_problems(data) + cpu_worker_problems(data) + head_problems(data)


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
    from jsonschema.exceptions import ValidationError  # Ray's dependency; not a ValueError

    try:
        validate_config(config)
    except (ValueError, ValidationError) as exc:
        raise ClusterConfigError(f"Ray's validator refuses it: {str(exc).splitlines()[0]}") from exc
    return config


def check_cluster_file(path: str | Path) -> dict[str, Any]:
    """Validate a cluster file offline, then :func:`cluster_problems`; a summary of its node types.

    Raises :class:`ClusterConfigError` naming the file and every problem found."""
    data = load_cluster_yaml(path)
    try:
        config = autoscaling_config(data)
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"{path}: {exc}") from exc
    problems = cluster_problems(data, config)
    if problems:
        raise ClusterConfigError(f"{path}: " + "; ".join(problems))
    head = config.get("head_node_type")
    return {
        "file": str(path),
        "kind": data.get("kind", "launcher"),
        "head": head,
        "head_cpus": (config["available_node_types"][head].get("resources") or {}).get("CPU"),
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
    head_cpus: int | None = None,
    max_workers_per_type: int = 1,
    idle_timeout_minutes: float = 0.1,
) -> dict[str, Any]:
    """A ``fake_multinode`` autoscaling config mirroring ``config``'s worker types.

    The head type is renamed to the fake provider's fixed ``ray.head.default``. ``gcs_address``
    (``127.0.0.1:<port>``) tells the provider where the fake nodes join; without it they would
    look for a head on port 6379. ``head_cpus`` defaults to the head's own CPUs (0 in our files),
    at most 1; the fake head must be started with the same ``--num-cpus``.
    """
    if head_cpus is None:
        head = (config.get("available_node_types") or {}).get(config.get("head_node_type")) or {}
        head_cpus = min(int((head.get("resources") or {}).get("CPU", 1)), 1)
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

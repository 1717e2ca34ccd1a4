"""init_ray: a no-op under a running Ray; otherwise a private local instance, dashboard on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.fanout.ray_init import init_ray

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, os
import ray
from pipeline.fanout.ray_init import init_ray

assert not ray.is_initialized()
init_ray(num_cpus=1)
info = ray._private.worker._global_node.address_info
print("RESULT " + json.dumps({
    "cpus": ray.cluster_resources().get("CPU"),
    "nodes": len(ray.nodes()),
    "gcs": ray.get_runtime_context().gcs_address,
    "webui_url": info["webui_url"],
    "niceness": os.environ.get("RAY_worker_niceness"),
    "train": [os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
              os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")],
}))
ray.shutdown()
"""


def test_init_ray_is_a_no_op_when_ray_is_running(ray_local, monkeypatch):
    ray = ray_local
    gcs = ray.get_runtime_context().gcs_address
    before = ray.cluster_resources()
    assert before["CPU"] == 2
    init_ray(num_cpus=7)
    init_ray(address="127.0.0.1:1")  # would fail to connect if it tried
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    init_ray()
    assert ray.is_initialized()
    assert ray.get_runtime_context().gcs_address == gcs
    assert ray.cluster_resources()["CPU"] == before["CPU"] == 2
    assert len(ray.nodes()) == 1


def test_init_ray_starts_a_private_local_instance_in_a_fresh_process(ray_local):
    """With RAY_ADDRESS unset (and this session's own Ray running beside it), a fresh interpreter
    starts its own 1-CPU instance instead of joining, with its dashboard on 127.0.0.1 and the
    worker niceness defaulting to 0."""
    parent_gcs = ray_local.get_runtime_context().gcs_address
    drop = ("RAY_ADDRESS", "RAY_worker_niceness", "CPSAMPLE_RAY_DASHBOARD")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("RAY_TRAIN_")}
    got = _child(env)
    assert got["cpus"] == 1 and got["nodes"] == 1
    assert got["gcs"] != parent_gcs  # not the instance this session started
    host, _, port = got["webui_url"].rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert got["niceness"] == "0"
    # a one-machine instance: no preemption watcher, the Train controller polls every 0.5 s
    assert got["train"] == ["0", "0.5"]
    # the parent's own instance is untouched by the child's start and shutdown
    assert ray_local.cluster_resources()["CPU"] == 2
    assert "RAY_ADDRESS" not in env


def test_init_ray_starts_no_dashboard_when_told(ray_local):
    """``CPSAMPLE_RAY_DASHBOARD=0`` (the suite's jobs run so): no dashboard; settings the caller made
    are kept."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CPSAMPLE_RAY_DASHBOARD="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="3")
    got = _child(env)
    assert got["cpus"] == 1 and not got["webui_url"]
    assert got["train"] == ["0", "3"]


def _child(env: dict) -> dict:
    """CHILD's RESULT line, run in a fresh interpreter with ``env``."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))

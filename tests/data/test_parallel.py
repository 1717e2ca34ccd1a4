"""parallelism: capped by a private local Ray's CPUs, what was asked for on a cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_private_local_ray_caps_parallelism_at_its_cpus(ray_local):
    from pipeline.data.parallel import parallelism, private_local_ray

    assert private_local_ray()  # the fixture's Ray was started by this process
    assert parallelism(16, local_cap=1) == 1
    assert parallelism(0, local_cap=4) == 1


CLUSTER_CHILD = """
import json, sys
import ray
from pipeline.data.parallel import parallelism, private_local_ray
from pipeline.fanout.ray_init import init_ray
init_ray(address=sys.argv[1])
print("RESULT " + json.dumps({"private": private_local_ray(), "n": parallelism(16, local_cap=1)}))
ray.shutdown()
"""


def test_a_driver_that_joined_a_cluster_asks_for_what_it_requested(ray_local):
    """A driver that joined a running Ray (as under ``ray job submit``) is not capped by the CPUs the
    cluster has now: the autoscaler adds nodes for the demand."""
    gcs = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", CLUSTER_CHILD, gcs], env=env, capture_output=True, text=True,
        timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result == {"private": False, "n": 16}


def test_gpus_never_come_to_a_private_local_ray_without_them(ray_local):
    from pipeline.data.parallel import gpus_never_come, read_fed_pool

    assert gpus_never_come()  # the fixture's Ray: started here, no GPUs
    assert read_fed_pool(8) == 1  # 2 CPUs: one left to the reads

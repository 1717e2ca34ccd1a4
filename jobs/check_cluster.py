"""Check cluster files offline before `ray up` or `kubectl apply`: Ray's validator, then the groups.

    python jobs/check_cluster.py cluster/aws.yaml cluster/kuberay/raycluster.yaml

A launcher YAML is merged with its provider's defaults and validated as `ray up` would (no cloud calls); a
KubeRay RayCluster goes through Ray's KubeRay deriver. Then the head must advertise 0 CPUs, a CPU worker
type and every GPU worker type must scale from zero (min_workers 0) and may grow (max_workers > 0), GPU
types advertise at least one GPU (so the sampling actors' and Ray Train's GPU requests make the autoscaler
add nodes), and (KubeRay) every Ray container mounts a memory-backed /dev/shm of at least 30% of its memory
limit. Prints one JSON line per file; exits 2 naming the file and every problem otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_main

from pipeline.core.config_base import read_yaml
from pipeline.orchestration.cluster_config import ClusterConfigError, check_cluster_file


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("files", nargs="+", help="cluster launcher YAML or KubeRay RayCluster manifest")
    args = p.parse_args()
    for path in args.files:
        if not Path(path).is_file():
            raise ClusterConfigError(f"{path}: no such cluster file")
        read_yaml(path)  # a malformed file: one line naming the file and the YAML problem's line
        print(json.dumps(check_cluster_file(path)))


if __name__ == "__main__":
    run_main(main)

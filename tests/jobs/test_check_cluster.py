"""jobs/check_cluster.py: the shipped cluster files pass; a broken copy exits 2 naming file and problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "check_cluster.py"


def _run(*files) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), *map(str, files)],
        capture_output=True, text=True, cwd=ROOT, timeout=180,
    )  # fmt: skip


def test_shipped_cluster_files_pass_and_broken_copies_exit_2(tmp_path):
    aws, kuberay = ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "kuberay" / "raycluster.yaml"
    broken = yaml.safe_load(aws.read_text())
    broken["available_node_types"]["gpu_sample_1x"]["min_workers"] = 2
    broken["available_node_types"]["gpu_train_4x"]["resources"].pop("GPU")
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    (tmp_path / "job.yaml").write_text("kind: RayJob\nspec: {}\n")

    ok = _run(aws, kuberay)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summaries = [json.loads(line) for line in ok.stdout.strip().splitlines()]
    assert [s["kind"] for s in summaries] == ["launcher", "RayCluster"]
    assert summaries[0]["workers"]["gpu_train_4x"] == {"GPU": 4, "min_workers": 0, "max_workers": 2}
    assert summaries[1]["workers"]["gpu-sample"]["GPU"] == 1

    bad = _run(tmp_path / "broken.yaml")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "broken.yaml" in bad.stderr
    assert "'gpu_sample_1x': min_workers must be 0" in bad.stderr
    assert "'gpu_train_4x': resources.GPU must be >= 1" in bad.stderr

    not_a_cluster = _run(tmp_path / "job.yaml")
    assert not_a_cluster.returncode == 2
    assert "kind 'RayJob' is not a cluster" in not_a_cluster.stderr

    missing = _run(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "nope.yaml: no such cluster file" in missing.stderr

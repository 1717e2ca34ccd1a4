"""jobs/cluster_duplicates.py as a user runs it (a subprocess): digits with known copies made by
make_shards --duplicates, the stored files, reuse, --rebuild, and bad input with exit status 2."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "cluster_duplicates.py"


def run(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, str(JOB), *argv], capture_output=True, text=True, timeout=300,
        cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def digits_with_copies(tmp_path_factory) -> Path:
    """16x16 digits: 300 training images plus 3 copies of each of 6, written by make_shards."""
    store = tmp_path_factory.mktemp("cluster-job")
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "make_shards.py"), "--store", str(store),
         "--source", "digits", "--num-train", "300", "--shard-size", "500",
         "--duplicates", "6:3", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return store


def _pairs(groups: dict[str, str]) -> set[tuple[str, str]]:
    by: dict[str, list[str]] = {}
    for key, cid in groups.items():
        by.setdefault(cid, []).append(key)
    return {tuple(sorted(p)) for keys in by.values() for p in itertools.combinations(keys, 2)}


def test_job_writes_members_sidecar_and_figure_and_reuses(digits_with_copies):
    store = digits_with_copies
    done = run("--store", str(store), "--dataset", "digits")
    assert done.returncode == 0, done.stderr
    folder = store / "clusters" / "digits" / "centred"
    sidecar = json.loads((folder / "sidecar.json").read_text())
    members = json.loads((folder / "members.json").read_text())
    assert (folder / "largest.png").read_bytes()[:4] == b"\x89PNG"
    assert sidecar["num_images"] == 318 and sidecar["index"] == "flat"
    # the clusters are the copies make_shards recorded in the manifest (digits: near-exact at 0.97)
    manifest = json.loads((store / "data" / "digits" / "manifest.json").read_text())
    copies = manifest["source"]["duplicates"]["copies"]
    truth = _pairs({**copies, **{s: s for s in copies.values()}})
    found = _pairs(members)
    assert len(found & truth) / len(truth) == 1.0
    assert len(found & truth) / len(found) >= 0.9
    out = done.stdout
    assert f"318 training images in {sidecar['num_clusters']} clusters at threshold 0.97" in out
    assert f"{sidecar['num_duplicated_images']} images in {sidecar['num_multi_clusters']}" in out
    for cid, size in sidecar["largest"]:
        assert f"{size:6d}  {cid}" in out
    assert "largest.png" in out
    again = run("--store", str(store), "--dataset", "digits")
    assert again.returncode == 0
    assert json.loads((folder / "sidecar.json").read_text()) == sidecar  # reused
    rebuilt = run("--store", str(store), "--dataset", "digits", "--rebuild")
    assert rebuilt.returncode == 0
    assert json.loads((folder / "sidecar.json").read_text())["built_at"] != sidecar["built_at"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "nope"], "no dataset 'nope'"),
        (["--dataset", "digits", "--threshold", "1.5"], "--threshold must be in (0, 1]"),
        (["--dataset", "digits", "--k", "1"], "--k must be >= 2"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, argv, message):
    done = run("--store", str(tmp_path), *argv)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_missing_bucket_exits_2(s3_env):
    done = run("--store", "s3://no-such-bucket-cps/x", "--dataset", "digits", env=s3_env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-bucket-cps" in lines[0]

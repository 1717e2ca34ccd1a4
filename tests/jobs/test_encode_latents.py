"""jobs/encode_latents.py as a real process: it encodes, a rerun starts nothing, other settings and
bad input exit 2 with a one-line message before anything is written (and before Ray starts)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.data.datasets import digits_source, split
from pipeline.data.storage import open_store
from pipeline.orchestration.stages import make_shards

ROOT = Path(__file__).resolve().parents[2]


def _store(root: Path) -> Path:
    train, holdout = split(digits_source(16).subset(range(12)), 8, 0)
    make_shards(open_store(str(root)), "dg", train, holdout, shard_size=4)
    return root


def _job(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray
    cmd = [sys.executable, str(ROOT / "jobs" / "encode_latents.py"), "--dataset", "dg", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_encode_then_rerun_then_other_settings(tmp_path, tiny_sd_dir):
    store = _store(tmp_path / "store")
    base = ["--store", str(store), "--model", str(tiny_sd_dir), "--ray-cpus", "2"]
    done = _job(*base, "--caption-template", "a handwritten {label}", "--batch-size", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["images"] == 12 and out["shards"] == 3 and out["shards_encoded"] == 3
    manifest = json.loads((store / "data/dg-latents/manifest.json").read_text())
    assert manifest["latent"]["latent_shape"] == [4, 8, 8] and manifest["channels"] == 4
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 8, "holdout": 4}
    files = _files(store / "data/dg-latents")
    assert "train/shard-000001.tar" in files and "train/shard-000001.tar.provenance.json" in files

    again = _job(*base, "--caption-template", "a handwritten {label}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["shards_skipped"] == 3
    assert "0 encoded, 3 already complete" in again.stdout

    other = _job(*base, "--caption-template", "the digit {label}")
    assert other.returncode == 2
    (line,) = _error_lines(other.stderr)
    assert "changed: settings" in line
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr
    assert _files(store / "data/dg-latents") == files


def test_bad_input_exits_2_and_writes_nothing(tmp_path, tiny_sd_dir):
    store = _store(tmp_path / "store")
    out_dir = store / "data/dg-latents"
    no_model = _job("--store", str(store), "--model", str(tmp_path))
    assert no_model.returncode == 2 and "Traceback" not in no_model.stderr
    assert "vae/config.json: no Stable Diffusion config" in no_model.stderr
    assert not out_dir.exists()

    no_split = _job("--store", str(store), "--model", str(tiny_sd_dir), "--splits", "train", "x")
    assert no_split.returncode == 2 and "Traceback" not in no_split.stderr
    (line,) = _error_lines(no_split.stderr)
    assert re.match(r"error: .*/data/dg/x: the dataset's manifest has no split 'x'", line)
    assert not out_dir.exists()
    # bad input found by an encoding actor (a corrupt shard): tests/fanout/test_latents.py

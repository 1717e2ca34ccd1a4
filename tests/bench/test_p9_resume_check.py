"""The resume-check benchmark (bench/p9_resume_check.py) at a tiny size: the run it writes is one the
driver's check finds complete, shard by shard, and the result carries its checks."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import p9_resume_check


def test_p9_finds_every_written_sample_complete(tmp_path):
    out = p9_resume_check.run(sizes=(1000, 2500), work=str(tmp_path))
    small, large = out["sizes"]["1000"], out["sizes"]["2500"]
    assert (small["complete_shards"], small["samples"]) == (1, 1000)
    assert (large["complete_shards"], large["shards"], large["samples"]) == (3, 3, 2500)
    assert large["bytes"] > small["bytes"] > 0 and large["peak_rss_mb"] > 0
    assert out["checks"]["all_complete"] is True
    assert set(out["checks"]) >= {"rss_ratio", "rss_bounded", "time_per_sample_ratio"}
    assert not list(tmp_path.glob("store-*"))  # the scratch stores are removed

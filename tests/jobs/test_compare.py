"""jobs/compare.py: bad input is refused before any sampling, with exit 2 from the command line; the
real run is in tests/orchestration/test_compare.py (on the quick demo's store)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import ConfigError
from pipeline.data.imageset import DataError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "compare.py"


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("compare_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _store(folder: Path, report: dict, config: dict | None = None) -> Path:
    folder.mkdir()
    (folder / "provenance.json").write_text(json.dumps({"config": config or {}}))
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_an_empty_store_exits_2_naming_it(tmp_path):
    r = subprocess.run(
        [sys.executable, str(JOB), "--store", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "holds no finished demo" in r.stderr
    assert not (tmp_path / "empty").exists()


def test_bad_flags_and_stores_are_refused_before_anything_is_written(job, tmp_path):
    with pytest.raises(ConfigError, match="num_samples must be > 0"):
        job.main(["--store", str(tmp_path), "--num-samples", "0"])
    with pytest.raises(ConfigError, match="--seed must be >= 0"):
        job.main(["--store", str(tmp_path), "--seed", "-1"])
    latent = _store(tmp_path / "lat", {"scenario": "latent", "samplers": {}})
    with pytest.raises(DataError, match="not on scenario 'latent'"):
        job.main(["--store", str(latent)])
    bad = _store(tmp_path / "bad", {"samplers": {}}, {"compare": {"num_samples": -3}})
    with pytest.raises(ConfigError, match="num_samples must be > 0"):
        job.main(["--store", str(bad)])
    assert sorted(p.name for p in bad.iterdir()) == ["provenance.json", "report.json"]
    off = _store(tmp_path / "off", {"samplers": {}}, {"compare": {"contenders": []}})
    with pytest.raises(DataError, match="no contenders to compare"):
        job.main(["--store", str(off)])

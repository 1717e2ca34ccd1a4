"""The side-by-side comparison: seed matching, the skipped contenders, and the quick demo's table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import CompareConfig, ReplicaConfig, SamplerConfig
from pipeline.data.storage import open_store
from pipeline.orchestration.compare import Sampled, compare_samplers, same_seeds


def _sampled(sampler: str, n: int, span: float = 1.0) -> Sampled:
    rows = [
        {"key": f"{sampler}-{i // 4:05d}-{i % 4:03d}", "nn_similarity": 0.5 + 0.5 * i / n}
        for i in range(n)
    ]
    pixels = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
    info = {"num_samples": n, "sampling_span_s": span, "folder": f"samples/r/{sampler}"}
    return Sampled(info, rows, pixels)


def test_same_seeds_keeps_the_rows_of_the_given_seeds_with_their_pixels():
    main = _sampled("ddim", 12)
    kept = same_seeds(main, {"00000-001", "00002-003", "00009-000"}, n=99)
    assert [r["key"] for r in kept.rows] == ["ddim-00000-001", "ddim-00002-003"]
    assert kept.pixels[:, 0, 0, 0].tolist() == [1, 11]  # each row keeps its own image
    first = same_seeds(main, None, n=5)  # no new run to match: the first n
    assert len(first.rows) == 5 and first.pixels[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert kept.run_info is main.run_info  # the time per sample is the whole run's


def test_index_contenders_are_skipped_under_a_module_embedding(tmp_path):
    module = tmp_path / "sscd.pt"  # checked to exist by the config; never loaded here
    module.write_bytes(b"not loaded")
    store = open_store(str(tmp_path / "store"))
    replicas = ReplicaConfig(embedding=f"module:{module}", threshold=0.75)
    done = {"ddim": _sampled("ddim", 8, 2.0), "cpsample": _sampled("cpsample", 8, 3.0)}
    section, figures = compare_samplers(
        store, "r", "digits", CompareConfig(contenders=("ddim", "cpsample", "guard", "amg")),
        SamplerConfig(seed=3), replicas, "models/r/denoiser", "models/r/classifier", None,
        np.linspace(0.0, 0.6, 101), done,
    )  # fmt: skip
    assert set(section["skipped"]) == {"guard", "amg"}
    assert f"module:{module}" in section["skipped"]["guard"]
    rows = {r["name"]: r for r in section["rows"]}
    assert list(rows) == ["ddim", "cpsample"] and section["seed"] == 3
    assert rows["cpsample"]["time_vs_ddim"] == pytest.approx(1.5)
    assert rows["ddim"]["num_copies"] == 4  # 0.5 + 0.5 i / 8 >= 0.75 for i >= 4
    assert section["holdout_copies"] == pytest.approx(0.0)
    assert figures["comparison.png"][:4] == b"\x89PNG"
    assert not list((tmp_path / "store").rglob("*"))  # nothing sampled, nothing written
    assert compare_samplers(
        store, "r", "digits", CompareConfig(contenders=()), SamplerConfig(), replicas, "d", "c",
        None, np.zeros(3), done,
    ) == ({}, {})  # fmt: skip


def test_the_quick_demo_reports_every_contender_on_the_same_seeds(demo_quick_store):
    path, report = demo_quick_store
    section = report["comparison"]
    rows = {r["name"]: r for r in section["rows"]}
    assert list(rows) == ["ddim", "cpsample", "guard", "amg", "cpsample+guard"]
    assert section["num_samples"] == 16 and section["threshold"] == report["threshold"]
    assert all(r["num_samples"] == 16 for r in rows.values())
    # the guarded rows ship nothing at or above the threshold: the guard's promise, re-checked
    assert rows["guard"]["num_copies"] == 0 and rows["cpsample+guard"]["num_copies"] == 0
    assert rows["guard"]["guard_redrawn"] >= 0 and rows["ddim"]["guard_redrawn"] is None
    assert rows["ddim"]["time_vs_ddim"] == pytest.approx(1.0)
    assert all(r["seconds_per_sample"] > 0 for r in rows.values())
    folders = {n: r["folder"] for n, r in rows.items()}
    assert folders == {
        "ddim": "samples/demo/ddim", "cpsample": "samples/demo/cpsample",
        "guard": "samples/demo-guard/ddim", "amg": "samples/demo/amg",
        "cpsample+guard": "samples/demo-guard/cpsample",
    }  # fmt: skip
    # every row names what made it: the denoiser for all, the classifier for CPSample's, the
    # training data searched for the guard's and AMG's; the same denoiser digest everywhere
    prov = {n: r["provenance"] for n, r in rows.items()}
    assert len({p["denoiser"] for p in prov.values()}) == 1
    assert "classifier" in prov["cpsample+guard"] and "classifier" not in prov["amg"]
    assert "guard_data" in prov["guard"] and "guard_data" in prov["amg"]
    assert rows["guard"]["sampler_settings"]["guard"] == report["threshold"]
    assert rows["amg"]["sampler_settings"]["amg_threshold"] == report["threshold"]
    reports = Path(path) / "reports" / "demo"
    for name in ("guard", "amg", "cpsample-guard"):  # the new runs' replica parts
        assert list((reports / f"replicas-{name}").glob("*.jsonl"))
    assert (reports / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Samplers side by side" in (reports / "report.md").read_text()

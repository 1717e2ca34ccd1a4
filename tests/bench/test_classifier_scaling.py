"""The classifier scaling bench (bench/classifier_scaling.py) at a tiny size, its fits and its merge
into results.json; bench/p7_cuda.py's GPU extension of the curve through its CPU-sized path; and
bench/cost_projection.py following the per-width fits."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import classifier_scaling as cs
import cost_projection as cp
import p7_cuda


def test_power_fit_recovers_a_known_law():
    fit = cs.power_fit(
        [(256, 3 * 256**1.2), (1024, 3 * 1024**1.2), (4096, 3 * 4096**1.2), (8, None)]
    )
    assert fit["k"] == pytest.approx(1.2, abs=1e-3) and fit["a"] == pytest.approx(3.0, rel=1e-3)
    assert [p[0] for p in fit["points"]] == [256, 1024, 4096]  # the unreached one left out
    assert cs.power_fit([(256, 100.0)]) is None


def test_evaluations_thin_out_at_large_step_counts():
    steps = cs.eval_steps(5000)
    assert steps[:10] == list(range(100, 1100, 100)) and steps[-1] == 5000
    gaps = [b / a for a, b in itertools.pairwise(steps[10:])]
    assert all(g <= 1.2 for g in gaps) and len(steps) < 30


def test_images_are_distinct_rgb_or_digits():
    x, keys = cs.scaling_images("synthetic", 50)
    assert x.shape == (50, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and len(set(keys)) == 50
    d, _ = cs.scaling_images("digits", 10)
    assert d.shape == (10, 1, 8, 8)
    with pytest.raises(ValueError, match="digits has 1797 images"):
        cs.scaling_images("digits", 5000)
    with pytest.raises(ValueError, match="source must be"):
        cs.scaling_images("cifar", 5)


def _row(n, w, steps, params):
    return {"n": n, "base_channels": w, "params": params, "steps_to_95": steps, "curve": []}


def test_summary_fits_each_width_and_names_the_parameters_needed():
    rows = [_row(256, 8, 200, 40), _row(1024, 8, 800, 40), _row(4096, 8, None, 40),
            _row(256, 32, 100, 200), _row(1024, 32, 300, 200), _row(4096, 32, 1200, 200)]  # fmt: skip
    out = cs.summarise(rows, "synthetic", budgets=(2000,))
    assert out["fits"]["8"]["k"] == pytest.approx(1.0)
    assert out["fits"]["8"]["not_reached_at_n"] == [4096]
    # width 32's N=256 row reached 95% at the first evaluation: a bound, left out of the fit
    assert out["fits"]["32"]["points"] == [[1024, 300.0], [4096, 1200.0]]
    assert out["ratio"] == out["fits"]["32"]["k"] == pytest.approx(1.0)
    need = out["params_needed"]["2000"]["by_n"]
    assert {n: v["base_channels"] for n, v in need.items()} == {"256": 8, "1024": 8, "4096": 32}
    flops = out["train_flops_by_width"]
    assert flops["32"] > 3 * flops["8"] > 0
    # cheapest = least steps x FLOPs: width 8 at 1,024 (800 x f8 < 300 x f32)
    assert out["cheapest_width_by_n"]["1024"]["base_channels"] == (
        8 if 800 * flops["8"] < 300 * flops["32"] else 32
    )


def test_a_tiny_measurement_merges_into_results_keeping_the_others(tmp_path):
    path, rows_file = tmp_path / "results.json", str(tmp_path / "r.jsonl")
    old = {"steps_to_95_by_n": {"64": 100}, "metric": "m", "arch": {}, "classifier_params": 1}
    path.write_text(json.dumps({"P1": {"ratio": 2.0}, "classifier_scaling": old}))
    rows = cs.measure(ns=(32,), widths=(8,), max_steps=20, rows_file=rows_file)
    assert len(rows) == 1 and rows[0]["curve"][-1][0] == 20 and rows[0]["params"] > 0
    assert 0.0 <= rows[0]["final_accuracy"] <= 1.0 and rows[0]["source"] == "synthetic"
    # a rerun with the same rows file skips (and returns) the rows it holds
    again = cs.measure(ns=(32,), widths=(8,), max_steps=20, rows_file=rows_file)
    assert [(r["n"], r["final_accuracy"]) for r in again] == [(32, rows[0]["final_accuracy"])]
    assert len(Path(rows_file).read_text().splitlines()) == 1
    cs.merge_into_results(rows, path)
    res = json.loads(path.read_text())
    assert res["P1"] == {"ratio": 2.0}
    assert res["classifier_scaling"]["digits16"]["steps_to_95_by_n"] == {"64": 100}
    assert res["classifier_scaling"]["rows"][0]["n"] == 32


def test_p7_extends_the_curve_through_its_cpu_sized_path():
    out = p7_cuda.classifier_scaling_curve("cpu", ns=(32,), widths=(8,), max_steps=20, seconds=60)
    assert out["device"] == "cpu" and out["rows"][0]["n"] == 32 and "fits" in out


def test_cost_projection_follows_the_per_width_fits():
    scaling = {"fits": {"16": {"a": 1.0, "k": 1.0, "n_max": 4096},
                        "32": {"a": 0.5, "k": 1.0, "n_max": 4096}}}  # fmt: skip
    flops = {"clf_by_width": {16: {"train": 1e6, "guide": 5e5, "params": 10},
                              32: {"train": 4e6, "guide": 2e6, "params": 40}}}  # fmt: skip
    c = cp.classifier_choice(scaling, 1_000_000, flops)
    # width 16: 1e6 steps x 1e6 FLOP < width 32: 5e5 x 4e6
    assert c["width"] == 16 and c["predicted"] == 1_000_000
    assert c["steps"] == pytest.approx(cp_margin() * 1_000_000) and c["train"] == 1e6
    assert "measured at N <= 4,096" in c["source"]


def cp_margin() -> float:
    from pipeline.core.classifier_sizing import MARGIN

    return MARGIN

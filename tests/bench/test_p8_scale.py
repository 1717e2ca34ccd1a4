"""P8's harness arithmetic (bench/p8_measure.py, p8_scale.py, p8_index.py) and the cost projection
(bench/cost_projection.py): role aggregation, marginal cost, near-threshold query selection, the
part-index projection and the cost arithmetic. Ray-free; the end-to-end run is the benchmark itself."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import p8_index
import p8_measure as m
import p8_scale

MB = 2**20


# ------------------------------------------------------------------------------------- memory
def test_the_largest_process_counts_whatever_its_name_and_the_driver_on_its_own():
    peaks = {
        10: ("driver", 300 * MB),
        11: ("ray_daemon gcs_server", 60 * MB),
        12: ("ray_worker ray::_add_part", 1800 * MB),  # only at the big size: must not drop out
        13: ("ray_worker ray::_add_part", 900 * MB),
    }
    out = m.stage_memory(peaks, driver_pid=10)
    assert out["largest_mb"] == 1800.0 and out["largest_role"] == "ray_worker ray::_add_part"
    assert out["driver_mb"] == 300.0 and out["processes"] == 4
    assert out["by_role"]["ray_worker ray::_add_part"] == 1800.0
    assert m.stage_memory({10: ("driver", 5 * MB)}, 10)["largest_role"] == "driver"
    with pytest.raises(ValueError, match="no process"):
        m.stage_memory({}, 1)


def test_memory_ratios_compare_largest_and_driver_across_sizes_not_names():
    small = {"largest_mb": 1000.0, "largest_role": "ray_worker ray::Sampler", "driver_mb": 200.0}
    big = {"largest_mb": 1800.0, "largest_role": "ray_worker ray::_add_part", "driver_mb": 220.0}
    r = m.memory_ratios(small, big)
    assert r["largest"] == pytest.approx(1.8) and r["driver"] == pytest.approx(1.1)
    assert r["worst"] == pytest.approx(1.8) and r["met"] is False
    flat = m.memory_ratios(small, {**small, "driver_mb": 240.0})
    assert flat["worst"] == pytest.approx(1.2) and flat["met"] is True


def test_a_worker_keeps_its_busy_title_and_its_peak():
    state = m.fold_peak(None, "ray_worker ray::ReplicaScorer", 500)
    state = m.fold_peak(state, "ray_worker ray::IDLE", 300)
    assert state == ("ray_worker ray::ReplicaScorer", 500)
    assert m.fold_peak(state, "gone", 900) == ("ray_worker ray::ReplicaScorer", 900)
    assert m.role_of(["ray::_add_part()"], "python") == "ray_worker ray::_add_part"
    assert m.role_of(["/x/gcs_server", "--flag"], "gcs_server") == "ray_daemon gcs_server"
    assert m.role_of(["python", "jobs/x.py"], "python") == "other python"


# ---------------------------------------------------------------------------------------- time
def test_marginal_cost_subtracts_start_up_and_compares_the_two_halves():
    # 30 s start-up, 2 ms per image up to 110k, then 2.4 ms per image: 1.2x, misses <= 1.1
    walls = {20_000: 30 + 40.0, 110_000: 30 + 220.0, 200_000: 30 + 220.0 + 216.0}
    units = {n: float(n) for n in walls}
    iv = m.marginal_costs(walls, units)
    assert [(i["from"], i["to"]) for i in iv] == [(20_000, 110_000), (110_000, 200_000)]
    assert iv[0]["s_per_unit"] == pytest.approx(0.002) and iv[1]["s_per_unit"] == pytest.approx(
        0.0024
    )
    assert m.startup_s(walls, units) == pytest.approx(30.0)
    r = m.marginal_ratio(iv)
    assert r["ratio"] == pytest.approx(1.2) and r["met"] is False
    noisy = {20_000: 70.0, 110_000: 60.0, 200_000: 250.0}  # a wall fell as N grew: no verdict
    assert m.marginal_ratio(m.marginal_costs(noisy, units))["met"] is None
    linear = {n: 30 + 0.002 * n for n in walls}
    assert m.marginal_ratio(m.marginal_costs(linear, units))["met"] is True


def test_two_sizes_give_a_marginal_cost_but_no_verdict_and_bad_input_is_refused():
    iv = m.marginal_costs({500: 10.0, 2000: 13.0}, {500: 50.0, 2000: 200.0})  # per sample (N/10)
    assert iv[0]["s_per_unit"] == pytest.approx(0.02)
    assert m.marginal_ratio(iv)["met"] is None
    with pytest.raises(ValueError, match="two sizes"):
        m.marginal_costs({500: 1.0}, {500: 1.0})
    with pytest.raises(ValueError, match="must grow"):
        m.marginal_costs({500: 1.0, 2000: 2.0}, {500: 5.0, 2000: 5.0})


def test_stage_checks_use_samples_for_the_sample_stages_and_skip_fixed_work():
    mem = {"largest_mb": 100.0, "driver_mb": 50.0, "largest_role": "driver"}
    per_n = {
        n: {
            "make_shards": {"wall_s": 5 + n / 1000, "units": float(n), "memory": mem},
            "check_replicas": {"wall_s": 8 + n / 100, "units": n / 10, "memory": mem},
            "train_denoiser": {"wall_s": 60.0, "units": None, "memory": mem},
        }
        for n in (500, 1250, 2000)
    }
    checks = p8_scale.stage_checks(per_n)
    assert checks["check_replicas_marginal_time"]["unit"] == "sample"
    assert checks["check_replicas_marginal_time"]["intervals"][0]["s_per_unit"] == pytest.approx(
        0.1
    )
    assert checks["make_shards_marginal_time"]["ratio"] == pytest.approx(1.0)
    assert checks["make_shards_marginal_time"]["startup_s"] == pytest.approx(5.0)
    assert "train_denoiser_marginal_time" not in checks and checks["train_denoiser_memory"]["met"]
    assert [p8_scale.num_samples(n) for n in (20_000, 200_000, 3)] == [2000, 20_000, 1]
    # the classifier leaves never-seen held-out images for evaluate at every N
    assert [p8_scale.classifier_holdout(n) for n in (500, 20_000, 200_000)] == [12, 500, 1000]


# ---------------------------------------------------------------------------------------- index
def test_near_threshold_queries_are_those_in_the_band_below_and_above():
    sims = np.array([0.93, 0.9401, 0.955, 0.97, 0.979, 0.981, 0.99, 0.5])
    mask = m.near_threshold_mask(sims, 0.97)
    assert mask.tolist() == [False, True, True, True, True, False, False, False]
    picked = m.pick_near_threshold(sims, 0.97, 2, seed=3)
    assert len(picked) == 2 and set(picked) <= {1, 2, 3, 4} and list(picked) == sorted(picked)
    assert m.pick_near_threshold(sims, 0.97, 10).tolist() == [1, 2, 3, 4]


def test_blends_land_near_the_threshold_on_centred_pixels():
    from pipeline.data.sources import synthetic_image
    from pipeline.fanout.index import l2_normalise

    train = np.stack([synthetic_image(0, i, 32) for i in range(64)])
    other = np.stack([synthetic_image(99, i, 32) for i in range(64)])
    w = np.linspace(*p8_index.BLEND, 64)
    q = p8_index.blend(train, other, w)
    assert q.dtype == np.uint8 and q.shape == train.shape
    mean = train.reshape(64, -1).mean(0) / 255.0
    emb = lambda x: l2_normalise(x.reshape(len(x), -1) / 255.0 - mean)  # noqa: E731
    own = (emb(q) * emb(train)).sum(1)  # similarity to the source image
    assert own[0] > own[-1]  # more of the other image: further from the source
    assert m.near_threshold_mask(own, 0.97).mean() > 0.2  # a good share lands in the band


def test_decision_stats_count_recall_and_agreement():
    exact = np.array([0.99, 0.968, 0.975, 0.5])
    found = np.array([0.99, 0.968, 0.96, 0.4])  # one decision flips, two neighbours missed
    out = m.decision_stats(found, exact, 0.97)
    assert out["recall_at_1"] == 0.5 and out["decision_agreement"] == 0.75
    assert out["replicates_exact"] == 2 and out["replicates_index"] == 1
    with pytest.raises(ValueError, match="same non-empty shape"):
        m.decision_stats(found[:2], exact, 0.97)


def test_s3_requests_are_counted_by_method_from_the_moto_log():
    log = [
        '127.0.0.1 - - [06/Dec/2026 15:57:54] "\x1b[31m\x1b[1mPUT /x HTTP/1.1\x1b[0m" 400 -',
        '127.0.0.1 - - [06/Dec/2026 15:57:55] "GET /b/k?range HTTP/1.1" 206 -',
        '127.0.0.1 - - [06/Dec/2026 15:57:55] "HEAD /b/k HTTP/1.1" 200 -',
        " * Running on http://127.0.0.1:37845",
    ]
    assert m.count_requests(log) == {"GET": 1, "HEAD": 1, "PUT": 1, "total": 3}


# ------------------------------------------------------------------------------- index in parts
def test_part_vectors_are_unit_norm_deterministic_and_part_independent():
    a = p8_index.synthetic_vectors(1, 0, 70_000, 16)
    b = p8_index.synthetic_vectors(1, p8_index.CHUNK, 10, 16)
    assert a.shape == (70_000, 16) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a[p8_index.CHUNK : p8_index.CHUNK + 10], b)  # a part needs no other
    with pytest.raises(ValueError, match="multiple"):
        p8_index.synthetic_vectors(1, 5, 10, 16)


def test_ivf_params_follow_the_replica_index_and_100m_is_parts_times_part_cost():
    p = p8_index.ivf_params(10_000_000)
    assert p["nlist"] == 12_649 and p["train_samples"] == 39 * 12_649
    assert p8_index.ivf_params(1000)["nlist"] == 25  # at least 39 training rows per list
    assert p8_index.ivf_params(10_000_000, cap=262_144)["train_samples"] == 262_144
    parts = [{"wall_s": s, "vectors": 1_000_000, "bytes": 270_000_000, "peak_rss_mb": mb}
             for s, mb in ((100.0, 600.0), (120.0, 650.0), (110.0, 700.0))]  # fmt: skip
    out = p8_index.project_parts(parts, {"wall_s": 300.0}, 3_000_000, target=300_000_000)
    assert out["parts"] == 300 and out["per_part_s_measured"] == 110.0
    assert out["per_part_s_projected"] == pytest.approx(1100.0)  # sqrt(100) longer list scan
    assert out["vcpu_hours_projected"] == pytest.approx(300 * 1100.0 * 2 / 3600)
    assert out["train_s_projected"] == pytest.approx(30_000.0)
    assert out["index_bytes_projected"] == pytest.approx(270 * 300_000_000)
    assert out["part_task_peak_mb_measured"] == 700.0


# ------------------------------------------------------------------------------ cost projection
def test_flops_are_counted_two_per_multiply_add():
    import cost_projection as cp
    import torch

    lin = torch.nn.Linear(64, 32, bias=False)
    assert cp.count_flops(lambda: lin(torch.zeros(5, 64))) == 2 * 5 * 64 * 32


def test_classifier_steps_follow_the_measured_power_law():
    import cost_projection as cp

    scaling = {"steps_to_95_by_n": {"64": 100, "256": 200, "1024": 800, "4096": None}}
    steps, k = cp.steps_to_fit(scaling, 1024 * 1000)
    assert k == pytest.approx(1.0) and steps == pytest.approx(800_000)
    with pytest.raises(ValueError, match="two N"):
        cp.steps_to_fit({"steps_to_95_by_n": {"64": 100}}, 10)


def test_the_projection_tags_every_number_and_does_the_arithmetic():
    import cost_projection as cp

    results = {
        "classifier_scaling": {"steps_to_95_by_n": {"256": 200, "1024": 800}},
        "P8": {
            "index": {"index_n": 1_000_000, "build_index": {"wall_s": 3600.0}},
            "s3": {"size": 1000, "stages": {
                "make_shards": {"requests": {"PUT": 40, "POST": 10, "GET": 5, "total": 55}},
                "input_epoch": {"requests": {"GET": 80, "HEAD": 15, "DELETE": 3, "total": 98}},
            }},
        },
    }  # fmt: skip
    flops = {"unet": 1e10, "clf_guide": 1e9, "clf_train": 2e9, "fired": 0.5}
    out = cp.project(results, flops, sizes=(1_000_000,))["1000000"]
    h100 = cp.SUSTAINED_TFLOPS["h100"] * 1e12 * 3600
    # sampling: 100k samples x 50 steps x (1e10 + 0.5 x 1e9) FLOP
    assert out["sampling"]["h100_hours"]["value"] == pytest.approx(
        1e5 * 50 * 1.05e10 / h100, rel=1e-3
    )
    assert out["classifier_steps"]["value"] == pytest.approx(800 * 1e6 / 1024, rel=1e-3)
    assert out["classifier_train"]["h100_usd"]["basis"] == "projected"
    # 2 vCPUs x 1 h at 1M
    assert out["index"]["build_vcpu_hours"]["value"] == pytest.approx(2.0)
    req = cp.s3_requests_per_image(results["P8"])
    assert req == {"put": 0.05, "get": 0.1, "size": 1000}
    want = 1e6 * (0.05 * cp.PRICES["s3_put_per_1000"] + 0.1 * cp.PRICES["s3_get_per_1000"]) / 1000
    assert out["s3_requests_usd"]["value"] == pytest.approx(want, rel=1e-3)

    def tagged(node):
        if isinstance(node, dict) and "basis" in node:
            return [node["basis"]]
        return [b for v in node.values() for b in tagged(v)] if isinstance(node, dict) else []

    assert set(tagged(out)) <= {"measured", "projected", "assumption"} and len(tagged(out)) > 15
    with pytest.raises(ValueError, match="basis"):
        cp.tag(1.0, "x", "guessed", "nowhere")

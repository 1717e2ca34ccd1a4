"""The comparison's rows, ratios, table and figure (Ray-free)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import ConfigError
from pipeline.core.config_eval import CONTENDER_NAMES
from pipeline.evaluation.comparison import (
    CONTENDERS,
    comparison_figure,
    comparison_markdown,
    comparison_row,
    fd_of,
    relative_to_reference,
)

PCT = {"holdout_p95": 0.9, "holdout_p99": 0.95}


def _row(name, sims, span, n, quality=None, guard=None):
    info = {"num_samples": n, "sampling_span_s": span, "folder": f"samples/x/{name}"}
    if guard is not None:
        info["guard"] = guard
    return comparison_row(CONTENDERS[name], sims, 0.97, PCT, quality or {}, info)


def test_contenders_match_the_config_names_and_their_needs():
    assert tuple(CONTENDERS) == CONTENDER_NAMES
    needs = {n: c.needs() for n, c in CONTENDERS.items()}
    assert needs["ddim"] == {"classifier": False, "index": False, "training_images": False}
    assert needs["cpsample"] == {"classifier": True, "index": False, "training_images": False}
    assert needs["amg"]["index"] and needs["guard"]["training_images"]
    assert needs["cpsample+guard"] == {"classifier": True, "index": True, "training_images": True}
    assert CONTENDERS["cpsample+guard"].slug == "cpsample-guard"
    assert (CONTENDERS["guard"].sampler, CONTENDERS["guard"].guard) == ("ddim", True)


def test_row_counts_copies_shares_and_time_per_sample():
    sims = np.array(
        [0.99, 0.97, 0.96, 0.92, 0.5]
    )  # 2 at/above 0.97, 4 above p95 (0.9), 3 above p99
    r = _row("cpsample", sims, span=2.0, n=4, quality={"confident_fraction": 0.8, "fd": 12.5})
    assert r["num_samples"] == 5 and r["num_copies"] == 2
    assert r["copies"] == pytest.approx(0.4)
    assert r["above_holdout_p95"] == pytest.approx(0.8)
    assert r["above_holdout_p99"] == pytest.approx(0.6)
    assert r["seconds_per_sample"] == pytest.approx(0.5)  # no recorded seconds: the span / count
    info = {"num_samples": 4, "sampling_span_s": 2.0, "sampling_seconds": 6.0}
    timed = comparison_row(CONTENDERS["ddim"], sims, 0.97, PCT, {}, info)
    assert timed["seconds_per_sample"] == pytest.approx(1.5)  # the shards' recorded drawing time
    assert r["guard_redrawn"] is None and r["needs"]["classifier"]
    g = _row("guard", sims, 3.0, 5, guard={"rejected": 7, "unfilled": 0})
    assert (g["guard_redrawn"], g["guard_unfilled"]) == (7, 0)
    with pytest.raises(ConfigError, match="amg has no scored samples"):
        _row("amg", [], 1.0, 1)


def test_ratios_to_ddim_and_the_missing_reference():
    rows = [
        _row("ddim", [0.99, 0.5], 1.0, 10, {"confident_fraction": 0.8}),
        _row("amg", [0.5, 0.5], 1.5, 10, {"confident_fraction": 0.6}),
        _row("cpsample", [0.5, 0.5], 0.0, 10, {}),
    ]
    relative_to_reference(rows)
    assert rows[0]["time_vs_ddim"] == pytest.approx(1.0)
    assert rows[1]["time_vs_ddim"] == pytest.approx(1.5)
    assert rows[1]["confident_fraction_vs_ddim"] == pytest.approx(0.75)
    assert rows[2]["confident_fraction_vs_ddim"] is None
    with pytest.raises(ConfigError, match="no 'ddim' row"):
        relative_to_reference(rows[1:])


def test_fd_of_prefers_the_domain_fd_then_the_encoder():
    assert fd_of({"fd": 3.0, "fd_encoder": 9.0}) == ("FD", 3.0)
    assert fd_of({"fd_encoder": 9.0}) == ("FD-encoder", 9.0)
    assert fd_of({}) == ("FD", None)


def test_table_and_figure():
    rows = relative_to_reference(
        [
            _row("ddim", [0.99, 0.98, 0.5, 0.4], 1.0, 4, {"confident_fraction": 0.9, "fd": 10.0}),
            _row(
                "guard", [0.9, 0.5, 0.5, 0.4], 2.0, 4, {"confident_fraction": 0.9}, {"rejected": 3}
            ),
        ]
    )
    section = {"rows": rows, "num_samples": 4, "seed": 1, "threshold": 0.97,
               "holdout_copies": 0.0012, "skipped": {"amg": "a reason"}}  # fmt: skip
    text = "\n".join(comparison_markdown(section))
    assert (
        "| ddim | 50.00% (2) | 50.00% | 50.00% | 0.900 (1.00x) | 10.00 | 250.0 ms (1.00x)" in text
    )
    assert (
        "| guard | 0.00% (0) |" in text and "(2.00x) | 3 | denoiser + training-set index |" in text
    )
    assert "| held-out real (baseline) | 0.12% | 5% | 1% |" in text
    assert "Not run: amg (a reason)" in text
    png = comparison_figure(section)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

"""The report's figures (pipeline.evaluation.figures): pairs, grids, histograms with the held-out
percentile lines, the Pareto figure with the attack AUC, ROC curves."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.figures import (
    grid_figure,
    histogram_figure,
    pairs_figure,
    pareto_figure,
    roc_figure,
)
from tests.evaluation.test_report import DPI, _attack, _decode, _red, _sweep_point, _within


def test_pairs_figure_is_a_png_with_a_red_frame_per_copy():
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    neighbours = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    none = _decode(pairs_figure(samples, neighbours, np.array([0.5, 0.6, 0.7, 0.8]), 0.97, "t"))
    one = _decode(pairs_figure(samples, neighbours, np.array([0.5, 0.99, 0.7, 0.8]), 0.97, "t"))
    four = _decode(pairs_figure(samples, neighbours, np.full(4, 0.99), 0.97, "t"))
    _within(one.shape, 2 * 4 * 1.1, 1.25)  # cols=4: 8 panels of 1.1 in, one row of 1.25 in
    assert none.shape == one.shape == four.shape
    assert _red(none) == 0 < _red(one) < _red(four)
    # a second row of pairs adds about one row's height (1.25 in)
    eight = _decode(
        pairs_figure(
            np.concatenate([samples] * 2),
            np.concatenate([neighbours] * 2),
            np.full(8, 0.5),
            0.97,
            "t",
        )
    )
    assert eight.shape[1] == one.shape[1]
    assert 0.8 * 1.25 * DPI <= eight.shape[0] - one.shape[0] <= 1.25 * DPI + 1


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_figure_draws_the_images_in_rows_of_cols(channels):
    black = _decode(grid_figure(np.zeros((16, 8, 8, channels), np.uint8), "t"))
    white = _decode(grid_figure(np.full((16, 8, 8, channels), 255, np.uint8), "t"))
    _within(black.shape, 16 * 0.6, 0.6)
    assert black.shape == white.shape
    dark = lambda a: float((a.mean(-1) < 30).mean())  # noqa: E731
    assert dark(black) > 0.3 and dark(white) < 0.01
    two_rows = _decode(grid_figure(np.zeros((17, 8, 8, channels), np.uint8), "t"))
    assert two_rows.shape[1] == black.shape[1]
    assert 0.8 * 0.6 * DPI <= two_rows.shape[0] - black.shape[0] <= 0.6 * DPI + 1


def test_histogram_roc_and_pareto_figures_are_pngs_of_their_size():
    rng = np.random.default_rng(1)
    hist = _decode(histogram_figure({"ddim": rng.random(50), "cpsample": rng.random(50)}, 0.97))
    _within(hist.shape, 6.5, 3.6)
    assert _red(hist) > 0  # the threshold line
    roc = _decode(roc_figure({"ddim": _attack(0.5), "cpsample": _attack(0.9)}, "attack"))
    _within(roc.shape, 5.0, 4.2)
    empty = {"quality_metric": None, "points": [], "target_rate": 0.02, "threshold": 0.97}
    data = pareto_figure(empty)
    _within(_decode(data).shape, 6.5, 4.2)
    described = json.loads(Image.open(io.BytesIO(data)).text["Description"])
    assert described == {"quality_metric": None, "points": []}


def test_histogram_marks_the_held_out_percentiles_beside_the_threshold():
    from pipeline.evaluation.report import reference_lines

    rng = np.random.default_rng(2)
    series = {"ddim": rng.random(80), "held-out real": rng.random(80)}
    pct = {"holdout_p95": 0.8, "holdout_p99": 0.9}
    lines = reference_lines(0.97, pct)
    assert [(ln["name"], ln["x"]) for ln in lines] == [
        ("threshold", 0.97),
        ("holdout_p95", 0.8),
        ("holdout_p99", 0.9),
    ]
    assert lines[1]["label"].startswith("held-out p95 0.800 (5% of real above")
    assert lines[2]["label"].startswith("held-out p99 0.900 (1% of real above")
    marked = histogram_figure(series, 0.97, pct)
    plain = histogram_figure(series, 0.97)  # the old call: the threshold alone
    drawn = json.loads(Image.open(io.BytesIO(marked)).text["Description"])
    assert drawn == {
        "lines": [
            {"name": "threshold", "x": 0.97},
            {"name": "holdout_p95", "x": 0.8},
            {"name": "holdout_p99", "x": 0.9},
        ]
    }
    assert json.loads(Image.open(io.BytesIO(plain)).text["Description"]) == {
        "lines": [{"name": "threshold", "x": 0.97}]
    }
    purple = lambda a: int(  # noqa: E731  (tab:purple, the p95 line)
        (np.abs(a.astype(int) - np.array([148, 103, 189])).max(-1) < 12).sum()
    )
    a, b = _decode(marked), _decode(plain)
    _within(a.shape, 6.5, 3.6)
    assert purple(a) > 50 and purple(b) == 0 and _red(a) > 0


def test_pareto_figure_colours_by_attack_auc_and_adds_the_p99_panel():
    points = [
        _sweep_point("ddim", "ddim", 0.25, 3.0, above_holdout_p99=0.4, mia_auc=0.9),
        _sweep_point("b", "cpsample", 0.0, 4.5, above_holdout_p99=0.02, mia_auc=0.55),
    ]
    sweep = {"quality_metric": "fd", "points": points, "target_rate": 0.02, "threshold": 0.97,
             "target_above_p99": 0.05, "pareto_front": ["ddim", "b"],
             "recommended": {"label": "b"}}  # fmt: skip
    data = pareto_figure(sweep)
    described = json.loads(Image.open(io.BytesIO(data)).text["Description"])
    assert described["colour"] == "mia_auc" and described["second_panel"] == "above_holdout_p99"
    assert described["points"] == [
        {"label": "ddim", "replication_rate": 0.25, "quality": 3.0, "above_holdout_p99": 0.4,
         "mia_auc": 0.9},
        {"label": "b", "replication_rate": 0.0, "quality": 4.5, "above_holdout_p99": 0.02,
         "mia_auc": 0.55},
    ]  # fmt: skip
    two = _decode(data)
    # rows with the AUC only: one panel, coloured; rows with neither: the plain figure
    auc_only = [{k: v for k, v in p.items() if k != "above_holdout_p99"} for p in points]
    one = pareto_figure({**sweep, "points": auc_only})
    assert "second_panel" not in json.loads(Image.open(io.BytesIO(one)).text["Description"])
    plain = pareto_figure({**sweep, "points": [
        {k: v for k, v in p.items() if k not in ("above_holdout_p99", "mia_auc")} for p in points
    ]})  # fmt: skip
    assert set(json.loads(Image.open(io.BytesIO(plain)).text["Description"])) == {
        "quality_metric",
        "points",
    }
    w_plain, w_one = _decode(plain).shape[1], _decode(one).shape[1]
    _within(_decode(plain).shape, 6.5, 4.2)
    assert w_plain < w_one < two.shape[1]  # the colour bar, then the second panel
    assert two.shape[1] > 1.6 * w_plain

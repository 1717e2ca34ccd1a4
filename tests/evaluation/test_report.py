"""report.json/report.md: merging a run's sections, the root copy, the markdown, and PNG figures."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data.storage import open_store
from pipeline.evaluation.report import (
    evaluation_markdown,
    grid_figure,
    job_markdown,
    markdown,
    merge_report,
    roc_figure,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
DPI = 110  # the figures' dpi


def _decode(data: bytes) -> np.ndarray:
    """Check the PNG signature, decode every pixel, return (H, W, 3) uint8."""
    assert data[:8] == PNG
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    img.load()
    return np.asarray(img.convert("RGB"))


def _within(shape: tuple[int, ...], width_in: float, height_in: float) -> None:
    """A tight-cropped figure is about its nominal size (``figsize`` at ``DPI``), never far off."""
    h, w = shape[:2]
    assert 0.7 * width_in * DPI <= w <= width_in * DPI + 1
    # the title of a short figure may stick out above it (tight bbox keeps it): 0.2 in allowed
    assert 0.7 * height_in * DPI <= h <= (height_in + 0.2) * DPI + 1


def _red(a: np.ndarray) -> int:
    return int(((a[..., 0] > 200) & (a[..., 1] < 60) & (a[..., 2] < 60)).sum())


def _demo_report(**extra) -> dict:
    return {
        "dataset": "digits",
        "num_train": 64,
        "threshold": 0.97,
        "embedding": "centred",
        "samplers": {
            "ddim": {
                "num_samples": 128,
                "replication_rate": 0.125,
                "mean_nn_similarity": 0.91234,
                "quality": {"fd": 12.345678, "confident_fraction": 0.5},
            },
            "cpsample": {
                "num_samples": 128,
                "replication_rate": 0.0078125,
                "mean_nn_similarity": 0.8,
                "alpha": 0.4,
                "scale": 7.0,
                "guidance_fired_fraction": 0.25,
            },
        },
        "holdout_baseline": {"replication_rate": 0.015625, "mean_nn_similarity": 0.85},
        **extra,
    }


def _attack(auc: float) -> dict:
    return {
        "auc": auc,
        "tpr_at_fpr": 0.1,
        "p_value": 0.02,
        "member_mean": 0.5,
        "nonmember_mean": 0.6,
        "num_members": 4,
        "num_nonmembers": 6,
        "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.75, 1.0]},
    }


# ---------------------------------------------------------------------------------- merge_report
def test_merge_report_shallow_replaces_sections_and_deep_merges_them(tmp_path):
    store = open_store(str(tmp_path / "s"))
    first = {"sampling": {"ddim": {"num_samples": 6, "folder": "samples/r/ddim"}}, "note": "a"}
    assert merge_report(store, "r", first) == first
    on_disk = json.loads(store.read_bytes("reports", "r", "report.json"))
    assert on_disk == first
    # shallow: a top-level section is replaced whole, other sections are kept
    got = merge_report(store, "r", {"sampling": {"cpsample": {"num_samples": 4}}})
    assert got == {"sampling": {"cpsample": {"num_samples": 4}}, "note": "a"}
    # deep: nested dicts merge key by key, at every depth; non-dicts replace
    merge_report(store, "r", {"sampling": {"ddim": {"num_samples": 6}}}, deep=True)
    got = merge_report(
        store,
        "r",
        {
            "sampling": {"cpsample": {"guard": {"budget": 2}}},
            "note": {"now": "a dict"},
            "samplers": {"cpsample": {"replication_rate": 0.5}},
        },
        deep=True,
    )
    assert got == {
        "sampling": {
            "ddim": {"num_samples": 6},
            "cpsample": {"num_samples": 4, "guard": {"budget": 2}},
        },
        "note": {"now": "a dict"},
        "samplers": {"cpsample": {"replication_rate": 0.5}},
    }
    got = merge_report(store, "r", {"note": {"now": 3, "new": [1]}}, deep=True)
    assert got["note"] == {"now": 3, "new": [1]}
    got = merge_report(store, "r", {"note": "a string again"}, deep=True)
    assert got["note"] == "a string again" and got["sampling"]["ddim"] == {"num_samples": 6}
    assert json.loads(store.read_bytes("reports", "r", "report.json")) == got
    # no root report.json was there, so none is made
    assert not store.exists("report.json")
    assert sorted(store.listdir("reports", "r")) == ["report.json", "report.md"]


def test_merge_report_refuses_a_fragment_made_from_other_inputs(tmp_path):
    """A report names its inputs; an update from other models, data, samples or index is refused
    (nothing written) and never folded in; ``restart`` (sample --overwrite) starts afresh."""
    from pipeline.data.provenance import StaleArtifactError

    store = open_store(str(tmp_path / "s"))
    d = lambda c: "sha256:" + c * 64  # noqa: E731
    sampled = {"denoiser": d("1"), "samples": {"ddim": d("a")}, "package_version": "0.1.0"}
    merge_report(store, "r", {"sampling": {"ddim": {"num_samples": 6}}}, deep=True, inputs=sampled)
    # another sampler's samples of the same denoiser: the inputs merge key by key, even into a
    # shallow update
    cps = {"denoiser": d("1"), "classifier": d("2"), "samples": {"cpsample": d("b")}}
    got = merge_report(store, "r", {"note": 1}, inputs=cps)
    assert got["inputs"] == {"denoiser": d("1"), "classifier": d("2"), "package_version": "0.1.0",
                             "samples": {"ddim": d("a"), "cpsample": d("b")}}  # fmt: skip
    before = sorted(store.listdir("reports", "r", "parts"))
    # evaluate after retraining: other denoiser, other ddim samples: refused, naming both
    retrained = {"denoiser": d("3"), "samples": {"ddim": d("c")}, "data": d("4")}
    with pytest.raises(StaleArtifactError, match=r"describes other inputs than this update "
                       r"\(differs: denoiser, samples.ddim\)"):  # fmt: skip
        merge_report(store, "r", {"membership_inference": {}}, {"roc.png": PNG}, inputs=retrained)
    assert sorted(store.listdir("reports", "r", "parts")) == before
    assert not store.exists("reports", "r", "roc.png")
    with pytest.raises(StaleArtifactError, match=r"differs: package_version"):
        merge_report(store, "r", {"x": 1}, inputs={"package_version": "0.2.0"})
    # restart: the old report's sections are gone, only the new inputs' are left
    got = merge_report(store, "r", {"sampling": {"ddim": {"num_samples": 2}}}, deep=True,
                       inputs=retrained, restart=True)  # fmt: skip
    assert got == {"sampling": {"ddim": {"num_samples": 2}}, "inputs": retrained}
    assert json.loads(store.read_bytes("reports", "r", "report.json")) == got


def test_root_report_follows_only_when_it_was_this_runs_copy(tmp_path):
    store = open_store(str(tmp_path / "s"))
    write_report(store, "demo", _demo_report(), {})
    assert store.read_bytes("report.json") == store.read_bytes("reports", "demo", "report.json")
    merged = merge_report(store, "demo", {"sweep_note": "x"})
    root = json.loads(store.read_bytes("report.json"))
    assert root == merged and root["sweep_note"] == "x"
    # another run's merge leaves the root (the demo's copy) alone
    merge_report(store, "other", {"sampling": {"ddim": {"num_samples": 1}}})
    assert json.loads(store.read_bytes("report.json")) == merged
    # once the root no longer matches the demo's report, the demo's merges stop touching it
    store.write_bytes(b'{"hand": "edited"}', "report.json")
    merge_report(store, "demo", {"sweep_note": "y"})
    assert json.loads(store.read_bytes("report.json")) == {"hand": "edited"}
    assert json.loads(store.read_bytes("reports", "demo", "report.json"))["sweep_note"] == "y"


def test_merge_report_writes_figures_and_lists_every_png_in_the_markdown(tmp_path):
    store = open_store(str(tmp_path / "s"))
    curves = {"ddim": _attack(0.5)}
    roc = roc_figure(curves, "attack")
    merge_report(store, "r", {"replica_check": {}}, {"roc_b.png": roc})
    merge_report(
        store, "r", {"membership_inference": {"reconstruction": curves}}, {"roc_a.png": roc}
    )
    assert store.read_bytes("reports", "r", "roc_a.png") == roc
    assert store.read_bytes("reports", "r", "roc_b.png") == roc
    md = store.read_bytes("reports", "r", "report.md").decode()
    assert md.startswith("# CPSample run: r\n")
    figures = md[md.index("## Figures") :]
    assert figures.index("![roc_a.png](roc_a.png)") < figures.index("![roc_b.png](roc_b.png)")
    assert "## Membership inference" in md
    assert "| reconstruction | ddim | 0.500 | 0.100 | 0.02 | 0.5 | 0.6 | 4/6 |" in md


def test_merge_report_markdown_follows_the_reports_shape(tmp_path):
    store = open_store(str(tmp_path / "s"))
    # job-shaped: sampling and replica-check sections, scalars only
    merge_report(
        store,
        "job",
        {
            "sampling": {"ddim": {"num_samples": 6, "folder": "samples/job/ddim", "seeds": [1, 2]}},
            "samplers": {"ddim": {"replication_rate": 0.25}},
            "replica_check": {"ddim": {"threshold": 0.97, "figures": ["x.png"]}},
        },
        deep=True,
    )
    md = store.read_bytes("reports", "job", "report.md").decode()
    assert md.startswith("# CPSample run: job\n")
    assert "## Sampling: ddim" in md and "- num_samples: 6" in md
    assert "- folder: samples/job/ddim" in md and "seeds" not in md
    assert "## Replica check: ddim" in md and "- replication_rate: 0.25" in md
    assert "- threshold: 0.97" in md and "figures:" not in md
    # demo-shaped: the demo's table, then the evaluation sections
    merge_report(store, "demo", _demo_report(fid={"skipped": "no weights"}))
    md = store.read_bytes("reports", "demo", "report.md").decode()
    assert md.startswith("# CPSample report: digits\n")
    assert "## FID" in md and "Not measured: no weights" in md
    assert "CPSample run" not in md


# ---------------------------------------------------------------------------------- the markdown
def test_markdown_summarises_the_demo_report():
    report = _demo_report(classifier={"accuracy": 0.75}, timings_s={"train": 1.234, "sample": 10.0})
    md = markdown(report, ["a.png", "b.png"])
    lines = md.splitlines()
    assert lines[0] == "# CPSample report: digits"
    assert "64 training images; replica threshold 0.97 (cosine, centred pixels)." in lines
    assert "| ddim | 128 | 12.50% | 0.9123 | 12.35 | 0.5 | - |" in lines
    assert "| cpsample | 128 | 0.78% | 0.8000 | - | - | 0.25 |" in lines
    assert "| held-out real (baseline) | - | 1.56% | 0.8500 | | | |" in lines
    assert "CPSample knobs: alpha = 0.4, scale s = 7.0." in lines
    assert json.loads(md[md.index("```json") + 7 : md.rindex("```")]) == {"accuracy": 0.75}
    assert "Timings (s): train 1.2, sample 10.0." in lines
    assert lines[-2:] == ["![a.png](a.png)", "![b.png](b.png)"]
    # a DDIM-only report has no knobs line, no classifier section and no timings
    plain = _demo_report()
    del plain["samplers"]["cpsample"]
    md = markdown(plain, [])
    assert "CPSample knobs" not in md and "## Random-label classifier" not in md
    assert "Timings" not in md and md.endswith("## Figures\n\n")


def test_job_markdown_is_empty_without_job_sections():
    assert job_markdown({}) == ""
    assert job_markdown({"samplers": {"ddim": {"replication_rate": 0.1}}}) == ""
    md = job_markdown({"replica_check": {"cpsample": {"index": "ivf"}}})
    assert md == "\n## Replica check: cpsample\n\n- index: ivf\n"


def test_evaluation_markdown_covers_fid_attacks_and_the_sweep():
    sweep = {
        "num_samples": 12,
        "target_rate": 0.02,
        "quality_metric": "fd",
        "pareto_front": ["b"],
        "points": [
            {
                "label": "ddim",
                "sampler": "ddim",
                "replication_rate": 0.25,
                "mean_nn_similarity": 0.9,
                "quality": {"fd": 3.0},
                "guidance_fired_fraction": 0.0,
            },
            {
                "label": "b",
                "sampler": "cpsample",
                "replication_rate": 0.0,
                "mean_nn_similarity": 0.8,
                "quality": {"fd": 4.5},
                "guidance_fired_fraction": 0.5,
            },
        ],
        "recommended": {"label": "b", "alpha": 0.5, "scale": 3.0, "replication_rate": 0.0},
    }
    report = {
        "fid": {
            "name": "FID",
            "reference": "held-out real images",
            "num_reference": 300,
            "values": {"ddim": 12.3456, "cpsample": 20.0},
        },
        "membership_inference": {
            "nn_distance": {"ddim": _attack(0.875)},
            "cpsample_knobs": {"alpha": 0.5, "scale": 5.0},
        },
        "sweep": sweep,
    }
    md = evaluation_markdown(report)
    assert "FID against held-out real images (300 images):" in md
    assert "- ddim: 12.35" in md and "- cpsample: 20" in md
    rows = [x for x in md.splitlines() if x.startswith("| nn_distance")]
    assert rows == ["| nn_distance | ddim | 0.875 | 0.100 | 0.02 | 0.5 | 0.6 | 4/6 |"]
    assert "cpsample_knobs" not in md
    assert "| ddim | 25.00% | 0.9000 | 3 | 0.000 |  |" in md
    assert "| b | 0.00% | 0.8000 | 4.5 | 0.500 | yes |" in md
    assert "**Recommended: alpha = 0.5, s = 3**" in md
    sweep["recommended"] = {"reason": "no point within the target", "closest": "b"}
    md = evaluation_markdown({"sweep": sweep})
    assert "No recommendation: no point within the target; closest: b." in md
    assert evaluation_markdown({}) == "\n"


# ------------------------------------------------------------------------------------ the figures
def test_write_report_writes_figures_json_markdown_and_the_root_copy(tmp_path):
    store = open_store(str(tmp_path / "s"))
    fig = grid_figure(np.zeros((2, 8, 8, 1), np.uint8), "t")
    report = _demo_report(membership_inference={"reconstruction": {"ddim": _attack(0.625)}})
    write_report(store, "demo", report, {"z.png": fig, "a.png": fig})
    assert sorted(store.listdir("reports", "demo")) == [
        "a.png",
        "report.json",
        "report.md",
        "z.png",
    ]
    assert json.loads(store.read_bytes("reports", "demo", "report.json")) == report
    assert json.loads(store.read_bytes("report.json")) == report
    md = store.read_bytes("reports", "demo", "report.md").decode()
    assert md.index("![a.png](a.png)") < md.index("![z.png](z.png)")
    assert "| reconstruction | ddim | 0.625 |" in md


# ------------------------------------------------------------- threshold-free shares and the attack
def _sweep_point(label, sampler, rate, fd, **extra):
    return {
        "label": label,
        "sampler": sampler,
        "alpha": None if sampler == "ddim" else 0.5,
        "scale": 0.0 if sampler == "ddim" else 3.0,
        "replication_rate": rate,
        "mean_nn_similarity": 0.9,
        "quality": {"fd": fd},
        "guidance_fired_fraction": 0.0 if sampler == "ddim" else 0.5,
        **extra,
    }


def test_markdown_tables_gain_the_privacy_columns_when_present():
    report = _demo_report(
        membership_inference={"nn_distance": {"ddim": _attack(0.875)}},
        threshold_free={
            "holdout": {"holdout_p95": 0.8, "holdout_p99": 0.9, "num_images": 200, "seed": 0},
            "samplers": {
                "ddim": {"num_samples": 128, "above_holdout_p95": 0.25, "above_holdout_p99": 0.125},
                "cpsample": {"num_samples": 128, "above_holdout_p95": 0.0625,
                             "above_holdout_p99": 0.0078125},
            },
        },
    )  # fmt: skip
    report["holdout_baseline"].update(above_holdout_p95=0.05, above_holdout_p99=0.01)
    lines = markdown(report, []).splitlines()
    assert (
        "| | samples | replication rate | mean NN similarity | FD | confident fraction | "
        "guidance fired | > held-out p95 | > held-out p99 | NN-attack AUC |"
    ) in lines
    assert "|---|---|---|---|---|---|---|---|---|---|" in lines
    assert "| ddim | 128 | 12.50% | 0.9123 | 12.35 | 0.5 | - | 25.00% | 12.50% | 0.875 |" in lines
    assert "| cpsample | 128 | 0.78% | 0.8000 | - | - | 0.25 | 6.25% | 0.78% | - |" in lines
    assert "| held-out real (baseline) | - | 1.56% | 0.8500 | | | | 5.00% | 1.00% |  |" in lines
    assert any("p95 / p99 (p95 = 0.8000, p99 = 0.9000)" in x for x in lines)
    md = evaluation_markdown(report)
    assert "## Threshold-free replication" in md and "200 held-out real images" in md
    assert "| ddim | 128 | 25.00% | 12.50% |" in md
    # a sampler row's own AUC wins over the attack section's
    report["samplers"]["ddim"]["mia_auc"] = 0.5
    assert "| 25.00% | 12.50% | 0.500 |" in markdown(report, [])


def test_sweep_table_and_attack_table_show_shares_and_group_aucs():
    points = [
        _sweep_point("ddim", "ddim", 0.25, 3.0, above_holdout_p95=0.5, above_holdout_p99=0.4,
                     mia_auc=0.9, mia_auc_duplicated=1.0, mia_auc_unique=0.7),
        _sweep_point("b", "cpsample", 0.0, 4.5, above_holdout_p95=0.05, above_holdout_p99=0.02,
                     mia_auc=0.55, mia_auc_duplicated=0.6, mia_auc_unique=0.5),
        _sweep_point("c *", "cpsample", 0.0, 5.0),  # a row scored without the privacy axes
    ]  # fmt: skip
    rule = "best fd among CPSample points within both targets"
    sweep = {"num_samples": 12, "target_rate": 0.02, "target_above_p99": 0.05,
             "quality_metric": "fd", "pareto_front": ["ddim", "b"], "points": points,
             "holdout_percentiles": {"holdout_p95": 0.8, "holdout_p99": 0.9, "num_holdout": 50},
             "mia": {"num_members": 8, "num_nonmembers": 16},
             "recommended": {"label": "b", "alpha": 0.5, "scale": 3.0, "replication_rate": 0.0,
                             "above_holdout_p99": 0.02, "fd": 4.5, "rule": rule}}  # fmt: skip
    groups = {
        "duplicated": {"auc": 1.0, "num_members": 3, "member_mean": 0.99},
        "empty": {"auc": None, "num_members": 0, "member_mean": None},
    }
    mi = {"nn_distance": {"ddim": {**_attack(0.875), "groups": groups}}}
    md = evaluation_markdown({"sweep": sweep, "membership_inference": mi})
    assert (
        "| point | replication rate | > held-out p95 | > held-out p99 | NN-attack AUC | "
        "AUC duplicated | AUC unique | mean NN similarity | quality | guidance fired | Pareto |"
    ) in md
    assert (
        "| ddim | 25.00% | 50.00% | 40.00% | 0.900 | 1.000 | 0.700 | 0.9000 | 3 | 0.000 | yes |"
        in md
    )
    assert (
        "| b | 0.00% | 5.00% | 2.00% | 0.550 | 0.600 | 0.500 | 0.9000 | 4.5 | 0.500 | yes |" in md
    )
    assert "| c * | 0.00% | - | - | - | - | - | 0.9000 | 5 | 0.500 |  |" in md
    assert "and share above the held-out p99 <= 5.0%" in md
    assert "(p95 = 0.8000, p99 = 0.9000)" in md and "8 members, 16 non-members" in md
    assert "(replication rate 0.00%, share above the held-out p99 2.00%, best fd" in md
    assert f"Rule: {rule}." in md
    rows = [x for x in md.splitlines() if x.startswith("| nn_distance")]
    assert rows == [
        "| nn_distance | ddim | 0.875 | 0.100 | 0.02 | 0.5 | 0.6 | 4/6 |",
        "| nn_distance | ddim: duplicated members | 1.000 | - | - | 0.99 | 0.6 | 3/6 |",
        "| nn_distance | ddim: empty members | - | - | - | - | 0.6 | 0/6 |",
    ]


def test_sampler_figures_and_ratios_to_ddim():
    from pipeline.data.imageset import ImageSet
    from pipeline.evaluation.report import relative_to_ddim, sampler_figures

    rng = np.random.default_rng(0)
    train = ImageSet([f"t{i}" for i in range(5)], rng.integers(0, 255, (5, 8, 8, 1), np.uint8))
    rows = [{"nn_key": f"t{i % 5}", "nn_similarity": 0.9 + i / 100} for i in range(40)]
    pixels = rng.integers(0, 255, (40, 8, 8, 1), np.uint8)
    figs = sampler_figures("cpsample", pixels, rows, train, 0.97, "samples")
    assert sorted(figs) == ["pairs_cpsample.png", "samples_cpsample.png"]
    assert all(f[:4] == b"\x89PNG" for f in figs.values())
    samplers = {
        "ddim": {"replication_rate": 0.5, "quality": {"confident_fraction": 0.8}},
        "cpsample": {"replication_rate": 0.05, "quality": {"confident_fraction": 0.6}},
        "none": {"replication_rate": 0.1, "quality": {}},
    }
    relative_to_ddim(samplers)
    assert samplers["cpsample"]["replication_vs_ddim"] == pytest.approx(0.1)
    assert samplers["cpsample"]["confident_fraction_vs_ddim"] == pytest.approx(0.75)
    assert samplers["ddim"]["replication_vs_ddim"] == 1.0
    assert "confident_fraction_vs_ddim" not in samplers["none"]
    zero = {"ddim": {"replication_rate": 0.0, "quality": {}}, "c": {"replication_rate": 0.1}}
    relative_to_ddim(zero)
    assert "replication_vs_ddim" not in zero["c"]


# ------------------------------------------------------------------ PIA's row and the extraction
def test_pia_rows_and_the_extraction_section_beside_the_cosine_threshold(tmp_path):
    pia = {"ddim": {**_attack(0.9375), "t": 200, "p": 4.0},
           "cpsample": {**_attack(0.5), "t": 200, "p": 4.0}}  # fmt: skip
    extraction = {
        "criterion": "Carlini et al. 2023", "alpha": 0.5, "n": 50, "delta": 1 / 3,
        "samplers": {
            "ddim": {"num_samples": 128, "extracted": 12, "extracted_share": 0.09375,
                     "min_score": 0.0, "median_score": 0.75, "n_used": 50},
            "cpsample": {"num_samples": 128, "extracted": 0, "extracted_share": 0.0,
                         "min_score": 0.5, "median_score": 0.9, "n_used": 50},
        },
        "holdout": {"num_samples": 200, "extracted": 1, "extracted_share": 0.005,
                    "min_score": 0.3, "median_score": 0.95, "n_used": 50},
    }  # fmt: skip
    report = _demo_report(membership_inference={"pia": pia}, extraction=extraction)
    store = open_store(str(tmp_path / "s"))
    write_report(store, "demo", report, {})
    md = store.read_bytes("reports", "demo", "report.md").decode()
    rows = [x for x in md.splitlines() if x.startswith("| pia")]
    assert rows == [
        "| pia | ddim | 0.938 | 0.100 | 0.02 | 0.5 | 0.6 | 4/6 |",
        "| pia | cpsample | 0.500 | 0.100 | 0.02 | 0.5 | 0.6 | 4/6 |",
    ]
    assert "at t = 200, p = 4" in md
    assert "## Extraction (Carlini et al. 2023)" in md
    assert (
        "most delta = 0.333 times alpha = 0.5 times its mean distance to the n = 50 nearest" in md
    )
    # each sampler's extraction count beside its copies at the cosine threshold (0.97)
    assert (
        "| sampler | samples | extracted | extracted share | median score | cosine >= 0.97 |" in md
    )
    assert "| ddim | 128 | 12 | 9.38% | 0.750 | 12.50% |" in md
    assert "| cpsample | 128 | 0 | 0.00% | 0.900 | 0.78% |" in md
    assert "| held-out real (baseline) | 200 | 1 | 0.50% | 0.950 | 1.56% |" in md
    # a job's report without samplers or a threshold: the cosine column says so
    alone = evaluation_markdown({"extraction": extraction})
    assert "| ddim | 128 | 12 | 9.38% | 0.750 | - |" in alone and "| cosine |" in alone

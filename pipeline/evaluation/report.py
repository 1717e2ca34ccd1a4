"""report.json and report.md (the figures are drawn in :mod:`pipeline.evaluation.figures`)."""

from __future__ import annotations

import json
from typing import Any

from pipeline.data.storage import Store
from pipeline.evaluation.comparison import comparison_markdown
from pipeline.evaluation.figures import (  # noqa: F401  (re-exported: the report API)
    grid_figure,
    histogram_figure,
    pairs_figure,
    pareto_figure,
    reference_lines,
    roc_figure,
)
from pipeline.evaluation.fragments import read_report, write_fragment


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# optional privacy columns of the sampler and sweep tables: (row key, header, format)
PRIVACY_COLUMNS = (
    ("above_holdout_p95", "> held-out p95", "{:.2%}"),
    ("above_holdout_p99", "> held-out p99", "{:.2%}"),
    ("mia_auc", "NN-attack AUC", "{:.3f}"),
)


def privacy_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The privacy columns some row carries: the threshold-free shares, the sample-only attack's AUC
    and its per-group AUCs (``mia_auc_<group>``, in first-seen order)."""
    cols = [c for c in PRIVACY_COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    groups = dict.fromkeys(k for r in rows for k in r if k.startswith("mia_auc_"))
    cols += [(k, f"AUC {k[len('mia_auc_') :]}", "{:.3f}") for k in groups]
    return cols


def _cells(row: dict[str, Any], cols, missing: str = "-") -> str:
    return "".join(
        f" {fmt.format(row[k]) if row.get(k) is not None else missing} |" for k, _, fmt in cols
    )


def _percentile_note(rows: list[dict[str, Any]], holdout: dict[str, Any] | None = None) -> str:
    """One sentence on the threshold-free shares, naming the held-out percentiles when known."""
    ref = dict(holdout or {})
    for r in rows:
        ref = ref or {k: v for k, v in r.items() if k.startswith("holdout_p")}
    named = ", ".join(f"{k[len('holdout_'):]} = {ref[k]:.4f}" for k in ("holdout_p95", "holdout_p99")
                      if isinstance(ref.get(k), float))  # fmt: skip
    return ("Threshold-free shares: samples whose nearest-training similarity is above the held-out "
            f"real images' p95 / p99{f' ({named})' if named else ''}; held-out real images score 5% "
            "/ 1% by construction.")  # fmt: skip


def markdown(report: dict[str, Any], figures: list[str]) -> str:
    """A human-readable summary of report.json."""
    s = report["samplers"]
    # the privacy columns: a sampler's own keys, its nearest-sample attack AUC from the membership
    # attacks when it has none, its threshold-free shares from the "threshold_free" section
    nn = (report.get("membership_inference") or {}).get("nn_distance") or {}
    shares = (report.get("threshold_free") or {}).get("samplers") or {}
    rows = {}
    for name, r in s.items():
        row = {**shares.get(name, {}), **r}
        if row.get("mia_auc") is None and isinstance(nn.get(name), dict) and "auc" in nn[name]:
            row["mia_auc"] = nn[name]["auc"]
        rows[name] = row
    cols = privacy_columns(list(rows.values()))
    extra_head = "".join(f" {h} |" for _, h, _ in cols)
    lines = [
        f"# CPSample report: {report['dataset']}",
        "",
        f"{report['num_train']} training images; replica threshold {report['threshold']} "
        f"(cosine, {report.get('embedding', 'centred')} pixels).",
        "",
        "| | samples | replication rate | mean NN similarity | FD | confident fraction | guidance fired |"
        + extra_head,
        "|---|---|---|---|---|---|---|" + "---|" * len(cols),
    ]
    for name, r in rows.items():
        q = r.get("quality", {})
        lines.append(
            f"| {name} | {r['num_samples']} | {r['replication_rate']:.2%} | {r['mean_nn_similarity']:.4f} | "
            f"{_fmt(q.get('fd', q.get('fd_encoder', '-')))} | {_fmt(q.get('confident_fraction', '-'))} | "
            f"{_fmt(r.get('guidance_fired_fraction', '-'))} |" + _cells(r, cols)
        )
    h = report["holdout_baseline"]
    lines += [
        f"| held-out real (baseline) | - | {h['replication_rate']:.2%} | {h['mean_nn_similarity']:.4f} | | | |"
        + _cells(h, cols, ""),
        "",
    ]
    if any(k.startswith("above_holdout") for k, _, _ in cols):
        holdout = (report.get("threshold_free") or {}).get("holdout")
        lines += [_percentile_note([*rows.values(), h], holdout), ""]
    if "cpsample" in s:
        lines.append(
            f"CPSample knobs: alpha = {s['cpsample'].get('alpha')}, scale s = {s['cpsample'].get('scale')}."
        )
    d = report.get("displacement")
    if d:
        lines += ["", "## How far CPSample moves a sample", "",
                  "Mean pixel change between the CPSample and the DDIM sample of the same seed, "
                  f"relative to unrelated DDIM pairs ({d['unrelated_pairs']['mean']:.3f}): "
                  "0 = untouched, 1 = as different as another sample.", "",
                  "| DDIM samples | pairs | mean change | relative |", "|---|---|---|---|"]  # fmt: skip
        parts = {
            "all": "all", "near": f"copies (similarity >= {d['threshold']})",
            "far": f"novel (similarity < {d['far_below']:.3f}, the held-out median)",
        }  # fmt: skip
        for part, label in parts.items():
            r = d[part]
            if r["count"]:
                lines.append(f"| {label} | {r['count']} | {r['mean']:.3f} | {r['relative']:.2f} |")
    if "classifier" in report:
        lines += [
            "",
            "## Random-label classifier",
            "",
            "```json",
            json.dumps(report["classifier"], indent=2),
            "```",
        ]
    if report.get("comparison"):
        lines += comparison_markdown(report["comparison"])
    if "timings_s" in report:
        t = ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items())
        lines += ["", f"Timings (s): {t}."]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_report(store: Store, run: str, report: dict[str, Any], figures: dict[str, bytes]) -> None:
    """Write figures, report.json and report.md under ``reports/<run>/``, and report.json at the root."""
    for name, data in figures.items():
        store.write_bytes(data, "reports", run, name)
    write_fragment(store, run, report, "replace")
    text = json.dumps(report, indent=2, sort_keys=False)
    store.write_bytes(text.encode(), "reports", run, "report.json")
    md = markdown(report, sorted(figures))
    if {"fid", "membership_inference", "sweep", "extraction"} & set(report):
        md = md.rstrip("\n") + "\n" + evaluation_markdown(report)
    store.write_bytes(md.encode(), "reports", run, "report.md")
    store.write_bytes(text.encode(), "report.json")


def write_scenario_report(
    store: Store, run: str, report: dict[str, Any], figures: dict[str, bytes], md: str
) -> None:
    """A demo scenario's ``reports/<run>/`` figures, report.json and report.md (``md``), and
    report.json at the store's root."""
    for name, data in figures.items():
        store.write_bytes(data, "reports", run, name)
    text = json.dumps(report, indent=2, default=str)
    store.write_bytes(text.encode(), "reports", run, "report.json")
    store.write_bytes(md.encode(), "reports", run, "report.md")
    store.write_bytes(text.encode(), "report.json")


def sampler_figures(
    name: str, pixels, rows: list[dict[str, Any]], train, threshold: float, title: str
) -> dict[str, bytes]:
    """A scenario's two figures of one sampler: the first 32 samples beside their nearest training
    images (``rows``: the replica check's, ordered like ``pixels``) and a grid of the first 64."""
    k = min(32, len(rows))
    pos = {key: i for i, key in enumerate(train.keys)}
    neighbours = train.images[[pos[str(r["nn_key"])] for r in rows[:k]]]
    sims = [float(r["nn_similarity"]) for r in rows[:k]]
    return {
        f"pairs_{name}.png": pairs_figure(pixels[:k], neighbours, sims, threshold, name),
        f"samples_{name}.png": grid_figure(pixels[:64], title),
    }


def relative_to_ddim(samplers: dict[str, dict[str, Any]]) -> None:
    """Add each sampler's ``confident_fraction_vs_ddim`` and ``replication_vs_ddim`` (ratios to the
    ``"ddim"`` entry's), where DDIM's are non-zero."""
    ddim = samplers["ddim"]
    q0 = ddim.get("quality") or {}
    for entry in samplers.values():
        q = entry.get("quality") or {}
        if q0.get("confident_fraction") and "confident_fraction" in q:
            entry["confident_fraction_vs_ddim"] = q["confident_fraction"] / q0["confident_fraction"]
        if ddim["replication_rate"]:
            entry["replication_vs_ddim"] = entry["replication_rate"] / ddim["replication_rate"]


def pct(v: float | None) -> str:
    """A share as a percentage with two decimals, "-" for None."""
    return "-" if v is None else f"{100 * v:.2f}%"


def num(v: float | None, digits: int = 3) -> str:
    """A number with ``digits`` decimals, "-" for None."""
    return "-" if v is None else f"{v:.{digits}f}"


def _attack_rows(section: dict[str, Any]) -> list[str]:
    lines = [
        "| attack | model | AUC | TPR at 1% FPR | p-value | member mean | non-member mean | n (m/nm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for attack, by_model in section.items():
        for model, r in by_model.items():
            if not isinstance(r, dict) or "auc" not in r:
                continue
            lines.append(
                f"| {attack} | {model} | {r['auc']:.3f} | {r['tpr_at_fpr']:.3f} | {r['p_value']:.4g} | "
                f"{r['member_mean']:.4g} | {r['nonmember_mean']:.4g} | "
                f"{r['num_members']}/{r['num_nonmembers']} |"
            )
            for group, g in (r.get("groups") or {}).items():  # members of one group vs all
                auc = "-" if g.get("auc") is None else f"{g['auc']:.3f}"
                mean = "-" if g.get("member_mean") is None else f"{g['member_mean']:.4g}"
                lines.append(
                    f"| {attack} | {model}: {group} members | {auc} | - | - | {mean} | "
                    f"{r['nonmember_mean']:.4g} | {g['num_members']}/{r['num_nonmembers']} |"
                )
    return lines


def extraction_markdown(report: dict[str, Any]) -> list[str]:
    """The ``extraction`` section (Carlini et al.'s criterion) per sampler and for held-out real
    images, beside each one's share of copies at the cosine threshold (``samplers`` /
    ``holdout_baseline``'s ``replication_rate``, where the report has it)."""
    ex, samplers = report["extraction"], report.get("samplers") or {}
    at = f" >= {report['threshold']}" if report.get("threshold") is not None else ""
    lines = ["", "## Extraction (Carlini et al. 2023)", "",
             "A sample is extracted when its pixel l2 distance to the nearest training image is at "
             f"most delta = {ex['delta']:.3g} times alpha = {ex['alpha']:g} times its mean distance "
             f"to the n = {ex['n']} nearest ({ex['criterion']}). Copies at the cosine threshold "
             "beside it.", "",
             f"| sampler | samples | extracted | extracted share | median score | cosine{at} |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    rows = {name: (r, (samplers.get(name) or {}).get("replication_rate"))
            for name, r in (ex.get("samplers") or {}).items()}  # fmt: skip
    if ex.get("holdout"):
        base = (report.get("holdout_baseline") or {}).get("replication_rate")
        rows["held-out real (baseline)"] = (ex["holdout"], base)
    for name, (r, rate) in rows.items():
        lines.append(
            f"| {name} | {r['num_samples']} | {r['extracted']} | {pct(r['extracted_share'])} | "
            f"{num(r['median_score'])} | {pct(rate)} |"
        )
    return lines


def evaluation_markdown(report: dict[str, Any]) -> str:
    """Markdown sections for the ``fid``, ``membership_inference``, ``threshold_free``,
    ``extraction`` and ``sweep`` keys of a report."""
    lines: list[str] = []
    if "fid" in report:
        f = report["fid"]
        lines += ["", "## FID", ""]
        if f.get("skipped"):
            lines.append(f"Not measured: {f['skipped']}")
        else:
            lines.append(f"{f['name']} against {f['reference']} ({f['num_reference']} images):")
            lines += [""] + [f"- {k}: {v:.4g}" for k, v in f["values"].items()]
    if "membership_inference" in report:
        mi = report["membership_inference"]
        lines += ["", "## Membership inference", "",
                  "Score = minus the attack's error (members are expected to have smaller errors). "
                  "p-value: two-sided permutation test on the difference of means. An AUC well "
                  "below 0.5 is a membership signal too: an attacker who knows the defence flips "
                  "the score and gets 1 - AUC.", ""]  # fmt: skip
        pool = mi.get("nonmembers")
        if pool:
            lines += [f"Non-members: {pool['num_nonmembers']} held-out images that no model has "
                      f"seen, drawn at random from the {pool['num_holdout']} held-out images (the "
                      f"classifier trained on a keyed-hash {pool['classifier_trained_fraction']:.0%} "
                      "of them, which are never non-members).", ""]  # fmt: skip
        lines += _attack_rows({k: v for k, v in mi.items() if isinstance(v, dict)})
        pia = next((r for r in (mi.get("pia") or {}).values() if isinstance(r, dict)), None)
        if pia and "t" in pia:
            lines += ["", f"pia: Kong et al. 2024's proximal initialisation, ||eps(x_t, t) - "
                      f"eps(x_0, 0)||_p at t = {pia['t']}, p = {pia['p']:g}, x_t driven by "
                      "eps(x_0, 0)."]  # fmt: skip
    if report.get("threshold_free"):
        tf = report["threshold_free"]
        h = tf.get("holdout", {})
        lines += ["", "## Threshold-free replication", "",
                  f"Reference: {h.get('num_images', '?')} held-out real images' nearest-training "
                  f"similarity, p95 = {h.get('holdout_p95', float('nan')):.4f}, p99 = "
                  f"{h.get('holdout_p99', float('nan')):.4f}; by construction 5% / 1% of real images "
                  "lie above them, so a sampler that copies no more than real data scores about the "
                  "same.", "", "| sampler | samples | > held-out p95 | > held-out p99 |",
                  "|---|---|---|---|"]  # fmt: skip
        for name, r in tf.get("samplers", {}).items():
            lines.append(
                f"| {name} | {r['num_samples']} | {r['above_holdout_p95']:.2%} | "
                f"{r['above_holdout_p99']:.2%} |"
            )
    if report.get("extraction"):
        lines += extraction_markdown(report)
    if "sweep" in report:
        s = report["sweep"]
        key = s.get("quality_metric")
        cols = privacy_columns(s["points"])
        shared = any(k == "above_holdout_p99" for k, _, _ in cols)
        target = (f" and share above the held-out p99 <= {s['target_above_p99']:.1%}"
                  if shared and s.get("target_above_p99") is not None else "")  # fmt: skip
        lines += ["", "## (alpha, s) trade-off sweep", "",
                  f"{s.get('num_samples')} samples per point. The sweep's own points share one "
                  "set of seeds; rows marked * are the main runs' first samples, which share "
                  "another (DDIM and CPSample the same ones). Target replication rate "
                  f"<= {s['target_rate']:.1%}{target}; quality = {key} (lower is better).", ""]  # fmt: skip
        if shared:
            lines += [_percentile_note(s["points"], s.get("holdout_percentiles")), ""]
        if any(k.startswith("mia_auc") for k, _, _ in cols):
            m = s.get("mia") or {}
            lines += ["NN-attack AUC: members vs never-seen held-out images, scored by their "
                      "similarity to the point's nearest sample (0.5 = chance"
                      + (f"; {m['num_members']} members, {m['num_nonmembers']} non-members"
                         if "num_members" in m else "") + ").", ""]  # fmt: skip
        lines += ["| point | replication rate |" + "".join(f" {h} |" for _, h, _ in cols)
                  + " mean NN similarity | quality | guidance fired | Pareto |",
                  "|---|---|" + "---|" * len(cols) + "---|---|---|---|"]  # fmt: skip
        front = set(s.get("pareto_front", []))
        for p in s["points"]:
            q = p["quality"].get(key, float("nan")) if key else float("nan")
            mark = " *" if p.get("source") else ""
            lines.append(
                f"| {p['label']}{mark} | {p['replication_rate']:.2%} |{_cells(p, cols)} "
                f"{p['mean_nn_similarity']:.4f} | {q:.4g} | {p['guidance_fired_fraction']:.3f} | "
                f"{'yes' if p['label'] in front else ''} |"
            )
        rec = s.get("recommended") or {}
        if rec.get("label"):
            p99 = (f", share above the held-out p99 {rec['above_holdout_p99']:.2%}"
                   if rec.get("above_holdout_p99") is not None else "")  # fmt: skip
            lines += ["", f"**Recommended: alpha = {rec['alpha']:g}, s = {rec['scale']:g}** "
                      f"(replication rate {rec['replication_rate']:.2%}{p99}, best {key} within "
                      "the targets)."]  # fmt: skip
        elif rec:
            lines += ["", f"No recommendation: {rec.get('reason')}; closest: {rec.get('closest')}."]
        if rec.get("rule"):
            lines += ["", f"Rule: {rec['rule']}."]
    return "\n".join(lines) + "\n"


def merge_report(
    store: Store,
    run: str,
    updates: dict[str, Any],
    figures: dict[str, bytes] | None = None,
    deep: bool = False,
    inputs: dict[str, Any] | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Merge ``updates`` into ``reports/<run>/report.json`` (created when absent), write the figures
    and rebuild report.md; the root report.json is updated too when it was this run's copy.

    ``deep=False`` replaces whole top-level sections (a rerun of the sweep or of the attacks replaces
    the old results); ``deep=True`` merges nested dicts key by key (the sample and replica-check jobs
    add one sampler's entries next to the others'). The update is appended as a fragment and the
    report is the fold of all fragments (``pipeline.evaluation.fragments``), so jobs that merge into
    one run at the same time never drop each other's sections; report.json and report.md are
    materialised copies of that fold. Every file is written atomically.

    ``inputs`` (:func:`pipeline.evaluation.inputs.run_inputs`): what the update was made from. An
    update whose inputs differ from the report's ``inputs`` on any input both name (a model, the
    data, a sampler's samples, the replica index, the package version) is refused with
    :class:`pipeline.data.provenance.StaleArtifactError` before anything is written, unless
    ``restart`` (``sample --overwrite``): then the report starts afresh from this update. Otherwise
    the inputs are merged key by key into the report's ``inputs``."""
    before = read_report(store, run)
    differ = require_inputs(store, run, inputs, restart, before)
    figures = figures or {}
    for name, data in figures.items():
        store.write_bytes(data, "reports", run, name)
    root_is_copy = store.exists("report.json") and (
        json.loads(store.read_bytes("report.json")) == before
    )
    if differ:  # restart: nothing before this update describes its inputs
        write_fragment(store, run, {**updates, "inputs": inputs}, "replace")
    else:
        if inputs is not None:
            write_fragment(store, run, {"inputs": inputs}, "deep")
        write_fragment(store, run, updates, "deep" if deep else "shallow")
    report = read_report(store, run)  # every fragment so far, a concurrent job's included
    text = json.dumps(report, indent=2)
    store.write_bytes(text.encode(), "reports", run, "report.json")
    if root_is_copy:
        store.write_bytes(text.encode(), "report.json")
    pngs = sorted(n for n in store.listdir("reports", run) if n.endswith(".png"))
    if {"samplers", "dataset", "num_train", "threshold", "holdout_baseline"} <= set(report):
        md = markdown(report, pngs).rstrip("\n") + "\n" + evaluation_markdown(report)
    else:
        md = f"# CPSample run: {run}\n" + job_markdown(report) + evaluation_markdown(report)
        md += "\n## Figures\n\n" + "\n".join(f"![{f}]({f})" for f in pngs) + "\n"
    store.write_bytes(md.encode(), "reports", run, "report.md")
    return report


def require_inputs(
    store: Store,
    run: str,
    inputs: dict[str, Any] | None,
    restart: bool = False,
    report: dict[str, Any] | None = None,
) -> list[str]:
    """The inputs on which ``inputs`` and the run's report (``report``, read when None) differ
    (:func:`pipeline.evaluation.inputs.conflicts`); any raises
    :class:`pipeline.data.provenance.StaleArtifactError` unless ``restart``. Jobs call it before
    their work, so a refused update has written nothing."""
    from pipeline.data.provenance import StaleArtifactError
    from pipeline.evaluation.inputs import conflicts

    if inputs is None:
        return []
    report = read_report(store, run) if report is None else report
    differ = conflicts(report.get("inputs"), inputs)
    if differ and not restart:
        raise StaleArtifactError(
            f"{store.uri_of('reports', run)} describes other inputs than this update (differs: "
            f"{', '.join(differ)}): folding it in would mix their numbers; use a new --run, or "
            "resample with jobs/sample.py --overwrite, which starts the report afresh"
        )
    return differ


def job_markdown(report: dict[str, Any]) -> str:
    """Markdown for the ``sampling`` and ``replica_check`` sections the jobs write (outside the demo)."""
    lines: list[str] = []
    for name, out in report.get("sampling", {}).items():
        lines += ["", f"## Sampling: {name}", ""]
        lines += [f"- {k}: {v}" for k, v in out.items() if not isinstance(v, (dict, list))]
    for name, out in report.get("replica_check", {}).items():
        stats = report.get("samplers", {}).get(name, {})
        lines += ["", f"## Replica check: {name}", ""]
        lines += [
            f"- {k}: {v}" for k, v in {**stats, **out}.items() if not isinstance(v, (dict, list))
        ]
    return "\n".join(lines) + ("\n" if lines else "")

"""report.json, report.md and PNG figures (sample/nearest-neighbour pairs, similarity histograms)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipeline.data.storage import Store
from pipeline.evaluation.fragments import read_report, write_fragment


def _png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def pairs_figure(
    samples: np.ndarray,
    neighbours: np.ndarray,
    sims: np.ndarray,
    threshold: float,
    title: str,
    cols: int = 4,
) -> bytes:
    """Each sample beside its nearest training image; replicates (sim >= threshold) framed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(samples)
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.1, rows * 1.25), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = divmod(i, cols)
        a, b = axes[r, 2 * c], axes[r, 2 * c + 1]
        for ax, img in ((a, samples[i]), (b, neighbours[i])):
            ax.axis("on")
            _show(ax, img)
        copy = sims[i] >= threshold
        for spine in a.spines.values():
            spine.set_color("red" if copy else "lightgray")
            spine.set_linewidth(2.5 if copy else 0.5)
        a.set_title(f"{sims[i]:.3f}", fontsize=7, color="red" if copy else "black")
    fig.suptitle(
        f"{title}: sample | nearest training image (cosine, red = copy >= {threshold})", fontsize=9
    )
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def histogram_figure(series: dict[str, np.ndarray], threshold: float) -> bytes:
    """Overlaid histograms of nearest-neighbour similarity with the replica threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    bins = np.linspace(min(float(np.min(s)) for s in series.values()), 1.0, 60)
    for name, s in series.items():
        rate = float((np.asarray(s) >= threshold).mean())
        ax.hist(s, bins=bins, alpha=0.5, density=True, label=f"{name} (copies {rate:.1%})")
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("cosine similarity to nearest training image (mean-centred pixels)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def grid_figure(images: np.ndarray, title: str, cols: int = 16) -> bytes:
    """A plain grid of images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.6, rows * 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, images):
        _show(ax, img)
    fig.suptitle(title, fontsize=9)
    data = _png_bytes(fig)
    plt.close(fig)
    return data


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict[str, Any], figures: list[str]) -> str:
    """A human-readable summary of report.json."""
    s = report["samplers"]
    lines = [
        f"# CPSample report: {report['dataset']}",
        "",
        f"{report['num_train']} training images; replica threshold {report['threshold']} "
        f"(cosine, {report.get('embedding', 'centred')} pixels).",
        "",
        "| | samples | replication rate | mean NN similarity | FD | confident fraction | guidance fired |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        q = r.get("quality", {})
        lines.append(
            f"| {name} | {r['num_samples']} | {r['replication_rate']:.2%} | {r['mean_nn_similarity']:.4f} | "
            f"{_fmt(q.get('fd', '-'))} | {_fmt(q.get('confident_fraction', '-'))} | "
            f"{_fmt(r.get('guidance_fired_fraction', '-'))} |"
        )
    h = report["holdout_baseline"]
    lines += [
        f"| held-out real (baseline) | - | {h['replication_rate']:.2%} | {h['mean_nn_similarity']:.4f} | | | |",
        "",
    ]
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
    if {"fid", "membership_inference", "sweep"} & set(report):
        md = md.rstrip("\n") + "\n" + evaluation_markdown(report)
    store.write_bytes(md.encode(), "reports", run, "report.md")
    store.write_bytes(text.encode(), "report.json")


# ------------------------------------------------------------------- evaluation and trade-off sweep
def pareto_figure(sweep: dict[str, Any]) -> bytes:
    """Replication rate (x) against quality (y, lower is better) for every sweep point, each point
    labelled; the Pareto front is joined, the target rate marked and the recommended point starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = sweep.get("quality_metric")
    points = sweep["points"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    if key is None:
        ax.text(0.5, 0.5, "no quality metric measured", ha="center", transform=ax.transAxes)
    else:
        front = set(sweep.get("pareto_front", []))
        chosen = (sweep.get("recommended") or {}).get("label")
        for p in points:
            x, y = p["replication_rate"], p["quality"][key]
            ddim = p["sampler"] == "ddim"
            ax.scatter([x], [y], s=60, marker="s" if ddim else "o",
                       color="gray" if ddim else ("tab:blue" if p["label"] in front else "tab:orange"))  # fmt: skip
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
            if p["label"] == chosen:
                ax.scatter([x], [y], s=260, marker="*", facecolor="none", edgecolor="red")
        on_front = sorted(
            (p["replication_rate"], p["quality"][key]) for p in points if p["label"] in front
        )
        if len(on_front) > 1:
            ax.plot(*zip(*on_front), color="tab:blue", linewidth=1, alpha=0.6)
        ax.axvline(sweep["target_rate"], color="red", linestyle="--", linewidth=1,
                   label=f"target rate {sweep['target_rate']:.1%}")  # fmt: skip
        ax.set_ylabel(f"{key} (lower is better)")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"replication rate (cosine >= {sweep.get('threshold')})")
    rec = sweep.get("recommended") or {}
    ax.set_title(f"(alpha, s) trade-off; recommended: {rec.get('label') or 'none'}", fontsize=9)
    # the plotted points, machine-readable in the PNG's text chunk (checked against report.json)
    plotted = [
        {"label": p["label"], "replication_rate": p["replication_rate"],
         "quality": p["quality"].get(key) if key else None}
        for p in points
    ]  # fmt: skip
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={"Description": json.dumps({"quality_metric": key, "points": plotted})})  # fmt: skip
    plt.close(fig)
    return buf.getvalue()


def roc_figure(curves: dict[str, dict[str, Any]], title: str) -> bytes:
    """ROC curves (log-scaled FPR, to show the low-FPR regime) of membership attacks, with AUCs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    for name, res in curves.items():
        fpr, tpr = np.asarray(res["roc"]["fpr"]), np.asarray(res["roc"]["tpr"])
        ax.step(np.maximum(fpr, 1e-3), tpr, where="post", label=f"{name} (AUC {res['auc']:.3f})")
    grid = np.logspace(-3, 0, 50)
    ax.plot(grid, grid, color="gray", linestyle=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1.0)
    ax.set_ylim(0.0, 1.02)  # a perfect attack's curve runs along TPR = 1
    ax.set_xlabel("false positive rate (non-members called members)")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    data = _png_bytes(fig)
    plt.close(fig)
    return data


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
    return lines


def evaluation_markdown(report: dict[str, Any]) -> str:
    """Markdown sections for the ``fid``, ``membership_inference`` and ``sweep`` keys of a report."""
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
                  "p-value: two-sided permutation test on the difference of means.", ""]  # fmt: skip
        pool = mi.get("nonmembers")
        if pool:
            lines += [f"Non-members: {pool['num_nonmembers']} held-out images that no model has "
                      f"seen, drawn at random from the {pool['num_holdout']} held-out images (the "
                      f"classifier trained on a keyed-hash {pool['classifier_trained_fraction']:.0%} "
                      "of them, which are never non-members).", ""]  # fmt: skip
        lines += _attack_rows({k: v for k, v in mi.items() if isinstance(v, dict)})
    if "sweep" in report:
        s = report["sweep"]
        key = s.get("quality_metric")
        lines += ["", "## (alpha, s) trade-off sweep", "",
                  f"{s.get('num_samples')} samples per point. The sweep's own points share one "
                  "set of seeds; rows marked * are the main runs' first samples, which share "
                  "another (DDIM and CPSample the same ones). Target replication rate "
                  f"<= {s['target_rate']:.1%}; quality = {key} (lower is better).", "",
                  "| point | replication rate | mean NN similarity | quality | guidance fired | Pareto |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        front = set(s.get("pareto_front", []))
        for p in s["points"]:
            q = p["quality"].get(key, float("nan")) if key else float("nan")
            mark = " *" if p.get("source") else ""
            lines.append(
                f"| {p['label']}{mark} | {p['replication_rate']:.2%} | {p['mean_nn_similarity']:.4f} | "
                f"{q:.4g} | {p['guidance_fired_fraction']:.3f} | {'yes' if p['label'] in front else ''} |"
            )
        rec = s.get("recommended") or {}
        if rec.get("label"):
            lines += ["", f"**Recommended: alpha = {rec['alpha']:g}, s = {rec['scale']:g}** "
                      f"(replication rate {rec['replication_rate']:.2%}, best {key} within the target)."]  # fmt: skip
        elif rec:
            lines += ["", f"No recommendation: {rec.get('reason')}; closest: {rec.get('closest')}."]
    return "\n".join(lines) + "\n"


def merge_report(
    store: Store,
    run: str,
    updates: dict[str, Any],
    figures: dict[str, bytes] | None = None,
    deep: bool = False,
) -> dict[str, Any]:
    """Merge ``updates`` into ``reports/<run>/report.json`` (created when absent), write the figures
    and rebuild report.md; the root report.json is updated too when it was this run's copy.

    ``deep=False`` replaces whole top-level sections (a rerun of the sweep or of the attacks replaces
    the old results); ``deep=True`` merges nested dicts key by key (the sample and replica-check jobs
    add one sampler's entries next to the others'). The update is appended as a fragment and the
    report is the fold of all fragments (``pipeline.evaluation.fragments``), so jobs that merge into
    one run at the same time never drop each other's sections; report.json and report.md are
    materialised copies of that fold. Every file is written atomically."""
    figures = figures or {}
    for name, data in figures.items():
        store.write_bytes(data, "reports", run, name)
    before = read_report(store, run)
    root_is_copy = store.exists("report.json") and (
        json.loads(store.read_bytes("report.json")) == before
    )
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

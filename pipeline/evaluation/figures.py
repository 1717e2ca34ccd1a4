"""The report's figures as PNG bytes: sample/nearest-neighbour pairs, similarity histograms with the
copy threshold and held-out percentiles, image grids, the (alpha, s) Pareto figure and ROC curves."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np


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


PERCENTILE_COLOURS = {"holdout_p95": "tab:purple", "holdout_p99": "black"}


def reference_lines(
    threshold: float, percentiles: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """The vertical lines of :func:`histogram_figure`: the replica threshold (red) and, when given,
    each held-out percentile (``holdout_p95``, ``holdout_p99``: dashed, labelled)."""
    lines = [{"name": "threshold", "x": float(threshold), "color": "red",
              "label": f"threshold {threshold}"}]  # fmt: skip
    for key, x in (percentiles or {}).items():
        if not key.startswith("holdout_p"):
            continue
        q = key[len("holdout_p") :]
        lines.append({"name": key, "x": float(x), "color": PERCENTILE_COLOURS.get(key, "tab:green"),
                      "label": f"held-out p{q} {float(x):.3f} ({100 - float(q):g}% of real above)"})  # fmt: skip
    return lines


def histogram_figure(
    series: dict[str, np.ndarray], threshold: float, percentiles: dict[str, float] | None = None
) -> bytes:
    """Overlaid histograms of nearest-neighbour similarity with the replica threshold marked and,
    when ``percentiles`` (:func:`pipeline.evaluation.shares.holdout_percentiles`) are given, dashed
    lines at the held-out p95 and p99 (the threshold-free references; each series' share above the
    p99 in its legend). The lines drawn are recorded in the PNG's Description text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = reference_lines(threshold, percentiles)
    p99 = (percentiles or {}).get("holdout_p99")
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    lo = min(float(np.min(s)) for s in series.values())
    lo = min([lo] + [ln["x"] for ln in lines[1:]])
    bins = np.linspace(lo, 1.0, 60)
    for name, s in series.items():
        rate = float((np.asarray(s) >= threshold).mean())
        label = f"{name} (copies {rate:.1%}"
        if p99 is not None:
            label += f", > p99 {float((np.asarray(s) > p99).mean()):.1%}"
        ax.hist(s, bins=bins, alpha=0.5, density=True, label=label + ")")
    for ln in lines:
        ax.axvline(ln["x"], color=ln["color"], linestyle="--", linewidth=1.2, label=ln["label"])
    ax.set_xlabel("cosine similarity to nearest training image (mean-centred pixels)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    described = {"lines": [{k: ln[k] for k in ("name", "x")} for ln in lines]}
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={"Description": json.dumps(described)})  # fmt: skip
    plt.close(fig)
    return buf.getvalue()


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


# ------------------------------------------------------------------- evaluation and trade-off sweep
def _pareto_panel(ax, sweep, points, xkey: str, key: str, norm, cmap, join: bool = True) -> None:
    """One panel of :func:`pareto_figure`: ``xkey`` (x) against quality (y), DDIM as squares, the
    Pareto front (replication rate vs quality) edged in black and, when ``join``, joined; the
    recommended point starred; the points' colour is their attack AUC when ``norm`` is given (points
    without one hollow), else front/other."""
    front = set(sweep.get("pareto_front", []))
    chosen = (sweep.get("recommended") or {}).get("label")
    shown = [p for p in points if p.get(xkey) is not None]
    for p in shown:
        x, y = p[xkey], p["quality"][key]
        ddim, on_front = p["sampler"] == "ddim", p["label"] in front
        style = {"s": 60, "marker": "s" if ddim else "o"}
        if norm is None:
            style["color"] = "gray" if ddim else ("tab:blue" if on_front else "tab:orange")
        elif p.get("mia_auc") is not None:
            style.update(c=[p["mia_auc"]], cmap=cmap, norm=norm,
                         edgecolors="black" if on_front else "none", linewidths=1.5)  # fmt: skip
        else:
            style.update(facecolors="none", edgecolors="gray")
        ax.scatter([x], [y], **style)
        ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if p["label"] == chosen:
            ax.scatter([x], [y], s=260, marker="*", facecolor="none", edgecolor="red")
    on_line = sorted((p[xkey], p["quality"][key]) for p in shown if p["label"] in front)
    if join and len(on_line) > 1:
        ax.plot(*zip(*on_line), color="tab:blue", linewidth=1, alpha=0.6)
    ax.set_ylabel(f"{key} (lower is better)")


def pareto_figure(sweep: dict[str, Any]) -> bytes:
    """Replication rate (x) against quality (y, lower is better) for every sweep point, each point
    labelled; the Pareto front is joined, the target rate marked and the recommended point starred.

    The third privacy axis: when the points carry ``mia_auc`` (the sample-only membership attack) they
    are coloured by it (colour bar; 0.5 = chance). When they carry ``above_holdout_p99`` (the share
    of samples above the held-out real images' p99 nearest-neighbour similarity) a second panel
    plots it against quality, with the p99 target and the held-out images' own 1% marked. The plotted
    values are recorded in the PNG's Description text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    key = sweep.get("quality_metric")
    points = sweep["points"]
    aucs = [p["mia_auc"] for p in points if p.get("mia_auc") is not None]
    coloured = key is not None and bool(aucs)
    second = key is not None and any(p.get("above_holdout_p99") is not None for p in points)
    fig, axes = plt.subplots(1, 2 if second else 1, figsize=(6.5 * (2 if second else 1), 4.2),
                             squeeze=False)  # fmt: skip
    ax = axes[0, 0]
    norm = cmap = None
    if coloured:
        lo = min(0.5, min(aucs))
        norm, cmap = Normalize(vmin=lo, vmax=max(max(aucs), lo + 0.1)), "viridis"
    if key is None:
        ax.text(0.5, 0.5, "no quality metric measured", ha="center", transform=ax.transAxes)
    else:
        _pareto_panel(ax, sweep, points, "replication_rate", key, norm, cmap)
        ax.axvline(sweep["target_rate"], color="red", linestyle="--", linewidth=1,
                   label=f"target rate {sweep['target_rate']:.1%}")  # fmt: skip
        ax.legend(fontsize=8)
    ax.set_xlabel(f"replication rate (cosine >= {sweep.get('threshold')})")
    rec = sweep.get("recommended") or {}
    ax.set_title(f"(alpha, s) trade-off; recommended: {rec.get('label') or 'none'}", fontsize=9)
    if second:
        bx = axes[0, 1]
        _pareto_panel(bx, sweep, points, "above_holdout_p99", key, norm, cmap, join=False)
        target = sweep.get("target_above_p99")
        if target is not None:
            bx.axvline(target, color="red", linestyle="--", linewidth=1,
                       label=f"target {target:.1%}")  # fmt: skip
        bx.axvline(0.01, color="gray", linestyle=":", linewidth=1, label="held-out real (1%)")
        bx.set_xlabel("share of samples above the held-out p99 NN similarity (threshold-free)")
        bx.set_title("threshold-free replication vs quality", fontsize=9)
        bx.legend(fontsize=8)
    if coloured:
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        fig.colorbar(mappable, ax=list(axes.flat), fraction=0.04, pad=0.02,
                     label="nearest-sample attack AUC (0.5 = chance)")  # fmt: skip
    # the plotted points, machine-readable in the PNG's text chunk (checked against report.json)
    plotted = []
    for p in points:
        row = {"label": p["label"], "replication_rate": p["replication_rate"],
               "quality": p["quality"].get(key) if key else None}  # fmt: skip
        row.update({k: p[k] for k in ("above_holdout_p99", "mia_auc") if p.get(k) is not None})
        plotted.append(row)
    described: dict[str, Any] = {"quality_metric": key, "points": plotted}
    if coloured:
        described["colour"] = "mia_auc"
    if second:
        described["second_panel"] = "above_holdout_p99"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={"Description": json.dumps(described)})  # fmt: skip
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

"""report.json, report.md and PNG figures (sample/nearest-neighbour pairs, similarity histograms)."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from pipeline.storage import Store


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
    text = json.dumps(report, indent=2, sort_keys=False)
    store.write_bytes(text.encode(), "reports", run, "report.json")
    store.write_bytes(markdown(report, sorted(figures)).encode(), "reports", run, "report.md")
    store.write_bytes(text.encode(), "report.json")

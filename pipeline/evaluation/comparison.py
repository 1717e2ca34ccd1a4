"""The side-by-side sampler comparison: the protections a user chooses between, on the same seeds.

Contenders (:data:`CONTENDERS`), with what each needs at sampling time:

- ``ddim``: plain DDIM; the denoiser only (the reference for time);
- ``cpsample``: CPSample (Kazdan et al. 2024); the denoiser and the random-label classifier;
- ``guard``: DDIM, every sample checked against the training set's replica index and redrawn at or
  above the copy threshold (rejection sampling);
- ``amg``: anti-memorisation guidance (Chen, Liu and Xu, CVPR 2024; :mod:`pipeline.core.amg`): the
  nearest training image of the predicted x0 at every step;
- ``cpsample+guard``: CPSample, then the guard.

Per contender :func:`comparison_row` gives copies at the threshold, the shares above the held-out
p95/p99, quality, seconds per sample and its ratio to DDIM's, and the needs. Ray-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.evaluation.shares import threshold_free_shares


@dataclass(frozen=True)
class Contender:
    """One row of the comparison: the :class:`~pipeline.core.config.SamplerConfig` ``sampler`` it
    runs, whether the guard checks its samples, and what it needs at sampling time."""

    name: str
    sampler: str
    guard: bool
    classifier: bool
    index: bool

    @property
    def slug(self) -> str:
        """The name as a path segment (``replicas-<slug>/``)."""
        return self.name.replace("+", "-")

    def needs(self) -> dict[str, bool]:
        """What sampling reads besides the denoiser. The index holds the training images'
        embeddings; under the default centred-pixel embedding those are the training images."""
        return {"classifier": self.classifier, "index": self.index, "training_images": self.index}


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("ddim", "ddim", guard=False, classifier=False, index=False),
        Contender("cpsample", "cpsample", guard=False, classifier=True, index=False),
        Contender("guard", "ddim", guard=True, classifier=False, index=True),
        Contender("amg", "amg", guard=False, classifier=False, index=True),
        Contender("cpsample+guard", "cpsample", guard=True, classifier=True, index=True),
    )
}


def comparison_row(
    contender: Contender,
    nn_sims,
    threshold: float,
    percentiles: dict[str, float],
    quality: dict[str, Any],
    run_info: dict[str, Any],
) -> dict[str, Any]:
    """One contender's row. ``nn_sims``: its samples' nearest-training-image similarities;
    ``copies`` is ``#{s >= threshold} / N`` and ``above_holdout_p95/p99`` the shares strictly above
    the held-out percentiles (:func:`threshold_free_shares`). ``run_info``: what
    :func:`pipeline.fanout.sampling.run_sampling` returned; seconds per sample are its
    ``sampling_seconds`` (every shard's drawing time, redraws included, as each shard recorded it, so
    a rerun reports the same) over its sample count."""
    s = np.asarray(nn_sims, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ConfigError(f"comparison: {contender.name} has no scored samples")
    n_run = max(1, int(run_info.get("num_samples") or 0))
    guard = run_info.get("guard") or {}
    return {
        "name": contender.name,
        "sampler": contender.sampler,
        "guard": contender.guard,
        "num_samples": int(s.size),
        "copies": float((s >= threshold).mean()),
        "num_copies": int((s >= threshold).sum()),
        "mean_nn_similarity": float(s.mean()),
        **{k: v for k, v in threshold_free_shares(s, percentiles).items() if k.startswith("above")},
        "quality": dict(quality),
        "seconds_per_sample": float(_seconds(run_info)) / n_run,
        "guidance_fired_fraction": run_info.get("guidance_fired_fraction"),
        "guard_redrawn": guard.get("rejected") if contender.guard else None,
        "guard_unfilled": guard.get("unfilled") if contender.guard else None,
        "needs": contender.needs(),
        # what made the samples: their folder, settings and the models' digests (run_sampling's)
        "folder": run_info.get("folder"),
        "sampler_settings": run_info.get("sampler_settings"),
        "provenance": run_info.get("provenance"),
    }


def _seconds(run_info: dict[str, Any]) -> float:
    """The run's summed shard times; its wall span for shards that recorded none."""
    recorded = run_info.get("sampling_seconds")
    return recorded if recorded is not None else float(run_info.get("sampling_span_s") or 0.0)


def relative_to_reference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``time_vs_ddim`` (seconds per sample over DDIM's) and ``confident_fraction_vs_ddim`` to
    every row, where DDIM's are non-zero; returns ``rows``."""
    ref = next((r for r in rows if r["name"] == "ddim"), None)
    if ref is None:
        raise ConfigError("comparison: no 'ddim' row to compare times against")
    t0, q0 = ref["seconds_per_sample"], ref["quality"].get("confident_fraction")
    for r in rows:
        r["time_vs_ddim"] = r["seconds_per_sample"] / t0 if t0 > 0 else None
        q = r["quality"].get("confident_fraction")
        r["confident_fraction_vs_ddim"] = q / q0 if q0 and q is not None else None
    return rows


def fd_of(quality: dict[str, Any]) -> tuple[str, float | None]:
    """The Fréchet distance a quality dict holds and its name: the domain CNN's ``fd`` (digits,
    labelled folders) or the held-out encoder's ``fd_encoder``."""
    if quality.get("fd") is not None:
        return "FD", float(quality["fd"])
    if quality.get("fd_encoder") is not None:
        return "FD-encoder", float(quality["fd_encoder"])
    return "FD", None


def _needs_text(needs: dict[str, bool]) -> str:
    parts = ["denoiser"] + [
        label
        for key, label in (("classifier", "classifier"), ("index", "training-set index"))
        if needs[key]
    ]
    return " + ".join(parts)


def comparison_markdown(section: dict[str, Any]) -> list[str]:
    """The report's comparison table: one row per contender, the held-out baseline's shares below."""
    rows = section["rows"]
    fd_name = next((fd_of(r["quality"])[0] for r in rows if fd_of(r["quality"])[1] is not None), "FD")  # fmt: skip
    lines = ["", "## Samplers side by side", "",
             f"{section['num_samples']} samples per sampler on the same seeds (seed "
             f"{section['seed']}); a copy is cosine >= {section['threshold']} to a training image. "
             "Time per sample is the shards' drawing time (redraws included) per sample, relative "
             "to plain DDIM's. "
             "The training-set index holds the training images' embeddings (under the default "
             "centred-pixel embedding, the images themselves).", "",
             f"| sampler | copies | > held-out p95 | > held-out p99 | confident fraction (x DDIM) "
             f"| {fd_name} | time / sample (x DDIM) | redrawn | needs at sampling time |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        q = r["quality"]
        cf = q.get("confident_fraction")
        cf_text = "-" if cf is None else f"{cf:.3f}"
        if r.get("confident_fraction_vs_ddim") is not None:
            cf_text += f" ({r['confident_fraction_vs_ddim']:.2f}x)"
        fd = fd_of(q)[1]
        rel = r.get("time_vs_ddim")
        lines.append(
            f"| {r['name']} | {r['copies']:.2%} ({r['num_copies']}) | "
            f"{r['above_holdout_p95']:.2%} | {r['above_holdout_p99']:.2%} | {cf_text} | "
            f"{'-' if fd is None else f'{fd:.2f}'} | {1e3 * r['seconds_per_sample']:.1f} ms "
            f"({'-' if rel is None else f'{rel:.2f}x'}) | "
            f"{'-' if r['guard_redrawn'] is None else r['guard_redrawn']} | "
            f"{_needs_text(r['needs'])} |"
        )
    base = section.get("holdout_copies")
    lines.append(f"| held-out real (baseline) | {'' if base is None else f'{base:.2%}'} | 5% | 1% | | | | | |")  # fmt: skip
    if section.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in section["skipped"].items())]
    return lines


def comparison_figure(section: dict[str, Any]) -> bytes:
    """Three panels over the contenders: copies, the share above the held-out p99 (its 1% line
    dashed), and time per sample relative to DDIM's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation.figures import _png_bytes

    rows = section["rows"]
    names = [r["name"] for r in rows]
    panels = (
        ("copies", f"copies (>= {section['threshold']}), %", 100.0, None),
        ("above_holdout_p99", "> held-out p99, %", 100.0, 1.0),
        ("time_vs_ddim", "time per sample, x DDIM", 1.0, 1.0),
    )
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.6))
    y = np.arange(len(rows))
    for ax, (key, title, factor, line) in zip(axes, panels):
        vals = [factor * (r.get(key) or 0.0) for r in rows]
        ax.barh(y, vals, color=["#888888" if n == "ddim" else "#2a6fb0" for n in names])
        ax.set_yticks(y, names if ax is axes[0] else [""] * len(names), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if line is not None:
            ax.axvline(line, color="black", linestyle="--", linewidth=0.8)
        for yi, v in zip(y, vals):
            ax.text(v, yi, f" {v:.2f}x" if key == "time_vs_ddim" else f" {v:.1f}", va="center", fontsize=7)  # fmt: skip
    fig.suptitle(
        f"Samplers side by side: {section['num_samples']} samples each, seed {section['seed']}",
        fontsize=9,
    )
    fig.tight_layout()
    data = _png_bytes(fig)
    plt.close(fig)
    return data

"""The replica check of one sampler's shards as a report section (``jobs/check_replicas.py``).

Streaming: the scoring actors write per-shard results and summaries
(:func:`pipeline.fanout.scoring_stream.score_shard_summaries`); this driver folds the summaries
(:mod:`pipeline.fanout.replica_summary`) and reads only bounded parts back: the ``pairs_k`` closest
pairs' images (their sample shards and training rows), and at most :data:`MAX_RECALL_QUERIES`
samples for the IVF recall measurement. Nothing it holds grows with the number of samples but the
list of per-shard summaries (fixed size each).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from pipeline.data.layout import data_folder, samples_folder
from pipeline.data.storage import Store
from pipeline.data.subsets import pick_images
from pipeline.data.tars import read_tar
from pipeline.evaluation.figures import reference_lines
from pipeline.evaluation.report import merge_report, pairs_figure, require_inputs
from pipeline.evaluation.shares import holdout_percentiles
from pipeline.fanout.replica_summary import (
    HIST_BINS,
    HIST_HI,
    ReplicaSummary,
    ShardSummary,
    fold,
    hist_edges,
    spread_picks,
)
from pipeline.fanout.scoring_stream import iter_shard_summaries, part_names, scorer_gpus

MAX_HOLDOUT = 2000  # held-out images searched for the threshold-free shares' percentiles
MAX_RECALL_QUERIES = 512  # samples whose IVF neighbour is checked against exact search, at most
SHOWN_BINS = 60  # about this many histogram bars between the lowest similarity and 1


def parts_folder(run: str, sampler: str) -> str:
    """``reports/<run>/replicas-<sampler>``: one ``<shard>.jsonl`` part per sample shard (key,
    nn_key, nn_similarity, is_replicate) and its ``<shard>.summary.json``."""
    return f"reports/{run}/replicas-{sampler}"


def iter_per_sample(store: Store, run: str, sampler: str) -> Iterator[dict[str, Any]]:
    """The per-sample results of ``run``'s replica check of ``sampler`` (``report.json``'s
    ``per_sample`` folder), part by part in shard order, one part in memory at a time: per sample
    ``{"key", "nn_key", "nn_similarity", "is_replicate"}``."""
    out = parts_folder(run, sampler)
    for name in sorted(n for n in store.listdir(out) if n.endswith(".jsonl")):
        for line in store.read_bytes(out, name).splitlines():
            if line.strip():
                yield json.loads(line)


def replica_check_report(
    store: Store,
    run: str,
    dataset: str,
    sampler: str,
    cfg: Any,
    concurrency: int = 1,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Score ``samples/<run>/<sampler>`` against ``data/<dataset>/train`` (Ray Data + FAISS) and report.

    The held-out p95/p99 come first (a bounded held-out subset), so each shard's summary counts the
    samples above them. Writes the parts under ``reports/<run>/replicas-<sampler>/`` (report.json's
    ``per_sample`` names the folder; a legacy ``replicas-<sampler>.jsonl`` is removed), annotates
    the sample shards, draws the histogram from the folded counts and a grid of the ``cfg.pairs_k``
    closest sample/training pairs, and merges the statistics into report.json. A killed check
    resumes shard by shard. The stored replica index is built when missing or stale
    (:mod:`pipeline.fanout.replica_index`). With an IVF index, recall@1 and decision agreement are
    measured on at most ``min(cfg.recall_queries, MAX_RECALL_QUERIES)`` samples spread over the
    shards (:func:`pipeline.fanout.replica_summary.spread_picks`) against exact brute force,
    beside the build's own measurement. Scorers request a GPU each with ``cfg.use_gpu``.

    Before anything is scored the samples are checked (:func:`pipeline.evaluation.inputs.check_run`):
    every shard records the same inputs, drawn by ``models/<run>/`` where the run has models there,
    trained on ``data/<dataset>``; else :class:`pipeline.data.provenance.StaleArtifactError`. The
    merged section carries ``inputs`` (models, data, the samples' fingerprint, the index's sidecar).
    """
    from pipeline.evaluation.inputs import check_run, run_inputs
    from pipeline.fanout.replica_index import ensure_replica_index, index_spec, ivf_report

    scorer_gpus(cfg.use_gpu)  # a GPU no scorer can get is refused before anything is done
    checked = check_run(store, run, dataset, (sampler,))
    folder, out = samples_folder(run, sampler), parts_folder(run, sampler)
    sidecar = ensure_replica_index(store, dataset, cfg, s3_endpoint)
    inputs = run_inputs(checked["models"], checked["data"], checked["samples"], sidecar)
    require_inputs(store, run, inputs)  # a refused update scores and writes nothing
    pct = _holdout_percentiles(store, dataset, sidecar, cfg)  # before scoring: shards count above
    fingerprint = checked["samples"].get(sampler, {}).get("fingerprint")
    counts: list[ShardCount] = []  # (shard, samples) per shard: the recall sample's frame

    def counted(summaries):
        for s in summaries:
            counts.append(ShardCount(s.shard, s.num_samples))
            yield s

    summaries = iter_shard_summaries(
        store, folder, index_spec(store, dataset, cfg, sidecar), cfg, out, pct, fingerprint,
        concurrency, s3_endpoint=s3_endpoint,
    )  # fmt: skip
    total = fold(counted(summaries), cfg.threshold, pct, cfg.pairs_k)  # as they arrive
    counts.sort()
    store.delete("reports", run, f"replicas-{sampler}.jsonl")  # the single-file form, now stale
    summary: dict[str, Any] = {
        **total.stats(), "threshold": cfg.threshold, "embedding": cfg.embedding,
        "index": sidecar["kind"], "index_build": sidecar["build_id"],
        "num_train": sidecar["num_images"], "per_sample": f"replicas-{sampler}/",
        "num_shards": total.num_shards,
    }  # fmt: skip
    if sidecar["kind"] == "ivf":
        q = min(cfg.recall_queries, MAX_RECALL_QUERIES)
        queries, found = recall_sample(store, folder, out, counts, q)
        summary["ivf"] = ivf_report(store, sidecar, cfg, queries, found)
    summary.update(total.shares())
    images, neighbours, sims = closest_pairs(store, folder, sidecar, total.closest)
    figures = {
        f"replicas_{sampler}_hist.png": counts_histogram_figure({sampler: total}, cfg.threshold),
        f"replicas_{sampler}_closest.png": pairs_figure(
            images, neighbours, sims, cfg.threshold, f"{sampler}: {len(sims)} closest"
        ),
    }
    summary["figures"] = sorted(figures)
    merge_report(
        store, run, {"samplers": {sampler: total.stats()}, "replica_check": {sampler: summary}},
        figures, deep=True,
        inputs=inputs,
    )  # fmt: skip
    return summary


def _holdout_percentiles(store: Store, dataset: str, sidecar, cfg) -> dict[str, float]:
    """The held-out p95 / p99 of nearest-training similarity: a seeded subset of at most
    :data:`MAX_HOLDOUT` held-out images, searched in the stored index in one Ray task; ``{}`` when the
    dataset has no held-out split."""
    from pipeline.fanout.replica_index import search_in_task

    folder = data_folder(dataset, "holdout")
    if not store.exists(folder) or not store.listdir(folder):
        return {}
    held, _ = pick_images(store, folder, MAX_HOLDOUT, 0)
    if not len(held):
        return {}
    return holdout_percentiles(search_in_task(store, sidecar, cfg, held.images)[0])


def _shard_rows(store: Store, folder: str, out: str, shard: str):
    """One sample shard's images (key order) and its part's lines (the same order)."""
    images = read_tar(store.read_bytes(folder, shard), store.uri_of(folder, shard))
    lines = [json.loads(x) for x in store.read_bytes(out, part_names(shard)[0]).splitlines()]
    if [x["key"] for x in lines] != images.keys:
        raise ValueError(
            f"the part of {store.uri_of(folder, shard)} lists other keys than it holds"
        )
    return images, lines


class ShardCount(NamedTuple):
    shard: str
    num_samples: int


def recall_sample(
    store: Store, folder: str, out: str, summaries: list[ShardCount] | list[ShardSummary], q: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, found similarities)`` of at most ``q`` samples spread over the shards
    (:func:`pipeline.fanout.replica_summary.spread_picks`); at most ``q`` shards read, one at a
    time."""
    picked, sims = [], []
    for i, rows in spread_picks([s.num_samples for s in summaries], q):
        images, lines = _shard_rows(store, folder, out, summaries[i].shard)
        picked.append(images.images[rows])
        sims += [float(lines[r]["nn_similarity"]) for r in rows]
    return np.concatenate(picked), np.asarray(sims)


def closest_pairs(store: Store, folder: str, sidecar: dict[str, Any], closest: list[dict]):
    """``(samples, training neighbours, similarities)`` of the folded closest pairs: each pair's
    sample shard read once, the neighbours by byte ranges of the index's rows
    (:func:`pipeline.fanout.replica_store.fetch_rows`)."""
    from pipeline.fanout.replica_store import fetch_rows

    shards: dict[str, dict[str, np.ndarray]] = {}
    for shard in sorted({p["shard"] for p in closest}):
        images = read_tar(store.read_bytes(folder, shard), store.uri_of(folder, shard))
        want = {p["key"] for p in closest if p["shard"] == shard}
        shards[shard] = {k: im for k, im in zip(images.keys, images.images) if k in want}
    samples = np.stack([shards[p["shard"]][p["key"]] for p in closest])
    neighbours = fetch_rows(store, sidecar, [int(p["nn_row"]) for p in closest])
    return samples, neighbours, np.asarray([p["similarity"] for p in closest])


def counts_histogram_figure(series: dict[str, ReplicaSummary], threshold: float) -> bytes:
    """:func:`pipeline.evaluation.figures.histogram_figure` drawn from folded counts: each series'
    fixed-bin histogram (density, bins merged to about :data:`SHOWN_BINS` bars from the lowest
    similarity to 1), the threshold and its held-out percentiles (from the first series), the
    exact replicate and above-p99 shares in the legend. The lines drawn are recorded in the PNG's
    Description text chunk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(series.values()))
    lines = reference_lines(threshold, first.percentiles or None)
    hist = np.sum([np.asarray(s.hist) for s in series.values()], axis=0)
    edges = hist_edges()
    lo = min([float(edges[int(np.argmax(hist > 0))])] + [ln["x"] for ln in lines[1:]])
    start = max(0, int(np.searchsorted(edges, lo, side="right")) - 1)
    step = max(1, (HIST_BINS - start) // SHOWN_BINS)
    shown = edges[start::step]
    if (HIST_BINS - start) % step:  # a last, narrower bar up to 1
        shown = np.append(shown, HIST_HI)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, s in series.items():
        counts = np.add.reduceat(np.asarray(s.hist)[start:], np.arange(0, HIST_BINS - start, step))
        label = f"{name} (copies {s.replication_rate:.1%}"
        if "above_holdout_p99" in s.shares():
            label += f", > p99 {s.shares()['above_holdout_p99']:.1%}"
        ax.hist(shown[:-1], bins=shown, weights=counts, density=True, alpha=0.5, label=label + ")")
    for ln in lines:
        ax.axvline(ln["x"], color=ln["color"], linestyle="--", linewidth=1.2, label=ln["label"])
    ax.set_xlabel("cosine similarity to nearest training image")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    described = {"lines": [{k: ln[k] for k in ("name", "x")} for ln in lines],
                 "counts": {name: int(s.num_samples) for name, s in series.items()}}  # fmt: skip
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight",
                metadata={"Description": json.dumps(described)})  # fmt: skip
    plt.close(fig)
    return buf.getvalue()

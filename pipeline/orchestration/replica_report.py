"""The replica check of one sampler's shards as a report section (``jobs/check_replicas.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.data.layout import data_folder, samples_folder
from pipeline.data.shards import images_of
from pipeline.data.storage import Store
from pipeline.data.subsets import pick_images
from pipeline.evaluation.report import histogram_figure, merge_report, pairs_figure, require_inputs
from pipeline.evaluation.shares import holdout_percentiles, threshold_free_shares
from pipeline.orchestration.stages import check_replicas

MAX_HOLDOUT = 2000  # held-out images searched for the threshold-free shares' percentiles


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

    Writes ``reports/<run>/replicas-<sampler>.jsonl`` (key, nn_key, nn_similarity, is_replicate), the
    similarity histogram, a grid of the ``cfg.pairs_k`` closest sample/training pairs, and merges the
    replication statistics into report.json. The stored replica index is built when missing or stale
    (:mod:`pipeline.fanout.replica_index`). With an IVF index, recall@1 and replicate-decision
    agreement are measured on up to ``cfg.recall_queries`` samples against exact brute force (Ray
    tasks streaming the stored rows in chunks; the driver never holds training embeddings), beside
    the build's own measurement (perturbed training and held-out images).

    Before anything is scored the samples are checked (:func:`pipeline.evaluation.inputs.check_run`):
    every shard records the same inputs, drawn by ``models/<run>/`` where the run has models there,
    trained on ``data/<dataset>``; else :class:`pipeline.data.provenance.StaleArtifactError`. The
    merged section carries ``inputs`` (models, data, the samples' fingerprint, the index's sidecar).
    """
    from pipeline.evaluation.inputs import check_run, run_inputs
    from pipeline.fanout.replica_index import (
        TrainingRows,
        ensure_replica_index,
        index_spec,
        ivf_report,
        local_index_dir,
    )

    checked = check_run(store, run, dataset, (sampler,))
    folder = samples_folder(run, sampler)
    sidecar = ensure_replica_index(store, dataset, cfg, s3_endpoint)
    inputs = run_inputs(checked["models"], checked["data"], checked["samples"], sidecar)
    require_inputs(store, run, inputs)  # a refused update scores and writes nothing
    stats, rows = check_replicas(
        store, run, folder, index_spec(store, dataset, cfg, sidecar), cfg, concurrency,
        name=sampler, s3_endpoint=s3_endpoint,
    )  # fmt: skip
    images, _ = images_of(rows, store, folder)
    sims = np.asarray([float(r["nn_similarity"]) for r in rows])
    summary: dict[str, Any] = {
        **stats.to_dict(), "threshold": cfg.threshold, "embedding": cfg.embedding,
        "index": sidecar["kind"], "index_build": sidecar["build_id"],
        "num_train": sidecar["num_images"], "per_sample": f"replicas-{sampler}.jsonl",
    }  # fmt: skip
    if sidecar["kind"] == "ivf":
        summary["ivf"] = ivf_report(store, sidecar, cfg, images, sims)
    pct = _holdout_percentiles(store, dataset, sidecar, cfg)
    summary.update(threshold_free_shares(sims, pct) if pct else {})
    top = np.argsort(-sims, kind="stable")[: cfg.pairs_k]
    train_rows = TrainingRows(local_index_dir(store, sidecar), sidecar)  # only the neighbours' rows
    neighbours = train_rows.rows([int(rows[i]["nn_row"]) for i in top])
    train_rows.close()
    figures = {
        f"replicas_{sampler}_hist.png": histogram_figure(
            {sampler: sims}, cfg.threshold, pct or None
        ),
        f"replicas_{sampler}_closest.png": pairs_figure(
            images[top], neighbours, sims[top], cfg.threshold, f"{sampler}: {len(top)} closest"
        ),
    }
    summary["figures"] = sorted(figures)
    merge_report(
        store, run, {"samplers": {sampler: stats.to_dict()}, "replica_check": {sampler: summary}},
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

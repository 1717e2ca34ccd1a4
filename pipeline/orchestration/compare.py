"""The side-by-side sampler comparison in a demo's store: each contender of
:mod:`pipeline.evaluation.comparison` sampled through the Ray fan-out on the same seeds, checked
against the training set's stored replica index, and scored with the demo's quality evaluator.

Samples: ``samples/<run>/{ddim,cpsample,amg}`` (the first two are the demo's main runs) and, for the
guarded contenders, ``samples/<run>-guard/{ddim,cpsample}``; their replica parts under
``reports/<run>/replicas-<contender>/``. Every run resumes and is refused when stale, as any
:func:`pipeline.fanout.sampling.run_sampling` run is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.config import CompareConfig, ReplicaConfig, SamplerConfig
from pipeline.data.imageset import images_to_tensor
from pipeline.data.shards import images_of
from pipeline.data.storage import Store
from pipeline.evaluation.comparison import (
    CONTENDERS,
    comparison_figure,
    comparison_row,
    relative_to_reference,
)
from pipeline.evaluation.shares import holdout_percentiles
from pipeline.fanout.replica_index import ensure_replica_index, index_spec
from pipeline.fanout.sampling import run_sampling
from pipeline.orchestration.stages import check_replicas

SEARCHABLE = (
    "centred",
    "raw",
)  # the embeddings the guard and AMG search (SamplerConfig.guard_embedding)


class Sampled(NamedTuple):
    """A contender's samples: what :func:`run_sampling` returned, the replica check's rows (by key)
    and the images in the same order."""

    run_info: dict[str, Any]
    rows: list[dict[str, Any]]
    pixels: np.ndarray


def _suffix(key: str) -> str:
    """``<shard>-<index>`` of a sample key ``<sampler>-<shard>-<index>``: the seed it was drawn from."""
    return str(key).split("-", 1)[1]


def same_seeds(sampled: Sampled, seeds: set[str] | None, n: int) -> Sampled:
    """``sampled`` restricted to the sample seeds ``seeds`` (key suffixes), or to its first ``n``
    rows when there are none to match."""
    keep = [
        i
        for i, r in enumerate(sampled.rows)
        if (seeds is None and i < n) or (seeds is not None and _suffix(r["key"]) in seeds)
    ]
    return Sampled(sampled.run_info, [sampled.rows[i] for i in keep], sampled.pixels[keep])


def compare_samplers(
    store: Store,
    run: str,
    dataset: str,
    ccfg: CompareConfig,
    sampler: SamplerConfig,
    replicas: ReplicaConfig,
    denoiser: str,
    classifier: str,
    evaluator,
    holdout_sims: np.ndarray,
    done: dict[str, Sampled],
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Sample, check and score every contender in ``ccfg.contenders`` on ``sampler``'s seeds;
    returns the report's ``comparison`` section and its figure ``comparison.png`` (both empty when
    there are no contenders).

    ``done``: contenders already sampled and checked (the demo's main DDIM and CPSample runs),
    restricted here to the new runs' seeds. The guard and AMG search the training split's stored
    index at the replica check's threshold under its embedding; with a ``module:`` embedding they
    are skipped (recorded in ``skipped``). ``holdout_sims``: the held-out real images' nearest-
    training similarities, which set the p95/p99 references."""
    if not ccfg.contenders:
        return {}, {}
    threshold = replicas.threshold
    searchable = replicas.embedding in SEARCHABLE
    sampled: dict[str, Sampled] = {}
    skipped: dict[str, str] = {}
    index_ref = None
    for name in ccfg.contenders:
        c = CONTENDERS[name]
        if name in done:
            continue
        if c.index and not searchable:
            skipped[name] = f"the guard and AMG search {'/'.join(SEARCHABLE)} pixels, the replica check {replicas.embedding}"  # fmt: skip
            continue
        scfg = dataclasses.replace(
            sampler, sampler=c.sampler, num_samples=ccfg.num_samples,
            guard=threshold if c.guard else None, amg_threshold=threshold,
            guard_embedding=replicas.embedding if searchable else sampler.guard_embedding,
        )  # fmt: skip
        print(f"--> comparison: {name} ({ccfg.num_samples} samples)", flush=True)
        info = run_sampling(
            store, f"{run}-guard" if c.guard else run, scfg, denoiser,
            classifier if c.classifier else None, concurrency=concurrency,
            cpus_per_actor=cpus_per_actor, guard_dataset=dataset if c.index else None,
        )  # fmt: skip
        if index_ref is None:  # ensured once (sampling with the guard or AMG may have built it)
            index_ref = index_spec(store, dataset, replicas, ensure_replica_index(store, dataset, replicas))  # fmt: skip
        _, rows = check_replicas(store, run, info["folder"], index_ref, replicas, concurrency, name=c.slug)  # fmt: skip
        sampled[name] = Sampled(info, rows, images_of(rows, store, info["folder"])[0])
    seeds = {_suffix(r["key"]) for s in sampled.values() for r in s.rows} or None
    for name in ccfg.contenders:
        if name in done:
            sampled[name] = same_seeds(done[name], seeds, ccfg.num_samples)
    base = np.asarray(holdout_sims, dtype=np.float64)
    percentiles = holdout_percentiles(base)
    rows = []
    for name in (n for n in ccfg.contenders if n in sampled):
        s = sampled[name]
        quality = evaluator.quality(images_to_tensor(s.pixels)) if evaluator is not None else {}
        sims = [r["nn_similarity"] for r in s.rows]
        rows.append(comparison_row(CONTENDERS[name], sims, threshold, percentiles, quality, s.run_info))  # fmt: skip
    section = {
        "seed": sampler.seed,
        "num_samples": min(r["num_samples"] for r in rows),
        "threshold": threshold,
        "embedding": replicas.embedding,
        "rows": relative_to_reference(rows),
        "holdout_copies": float((base >= threshold).mean()),
        **percentiles,
        "skipped": skipped,
    }
    return section, {"comparison.png": comparison_figure(section)}

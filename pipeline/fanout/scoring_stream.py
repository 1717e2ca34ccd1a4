"""Ray Data edge: the streaming replica check (jobs/check_replicas.py).

:func:`score_shard_summaries`: a Ray Data actor pool over the list of sample shards; each actor
loads the stored replica index (:mod:`pipeline.fanout.replica_index`) once and, per shard
(:func:`score_shard`), scores its rows, rewrites the shard's ``<key>.json`` with ``nn_key`` and
``nn_similarity`` (atomic, only when changed), writes the shard's rows as one JSON-lines part and a
per-shard summary (:mod:`pipeline.fanout.replica_summary`), and returns only the summary: the
driver never holds per-sample rows. Under the output folder (``reports/<run>/replicas-<sampler>/``),
for each sample shard ``<stem>.tar``::

    <stem>.jsonl          one line per sample: key, nn_key, nn_similarity, is_replicate
    <stem>.summary.json   written last: counts, histogram, k closest pairs, the inputs scored with

A rerun (a killed check) skips every shard whose summary records the same inputs and whose stored
bytes are the ones the summary records (checked in the driver: only the other shards go to the actors,
so a finished check's rerun starts none); other inputs (index build, threshold, percentiles, search
settings, samples) rescore it. Memory per actor: one shard's images and results, and the index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, ReplicaConfig, from_dict
from pipeline.data.imageset import DataError, ImageSet
from pipeline.data.provenance import StaleArtifactError
from pipeline.data.shards import manifest_shards, read_checked_shard
from pipeline.data.storage import ObjectNotFound, StorageError, Store, open_store
from pipeline.data.tars import build_tar, encode_png, read_tar
from pipeline.fanout.replica_summary import ShardSummary, summarise
from pipeline.fanout.scoring import resolve_ref, scorer_pool, write_jsonl

log = logging.getLogger(__name__)
FORMAT = 1  # bump when a part's or a summary's content for the same inputs changes
SEARCH_ROWS = 512  # images searched at once (bounds an actor's query memory)
OWN_ERRORS = (DataError, StorageError, StaleArtifactError, ConfigError)


def part_names(shard: str) -> tuple[str, str]:
    """``(<stem>.jsonl, <stem>.summary.json)``: the part and summary of shard ``<stem>.tar``."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    return f"{stem}.jsonl", f"{stem}.summary.json"


@dataclass
class ScoreJob:
    """What every scoring actor needs (small, picklable): where the shards are and the results go,
    the index to load, the settings, and ``inputs``, the record a resumed shard must match."""

    store: Store
    folder: str  # the shards scored
    out: str  # the folder of parts and summaries
    sidecar: dict[str, Any]
    replicas: dict[str, Any]  # ReplicaConfig as a dict
    percentiles: dict[str, float]
    inputs: dict[str, Any]
    annotate: bool = True
    entries: dict[str, dict[str, Any]] | None = None  # the folder's manifest entries, if any


def score_inputs(
    sidecar: dict[str, Any],
    cfg: ReplicaConfig,
    percentiles: dict[str, float],
    samples: str | None = None,
    annotate: bool = True,
) -> dict[str, Any]:
    """What a shard's scores depend on: the index build, the embedding, the threshold, the held-out
    percentiles, ``pairs_k``, the IVF search settings (``nprobe``, ``rerank_k``: an IVF index
    only), the samples' fingerprint (:func:`pipeline.evaluation.inputs.check_samples`) and
    whether the shard is annotated."""
    out = {
        "format": FORMAT, "index_build": sidecar["build_id"], "index": sidecar["kind"],
        "embedding": cfg.embedding, "threshold": float(cfg.threshold), "pairs_k": cfg.pairs_k,
        "percentiles": {k: float(v) for k, v in percentiles.items()}, "samples": samples,
        "annotate": bool(annotate),
    }  # fmt: skip
    if sidecar["kind"] == "ivf":
        out.update(nprobe=cfg.nprobe, rerank_k=cfg.rerank_k)
    return json.loads(json.dumps(out))  # as a stored summary reads it back


def score_job(
    store: Store,
    folder: str,
    out: str,
    spec: dict[str, Any],
    replicas: ReplicaConfig,
    percentiles: dict[str, float] | None = None,
    samples: str | None = None,
    annotate: bool = True,
) -> ScoreJob:
    """The :class:`ScoreJob` of scoring ``folder``'s shards into ``out`` with the index that
    ``spec`` (:func:`pipeline.fanout.replica_index.index_spec`) names."""
    pct = {k: float(v) for k, v in (percentiles or {}).items()}
    inputs = score_inputs(spec["sidecar"], replicas, pct, samples, annotate)
    return ScoreJob(store, folder, out, spec["sidecar"], dataclasses.asdict(replicas), pct, inputs,
                    annotate, manifest_shards(store, folder))  # fmt: skip


def stored_summary(store: Store, out: str, shard: str) -> ShardSummary | None:
    """The summary stored for ``shard`` under ``out``; None when absent or unreadable."""
    try:
        return ShardSummary.from_json(store.read_bytes(out, part_names(shard)[1]))
    except (ObjectNotFound, ValueError):
        return None


def _resumable(job: ScoreJob, shard: str) -> ShardSummary | None:
    """The stored summary of ``shard`` when it can stand: same inputs, the shard's stored sha256 the
    one recorded, and its part present."""
    prior = stored_summary(job.store, job.out, shard)
    if prior is None or prior.inputs != job.inputs:
        return None
    if job.store.sha256(job.folder, shard) != prior.shard_sha256:
        return None
    return prior if job.store.exists(job.out, part_names(shard)[0]) else None


def _resumable_in_driver(
    job: ScoreJob, names: list[str], threads: int = 8, chunk: int = 64
) -> Iterator[tuple[str, ShardSummary | None]]:
    """``(shard, its stored summary when it can stand, else None)`` for every name: checked in the
    driver (:func:`_resumable`: a summary, a hash and an existence check per shard), ``threads`` at a
    time and ``chunk`` names at a time, so the driver holds at most ``chunk`` summaries."""
    with ThreadPoolExecutor(threads) as pool:
        for lo in range(0, len(names), chunk):
            part = names[lo : lo + chunk]
            yield from zip(part, pool.map(lambda n: _resumable(job, n), part))


def score_shard(
    job: ScoreJob, shard: str, index_of: Callable[[], Any]
) -> tuple[ShardSummary, bool]:
    """Score one shard (unless :func:`_resumable`): search its images in the index ``index_of()``
    (loaded on first need), annotate it, write its part, then its summary. Returns (the summary,
    whether the shard was scored now). Holds one shard's rows, never more."""
    prior = _resumable(job, shard)
    if prior is not None:
        return prior, False
    store, cfg = job.store, from_dict(ReplicaConfig, job.replicas)
    if job.entries is not None:  # a dataset split: checked against its manifest
        data = read_checked_shard(store, job.folder, shard, job.entries)
    else:
        data = store.read_bytes(job.folder, shard)
    images = read_tar(data, store.uri_of(job.folder, shard))
    index = index_of()
    sims, rows = np.empty(len(images), np.float32), np.empty(len(images), np.int64)
    for lo in range(0, len(images), SEARCH_ROWS):
        sims[lo : lo + SEARCH_ROWS], rows[lo : lo + SEARCH_ROWS] = index.search(
            images.images[lo : lo + SEARCH_ROWS], k=1
        )
    nn_keys = [str(k) for k in index.keys_of(rows)]
    if job.annotate:
        data = _annotate(store, job.folder, shard, data, images, nn_keys, sims)
    part, summary_name = part_names(shard)
    lines = [
        dict(key=k, nn_key=nk, nn_similarity=float(s), is_replicate=bool(s >= cfg.threshold))
        for k, nk, s in zip(images.keys, nn_keys, sims)
    ]
    write_jsonl(store, lines, job.out, part)
    summary = summarise(shard, images.keys, sims, rows, nn_keys, cfg.threshold, job.percentiles,
                        cfg.pairs_k, job.inputs)  # fmt: skip
    summary.shard_sha256 = hashlib.sha256(data).hexdigest()
    summary.scored_id = uuid.uuid4().hex
    store.write_bytes(summary.to_json().encode(), job.out, summary_name)  # last: the shard is done
    return summary, True


def _annotate(store: Store, folder: str, shard: str, data: bytes, images: ImageSet, nn_keys, sims):
    """The shard with ``nn_key``/``nn_similarity`` in every ``<key>.json``, put atomically only when
    its bytes change; returns the bytes now stored."""
    records = [
        (key, encode_png(image), {**meta, "nn_key": nk, "nn_similarity": float(s)})
        for key, image, meta, nk, s in zip(images.keys, images.images, images.meta, nn_keys, sims)
    ]
    annotated = build_tar(records)
    if annotated != data:
        store.write_bytes(annotated, folder, shard)
    return annotated


class ShardScorer:
    """Ray Data actor: one sample shard per row (:func:`score_shard`); loads the stored index once,
    on the first shard that needs scoring. Returns only the summary (as JSON), or the error (its
    type's name and message), which the driver raises again."""

    def __init__(self, job: ScoreJob):
        self.job, self._index = job, None

    def _index_of(self):
        if self._index is None:
            from pipeline.fanout.replica_index import open_replica_index

            cfg = from_dict(ReplicaConfig, self.job.replicas)
            self._index = open_replica_index(self.job.store, self.job.sidecar, cfg)
        return self._index

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"summary": [], "scored": [], "error": [], "message": []}
        for shard in batch["shard"]:
            summary, scored, error, message = "", False, "", ""
            try:
                s, scored = score_shard(self.job, str(shard), self._index_of)
                summary = s.to_json()
            except OWN_ERRORS as exc:
                error, message = type(exc).__name__, str(exc)
            for k, v in zip(out, (summary, scored, error, message)):
                out[k].append(v)
        return {k: np.asarray(v) for k, v in out.items()}


def score_shard_summaries(*args: Any, **kwargs: Any) -> list[ShardSummary]:
    """:func:`iter_shard_summaries` as a list sorted by shard name (a fold needs no list: the driver
    of :func:`pipeline.orchestration.replica_report.replica_check_report` folds as they arrive)."""
    return sorted(iter_shard_summaries(*args, **kwargs), key=lambda s: s.shard)


def iter_shard_summaries(
    store_uri: str | Store,
    folder: str,
    spec_ref: Any,
    replicas: ReplicaConfig,
    out: str,
    percentiles: dict[str, float] | None = None,
    samples: str | None = None,
    concurrency: int = 1,
    annotate: bool = True,
    s3_endpoint: str | None = None,
) -> Iterator[ShardSummary]:
    """Score every shard under ``folder`` with a Ray Data actor pool (:class:`ShardScorer`), writing
    each shard's part and summary under ``out``; yields each shard's summary as it arrives (the
    driver never receives per-sample rows, and need not keep the summaries). Shards already scored with
    the same inputs are resumed by the driver, which yields their stored summaries first.

    ``spec_ref``: :func:`pipeline.fanout.replica_index.index_spec` (or its ObjectRef), or a dataset
    name whose index is ensured first. ``percentiles``: the held-out percentiles, known before
    scoring, that the summaries count above. ``samples``: the samples' fingerprint (resume input).
    Scorers request a GPU each with ``replicas.use_gpu``. Parts and summaries of shards no longer
    under ``folder`` are removed."""
    import ray

    from pipeline.fanout.replica_index import ensure_replica_index, index_spec

    store = open_store(store_uri, s3_endpoint, create=False)
    if isinstance(spec_ref, str):
        sidecar = ensure_replica_index(store, spec_ref, replicas, s3_endpoint)
        spec_ref = index_spec(store, spec_ref, replicas, sidecar)
    names = sorted(n for n in store.listdir(folder) if n.endswith(".tar"))
    if not names:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    spec = resolve_ref(spec_ref)
    job = score_job(store, folder, out, spec, replicas, percentiles, samples, annotate)
    todo = []
    for name, prior in _resumable_in_driver(job, names):
        if prior is None:
            todo.append(name)
        else:
            yield prior
    scored = 0
    if todo:  # only the shards not scored yet go to the actors
        ds = ray.data.from_items([{"shard": n} for n in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardScorer, fn_constructor_kwargs={"job": job}, batch_size=1,  # a shard per call
            compute=ray.data.ActorPoolStrategy(
                size=min(scorer_pool(concurrency), len(todo)), max_tasks_in_flight_per_actor=1
            ),
            num_cpus=1, num_gpus=scorer_gpus(replicas.use_gpu),
        )  # fmt: skip
        for row in ds.iter_rows():
            if row["error"]:
                raise {e.__name__: e for e in OWN_ERRORS}[str(row["error"])](str(row["message"]))
            scored += bool(row["scored"])
            yield ShardSummary.from_json(row["summary"])
    log.info("%d shards under %s: %d scored, %d resumed", len(names), store.uri_of(folder),
             scored, len(names) - scored)  # fmt: skip
    _remove_stale_parts(store, out, names)


def scorer_gpus(use_gpu: bool) -> float:
    """GPUs per scoring actor: 1 with ``use_gpu`` (a request an autoscaling cluster answers with a
    GPU node), else 0. A Ray this process started itself, without GPUs, can never grant it."""
    from pipeline.data.parallel import gpus_never_come

    if not use_gpu:
        return 0.0
    if gpus_never_come():
        raise ConfigError(
            "use_gpu: the scorers ask for a GPU each, but the Ray cluster has no GPUs"
        )
    return 1.0


def _remove_stale_parts(store: Store, out: str, names: list[str]) -> None:
    """Delete parts and summaries under ``out`` whose sample shard is gone."""
    keep = {n for name in names for n in part_names(name)}
    for name in store.listdir(out):
        if name not in keep and name.endswith((".jsonl", ".summary.json")):
            store.delete(out, name)

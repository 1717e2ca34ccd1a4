"""Ray Data edge: protected sampling on an actor pool that loads its models once.

Sampling: one row per output shard; an actor generates the shard's samples (seeds derived from
(run seed, shard, index), so the images do not depend on the number of actors) and writes the
WebDataset tar atomically. A rerun skips shards that are complete: the tar parses, every member
carries this run's settings fingerprint, and the member count matches the shard's record (checked in
the driver: only the other shards go to the actors). Guard mode
(``SamplerConfig.guard``) checks every sample against the stored replica index of the training images
(:mod:`pipeline.fanout.replica_index`: built once, loaded by each actor; exact below
``ReplicaConfig.exact_max_images``, else IVF re-ranked exactly, with measured decision agreement) and
regenerates those at or above the threshold with fresh derived seeds. Sampler ``amg`` (the baseline,
:mod:`pipeline.fanout.amg_index`) searches the same stored index at every step. (The replica check's
actor pool is in :mod:`pipeline.fanout.scoring`.)
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.core.config import ConfigError, ReplicaConfig, SamplerConfig, from_dict
from pipeline.core.sampler import derive_seed, sample, unet_denoiser
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.imageset import images_from_tensor
from pipeline.data.layout import samples_folder
from pipeline.data.parallel import gpus_never_come
from pipeline.data.provenance import StaleArtifactError, changed_inputs, value_digest
from pipeline.data.shards import shard_name
from pipeline.data.storage import Store, open_store
from pipeline.data.tars import build_tar, encode_png
from pipeline.fanout.amg_index import index_guidance, open_guard_index
from pipeline.fanout.index import GuardIndex
from pipeline.fanout.replica_index import ensure_replica_index, index_spec
from pipeline.fanout.resume import (
    check_existing_run,
    completed_shards,
    nanmax,
    open_models,
    run_fingerprint,
    sample_key,
    sampler_settings,
    sampling_provenance,
    shard_row,
)

log = logging.getLogger(__name__)


def shard_plan(num_samples: int, per_shard: int) -> list[dict[str, int]]:
    """Rows ``{"shard": i, "count": n}`` covering ``num_samples`` in shards of ``per_shard``."""
    return [
        {"shard": s, "count": min(per_shard, num_samples - start)}
        for s, start in enumerate(range(0, num_samples, per_shard))
    ]


def sample_seed(run_seed: int, shard: int, index: int, attempt: int = 0) -> int:
    """The seed of sample ``index`` of ``shard``: shared by ``ddim`` and ``cpsample`` for comparisons.

    Guard mode redraws a rejected sample with ``attempt`` = 1, 2, ...; attempt 0 is the unguarded seed,
    so a guarded run ships exactly the unguarded images wherever nothing was rejected."""
    if attempt == 0:
        return derive_seed("sample", run_seed, shard, index)
    return derive_seed("sample", run_seed, shard, index, "guard", attempt)


class ShardSampler:
    """Ray Data actor: loads the denoiser (and classifier, and the guard index) once, then writes one
    shard per input row."""

    def __init__(
        self,
        store_uri: str | Store,
        denoiser: str,
        classifier: str | None,
        sampler: dict[str, Any],
        out_folder: str,
        threads: int = 1,
        s3_endpoint: str | None = None,
        guard_spec: Any = None,
        provenance: dict[str, str] | None = None,
    ):
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = from_dict(SamplerConfig, sampler)
        self.store = open_store(store_uri, s3_endpoint, create=False)
        self.out_folder = out_folder
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # the models are copied from the store into a scratch folder only while they load
        with tempfile.TemporaryDirectory(prefix="cpsample-models-") as tmp:
            models = self._load_models(denoiser, classifier, tmp)
        # the driver digested the models it checked; these are the ones this actor samples with
        self.provenance = {**(provenance or {}), **models}
        if provenance is not None and changed_inputs(provenance, self.provenance):
            raise StaleArtifactError(
                f"the models changed while sampling started "
                f"({', '.join(changed_inputs(provenance, self.provenance))}); rerun the job"
            )
        self.fingerprint = run_fingerprint(self.provenance)
        self.guard: GuardIndex | None = None
        if self.cfg.guard is not None or self.cfg.sampler == "amg":  # the stored training index
            index = open_guard_index(self.store, guard_spec, self.device)
            if self.cfg.sampler == "amg":  # AMG searches it at every step (pipeline.core.amg)
                self.guidance = index_guidance(index, self.cfg)
            if self.cfg.guard is not None:
                self.guard, self.guard_keys = GuardIndex(index, self.cfg.guard), _LazyKeys(index)

    def _load_models(self, denoiser: str, classifier: str | None, tmp: str) -> dict[str, str]:
        """Load the models for sampling; returns their directories' digests."""
        self.unet, self.schedule, self.shape, self.guidance, models = open_models(
            self.store, denoiser, classifier, self.cfg, self.device, tmp
        )
        return models

    def _draw(self, shard: int, slots: list[int], attempts: list[int]) -> list[dict[str, Any]]:
        """Sample the given slots (each with its current attempt's seed), in batches."""
        cfg, drawn = self.cfg, []
        seeds = [sample_seed(cfg.seed, shard, i, attempts[i]) for i in slots]
        for lo in range(0, len(slots), cfg.batch_size):
            out = sample(
                unet_denoiser(self.unet, self.schedule), self.schedule, seeds[lo : lo + cfg.batch_size], self.shape,
                cfg.steps, cfg.eta, self.guidance, cfg.clip_sample, self.device,
            )  # fmt: skip
            images = images_from_tensor(out.images)
            for j, image in enumerate(images):
                p = float(out.last_p[j])
                drawn.append({
                    "index": slots[lo + j], "seed": seeds[lo + j], "image": image,
                    "fired": int(out.fired_steps[j]), "final_p": None if np.isnan(p) else p,
                })  # fmt: skip
        return drawn

    def _meta(self, shard: int, d: dict[str, Any], attempt: int) -> dict[str, Any]:
        cfg = self.cfg
        meta = {**d.get("extra", {}),
            "seed": d["seed"], "shard": shard, "index": d["index"], "attempt": attempt,
            "sampler": cfg.sampler, "steps": cfg.steps, "eta": cfg.eta,
            "guidance_steps_fired": d["fired"], "final_p": d["final_p"],
            "run_fingerprint": self.fingerprint, "provenance": self.provenance,
            "sampler_settings": sampler_settings(cfg),  # plain values, read by the evaluation
        }  # fmt: skip
        if cfg.sampler == "cpsample":
            meta.update(alpha=cfg.alpha, scale=cfg.scale, input_mode=cfg.input_mode,
                        guidance_t_max=cfg.guidance_t_max)  # fmt: skip
        return meta

    def _generate(self, shard: int, count: int) -> tuple[list, dict[str, Any]]:
        """The shard's records. Guard mode: rejected slots are redrawn with the next attempt's seed, in
        rounds and in slot order, while the shard's regeneration budget lasts (deterministic)."""
        cfg, guard = self.cfg, self.guard
        attempts, pending, shipped = [0] * count, list(range(count)), {}
        budget, rejected, max_sim = cfg.guard_budget, 0, float("nan")
        while pending:
            drawn = self._draw(shard, pending, attempts)
            if guard is not None:
                sims, nn = guard.check(np.stack([d["image"] for d in drawn]))
            retry = []
            for j, d in enumerate(drawn):
                i = d["index"]
                meta = self._meta(shard, d, attempts[i])
                if guard is not None:
                    if guard.rejects(sims[j]):
                        rejected += 1
                        if budget > 0:
                            budget, attempts[i] = budget - 1, attempts[i] + 1
                            retry.append(i)
                        continue
                    meta.update(guard_threshold=cfg.guard, guard_nn_similarity=float(sims[j]),
                                guard_nn_key=self.guard_keys[int(nn[j])])  # fmt: skip
                    max_sim = nanmax([max_sim, sims[j]])
                shipped[i] = (sample_key(cfg.sampler, shard, i), encode_png(d["image"]), meta)
            pending = retry
        records = [shipped[i] for i in sorted(shipped)]
        for _, _, meta in records:
            meta.update(shard_members=len(records), shard_planned=count, shard_rejected=rejected)
        return records, {"rejected": rejected, "max_guard_similarity": max_sim}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Draw and write the batch's shards (the driver sent only those not complete yet:
        :func:`pipeline.fanout.resume.completed_shards`); one summary row per shard."""
        rows: list[dict[str, Any]] = []
        for shard, count in zip(batch["shard"].tolist(), batch["count"].tolist()):
            t0 = time.time()
            records, stats = self._generate(shard, count)
            metas = [m for _, _, m in records]
            # drawing it, redraws included; recorded, so that a rerun reports the same sum
            stats["seconds"] = round(time.time() - t0, 4)
            for m in metas:
                m["shard_seconds"] = stats["seconds"]
            # a shard whose every slot was rejected is not written (it is redone on resume)
            if records:
                self.store.write_bytes(build_tar(records), self.out_folder, shard_name(shard))
            rows.append(shard_row(shard, count, metas, stats, skipped=False, t_start=t0))
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _summed_seconds(rows: list[dict[str, Any]]) -> float | None:
    seconds = [float(r["seconds"]) for r in rows]
    return None if any(np.isnan(v) for v in seconds) else float(sum(seconds))


def _placement(
    gpus_per_actor: float | None, concurrency: int, cpus_per_actor: float, use_gpu: bool = False
) -> tuple[float, int]:
    """GPUs per actor and torch threads per actor; checks them.

    ``gpus_per_actor`` None: 1 with ``use_gpu`` (a request the autoscaler sees even while a
    scale-from-zero cluster has no GPU node yet), else 1 when the cluster has GPUs now, else 0."""
    import ray

    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    if cpus_per_actor <= 0:
        raise ConfigError(f"num_cpus_per_actor must be > 0, got {cpus_per_actor}")
    gpus = float(ray.cluster_resources().get("GPU", 0))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if use_gpu or gpus > 0 else 0.0
    if use_gpu and gpus_per_actor == 0:
        raise ConfigError("--use-gpu with num_gpus_per_actor=0: give a GPU share > 0, or drop one")
    if gpus_per_actor < 0:
        raise ConfigError(f"num_gpus_per_actor must be >= 0, got {gpus_per_actor}")
    if gpus_per_actor > 0 and gpus_never_come():
        raise ConfigError(
            f"num_gpus_per_actor={gpus_per_actor} but the Ray cluster has no GPUs; use 0 for CPU"
        )
    return gpus_per_actor, max(1, int(cpus_per_actor))


def run_sampling(
    store_uri: str | Store,
    run: str,
    sampler: SamplerConfig,
    denoiser: str,
    classifier: str | None,
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = 0.0,
    s3_endpoint: str | None = None,
    guard_dataset: str | DatasetHandle | None = None,
    overwrite: bool = False,
    use_gpu: bool = False,
    family: ModelFamily | None = None,
    precheck: Callable[[dict[str, str]], None] | None = None,
) -> dict[str, Any]:
    """Fan ``sampler.num_samples`` out over an actor pool; returns counts, fired fraction, guard stats,
    the samples' ``provenance`` (:func:`sampling_provenance`) and their plain ``sampler_settings``
    (:func:`pipeline.fanout.resume.sampler_settings`, also in every sample's record).

    The models are loaded and digested once in the driver first, so a missing or mismatched checkpoint
    fails before any actor starts. Existing shards are resumed only when every one was made from the
    same models, settings and guard data (:func:`check_existing_run`); the complete ones are
    summarised from their records in the driver (:func:`pipeline.fanout.resume.completed_shards`) and
    only the others go to the actors, so a finished run's rerun starts none. ``overwrite`` deletes
    them first. ``gpus_per_actor=None`` means 1 with ``use_gpu`` or when the cluster has GPUs, else 0;
    fractions (0.25) pack several actors on one GPU. Guard mode needs ``guard_dataset``: the training
    shards under ``data/<guard_dataset>/train`` that no shipped sample may copy (a name, or a handle).

    ``family``: another model family than the pixel-space UNet, e.g. a Stable Diffusion directory
    sampled in latent space with prompts and classifier-free guidance
    (:func:`pipeline.fanout.latent_sampling.latent_family`).

    ``precheck(provenance)`` runs before anything is deleted or drawn (jobs/sample.py: the report).
    """
    import ray

    from pipeline.fanout.ray_init import init_ray

    folder = samples_folder(run, sampler.sampler)
    store = open_store(store_uri, s3_endpoint, create=False)
    searched = sampler.guard is not None or sampler.sampler == "amg"  # the training index
    if searched and not guard_dataset:
        what = "guard mode" if sampler.guard is not None else "sampler 'amg'"
        raise ConfigError(f"{what} needs the training dataset whose images must not be copied")
    family = family or ModelFamily(ShardSampler, open_models)
    with tempfile.TemporaryDirectory(prefix="cpsample-models-") as tmp:
        models = family.open(store, denoiser, classifier, sampler, "cpu", tmp)[-1]
    guard, guard_data = None, None
    if searched:  # its manifest read once, here or by the caller
        guard = as_handle(store, guard_dataset)
        guard_data = guard.digest
    provenance = sampling_provenance(
        sampler, models["denoiser"], models.get("classifier"), guard_data
    )
    provenance.update({k: value_digest(v) for k, v in family.settings.items()})
    plan = shard_plan(sampler.num_samples, sampler.samples_per_shard)
    if precheck is not None:
        precheck(provenance)
    if overwrite:
        store.delete_dir(folder)
    else:
        check_existing_run(store, folder, plan, provenance)
    init_ray()
    gpus_per_actor, threads = _placement(gpus_per_actor, concurrency, cpus_per_actor, use_gpu)
    guard_ref, guard_sidecar = None, None
    if searched:  # the stored index: built here only when missing or stale
        rcfg = ReplicaConfig(embedding=sampler.guard_embedding, use_gpu=use_gpu)
        guard_sidecar = ensure_replica_index(store, guard.dataset, rcfg, s3_endpoint)
        guard_ref = index_spec(store, guard.dataset, rcfg, guard_sidecar)
    # complete shards are summarised from their records by the driver; only the rest go to actors
    done = completed_shards(store, folder, plan, sampler, run_fingerprint(provenance))
    todo = [r for r in plan if r["shard"] not in done]
    rows = list(done.values())
    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo)).map_batches(
            family.actor,
            fn_constructor_kwargs={**family.settings,
                "store_uri": store_uri, "denoiser": denoiser, "classifier": classifier,
                "sampler": dataclasses.asdict(sampler), "out_folder": folder, "threads": threads,
                "s3_endpoint": s3_endpoint, "guard_spec": guard_ref, "provenance": provenance,
            },
            # one shard in flight per actor: shards are long, so they go to whichever actor is free
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(
                size=min(concurrency, len(todo)), max_tasks_in_flight_per_actor=1
            ),
            num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
        )  # fmt: skip
        rows += ds.take_all()
    rows.sort(key=lambda r: int(r["shard"]))
    summary = _sampling_summary(rows, sampler, folder)
    if guard_sidecar is not None and sampler.guard is not None:
        summary["guard"].update(_guard_index_summary(guard_sidecar, sampler))
    return {**summary, "provenance": provenance, "sampler_settings": sampler_settings(sampler)}


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """How :func:`run_sampling` opens a model family and which actor samples it.

    ``open(store, denoiser, classifier, cfg, device, tmp)`` returns a tuple whose last item is the
    digests of the model directories; ``settings`` go to every actor as constructor keywords and
    into the samples' provenance (each digested), so a rerun with other settings is refused."""

    actor: type
    open: Callable[..., tuple[Any, ...]]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)


def _guard_index_summary(sidecar: dict[str, Any], cfg: SamplerConfig) -> dict[str, Any]:
    """The guard's stored index, and its guarantee: exact for the flat index; for IVF, exact for every
    candidate found, with the decision agreement measured at build time."""
    out: dict[str, Any] = {"index": sidecar["kind"], "index_build": sidecar["build_id"]}
    if sidecar["kind"] == "ivf":
        m = sidecar.get("measurement", {})
        out["guarantee"] = (
            f"no shipped sample has cosine similarity >= {cfg.guard} to any training image found "
            f"among the IVF index's top candidates (exact similarity for every candidate found, "
            f"{cfg.guard_embedding} pixels); measured recall@1 {m.get('recall_at_1')} and "
            f"replicate-decision agreement {m.get('decision_agreement')} against exact search"
        )
    return out


class _LazyKeys:
    """``keys[i]`` of the stored index (the key list is read on first use)."""

    def __init__(self, index):
        self.index = index

    def __getitem__(self, i: int) -> str:
        return self.index.keys_of([i])[0]


def _sampling_summary(
    rows: list[dict[str, Any]], cfg: SamplerConfig, folder: str
) -> dict[str, Any]:
    n = sum(int(r["shipped"]) for r in rows)
    generated = [r for r in rows if not bool(r["skipped"])]
    out: dict[str, Any] = {
        "folder": folder,
        "num_samples": n,
        "num_planned": cfg.num_samples,
        "num_shards": len(rows),
        "skipped_shards": len(rows) - len(generated),
        "guidance_fired_fraction": float(
            sum(float(r["fired_fraction_sum"]) for r in rows) / max(n, 1)
        ),
        # every shard's drawing time summed (a resumed shard's as it recorded; None when one did
        # not record it): the compute per sample, the same on a rerun
        "sampling_seconds": _summed_seconds(rows),
        # from the first generated shard's start to the last one's end: sampling without start-up
        "sampling_span_s": (
            max(float(r["t_end"]) for r in generated) - min(float(r["t_start"]) for r in generated)
            if generated
            else 0.0
        ),
    }
    if cfg.guard is not None:
        max_sim = nanmax(r["max_guard_similarity"] for r in rows)
        unfilled = sum(int(r["count"]) - int(r["shipped"]) for r in rows)  # planned - shipped
        out["guard"] = {
            "threshold": cfg.guard,
            "embedding": cfg.guard_embedding,
            "budget_per_shard": cfg.guard_budget,
            "rejected": int(sum(int(r["rejected"]) for r in rows)),
            "unfilled": unfilled,
            "max_shipped_similarity": None if np.isnan(max_sim) else max_sim,
            "guarantee": (
                f"no shipped sample has cosine similarity >= {cfg.guard} to any training image "
                f"(exact search, {cfg.guard_embedding} pixels)"
            ),
        }
    return out

"""What a sample shard was made from, and whether a rerun may reuse it.

Every sample records its shard's inputs as digests (:func:`sampling_provenance`: the sampler settings and
the denoiser's and classifier's model directories) and their short hash, the run fingerprint. Before a
run resumes into an existing folder, :func:`check_existing_run` reads the first record of every shard
(streamed: only the tar's head) and refuses a folder drawn from other inputs, naming what changed; then
:func:`completed_shards` reads the records of every planned shard there, and the complete ones are
summarised by the driver from what they recorded: only the others are drawn, so a rerun of a finished
run starts no sampling actor.
"""

from __future__ import annotations

import json
import logging
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import SamplerConfig
from pipeline.data.checkpoints import load_models, resolve_model_dir
from pipeline.data.imageset import DataError
from pipeline.data.provenance import StaleArtifactError, changed_inputs, dir_digest, value_digest
from pipeline.data.shards import shard_name
from pipeline.data.storage import Store
from pipeline.data.tars import read_records

log = logging.getLogger(__name__)

# The settings that change a shard's bytes; recorded in every sample so a rerun never mixes runs.
_FINGERPRINT = ("sampler", "steps", "eta", "samples_per_shard", "seed", "clip_sample", "guard")
_GUIDED = ("alpha", "scale", "input_mode", "guidance_t_max")
_GUARDED = ("guard_budget", "guard_embedding")
_AMG = ("amg_threshold", "amg_scale", "guard_embedding")


def sampler_settings(cfg: SamplerConfig) -> dict[str, Any]:
    """The settings that determine a shard's contents (not batch size or sample count)."""
    names = _FINGERPRINT + (_GUIDED if cfg.sampler == "cpsample" else ())
    names += _AMG if cfg.sampler == "amg" else ()
    names += _GUARDED if cfg.guard is not None else ()
    return {n: getattr(cfg, n) for n in dict.fromkeys(names)}


def sampling_provenance(
    cfg: SamplerConfig, denoiser: str, classifier: str | None, guard_data: str | None = None
) -> dict[str, str]:
    """A shard's inputs as digests: the sampler settings, the denoiser's and (CPSample) the
    classifier's model directories (:func:`pipeline.data.provenance.dir_digest`: weights and configs),
    and in guard mode and for ``amg`` the manifest of the training data it searches."""
    out = {"sampler": value_digest(sampler_settings(cfg)), "denoiser": denoiser}
    if cfg.sampler == "cpsample" and classifier is not None:
        out["classifier"] = classifier
    if (cfg.guard is not None or cfg.sampler == "amg") and guard_data is not None:
        out["guard_data"] = guard_data
    return out


def run_fingerprint(provenance: dict[str, str]) -> str:
    """A short hash of a shard's inputs (:func:`sampling_provenance`), recorded in every sample."""
    return value_digest(provenance).split(":")[1][:16]


def first_meta(store: Store, folder: str, name: str) -> dict[str, Any] | None:
    """The JSON record of a sample shard's first member, streamed: only the tar's head is read. None
    for a shard that cannot be read as a tar with a JSON member (the sampling actor rewrites it)."""
    try:
        with (
            store.fs.open_input_stream(store.join(folder, name)) as stream,
            tarfile.open(fileobj=stream, mode="r|*") as tar,
        ):
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    return json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return None
    return None


def check_existing_run(
    store: Store,
    folder: str,
    plan: list[dict[str, int]],
    provenance: dict[str, str],
    threads: int = 8,
) -> int:
    """Refuse to resume into a folder written from other inputs or with another shard plan.

    Every shard is checked (its first member's record, streamed ``threads`` at a time): one made
    from other models, settings or guard data raises :class:`StaleArtifactError` naming the inputs
    that changed. Unreadable shards pass (the actors rewrite them). Returns the shards checked."""
    planned = {shard_name(r["shard"]) for r in plan}
    names = [n for n in store.listdir(folder) if n.endswith(".tar")]
    extra = sorted(set(names) - planned)
    if extra:
        raise StaleArtifactError(
            f"{store.uri_of(folder)} holds {extra[0]}, beyond this run's {len(plan)} shards: "
            "num_samples or samples_per_shard changed; use a new --run, or pass --overwrite "
            "to discard the old samples"
        )
    fingerprint = run_fingerprint(provenance)
    with ThreadPoolExecutor(threads) as pool:
        metas = pool.map(lambda n: first_meta(store, folder, n), names)
        for name, meta in zip(names, metas):
            if meta is None or meta.get("run_fingerprint") == fingerprint:
                continue
            changed = changed_inputs(meta.get("provenance"), provenance)
            raise StaleArtifactError(
                f"{store.uri_of(folder, name)} was sampled from other inputs (changed: "
                f"{', '.join(changed) or 'fingerprint'}); use a new --run, or pass --overwrite "
                "to discard the old samples"
            )
    return len(names)


def sample_key(sampler: str, shard: int, index: int) -> str:
    return f"{sampler}-{shard:06d}-{index:05d}"


def shard_is_complete(
    keys: list[str], metas: list[dict], cfg: SamplerConfig, index: int, count: int, fingerprint: str
) -> bool:
    """A written shard (its sorted ``keys`` and their records) counts as complete when every member
    carries this run's fingerprint, the member count equals the ``shard_members`` each member records,
    each records ``count`` as ``shard_planned`` (a grown run plans more), the keys are this shard's,
    and (without guard mode, where rejected slots may stay empty) all ``count`` samples are present."""
    if not metas or len(metas) != len(keys):
        return False
    if not set(keys) <= {sample_key(cfg.sampler, index, i) for i in range(count)}:
        return False
    for m in metas:
        if m.get("run_fingerprint") != fingerprint or m.get("shard_members") != len(keys):
            return False
        if m.get("shard_planned") != count:  # guard shards may be short: the plan must match
            return False
    return cfg.guard is not None or len(keys) == count


def nanmax(values) -> float:
    finite = [float(v) for v in values if v is not None and not np.isnan(float(v))]
    return max(finite) if finite else float("nan")


def shard_row(
    shard: int, count: int, metas: list[dict], stats: dict[str, Any], skipped: bool, t_start: float
) -> dict[str, Any]:
    """A shard's summary row (``pipeline.fanout.sampling``'s run summary sums them): shipped samples,
    the guidance-fired fraction summed over them, and ``stats`` (rejected redraws, the largest shipped
    guard similarity, the seconds drawing took)."""
    fired = sum(m["guidance_steps_fired"] / max(m["steps"], 1) for m in metas)
    return {
        "shard": shard, "count": count, "shipped": len(metas), "skipped": skipped,
        "fired_fraction_sum": fired, "t_start": t_start, "t_end": time.time(), **stats,
    }  # fmt: skip


def completed_shards(
    store: Store,
    folder: str,
    plan: list[dict[str, int]],
    cfg: SamplerConfig,
    fingerprint: str,
    threads: int = 8,
) -> dict[int, dict[str, Any]]:
    """``{shard: summary row}`` of the planned shards under ``folder`` that are complete
    (:func:`shard_is_complete`), each row made from what the shard recorded: the same as when it was
    drawn, but for its times. Shards are read ``threads`` at a time, their records only (no image is
    decoded), so the driver holds at most ``threads`` shards. A damaged, incomplete or foreign shard is
    left out, with a warning: the actors draw it again."""
    present = set(store.listdir(folder))
    existing = [r for r in plan if shard_name(r["shard"]) in present]

    def row(entry: dict[str, int]) -> dict[str, Any] | None:
        shard, count = entry["shard"], entry["count"]
        name = shard_name(shard)
        try:
            keys, metas = read_records(store.read_bytes(folder, name), name)
        except DataError as exc:
            log.warning("rewriting %s: %s", name, exc)
            return None
        if not shard_is_complete(keys, metas, cfg, shard, count, fingerprint):
            log.warning("rewriting incomplete or foreign shard %s", name)
            return None
        stats = {
            "rejected": int(metas[0].get("shard_rejected", 0)),
            "max_guard_similarity": nanmax(m.get("guard_nn_similarity") for m in metas),
            "seconds": float(metas[0].get("shard_seconds", float("nan"))),
        }
        return shard_row(shard, count, metas, stats, skipped=True, t_start=time.time())

    with ThreadPoolExecutor(threads) as pool:
        rows = pool.map(row, existing)
        return {e["shard"]: r for e, r in zip(existing, rows) if r is not None}


def open_models(
    store: Store, denoiser: str, classifier: str | None, cfg: SamplerConfig, device: str, tmp: str
):
    """:func:`pipeline.data.checkpoints.load_models` plus the digests of the model directories it
    loaded (``{"denoiser": ..., "classifier": ...}``, the classifier for CPSample only): (unet,
    schedule, shape, guidance, digests)."""
    den_dir = resolve_model_dir(store, denoiser, Path(tmp) / "denoiser")
    digests = {"denoiser": dir_digest(den_dir)}
    clf = None
    if cfg.sampler == "cpsample" and classifier is not None:
        clf_dir = resolve_model_dir(store, classifier, Path(tmp) / "classifier")
        digests["classifier"] = dir_digest(clf_dir)
        clf = str(clf_dir)
    unet, schedule, shape, guidance = load_models(store, str(den_dir), clf, cfg, device, tmp)
    return unet, schedule, shape, guidance, digests

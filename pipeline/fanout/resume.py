"""What a sample shard was made from, and whether a rerun may reuse it.

Every sample records its shard's inputs as digests (:func:`sampling_provenance`: the sampler settings and
the denoiser's and classifier's model directories) and their short hash, the run fingerprint. Before a
run resumes into an existing folder, :func:`check_existing_run` reads the first record of every shard
(streamed: only the tar's head) and refuses a folder drawn from other inputs, naming what changed.
"""

from __future__ import annotations

import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.core.config import SamplerConfig
from pipeline.data.checkpoints import load_models, resolve_model_dir
from pipeline.data.provenance import StaleArtifactError, changed_inputs, dir_digest, value_digest
from pipeline.data.shards import shard_name
from pipeline.data.storage import Store

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

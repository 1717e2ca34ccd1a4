"""Which inputs made a report's numbers, and the refusal to read samples or fold fragments made by others.

A report describes one run's models, data, samples and replica index (DESIGN.md sections 7 and 10).
The jobs that read stored samples (``evaluate``, ``check_replicas``, the demo's attacks) first check,
shard by shard, that the samples were drawn by the models they evaluate (:func:`check_samples`: the
first record of every shard, streamed, a few threads at a time) and that those models were trained on
the dataset named (:func:`check_dataset`). Each report fragment carries the ``inputs`` it was made from
(:func:`run_inputs`); :func:`conflicts` names the inputs on which a fragment and a report disagree,
and ``merge_report`` refuses such a fragment. Every refusal is a
:class:`pipeline.data.provenance.StaleArtifactError` (exit 2) naming what differs.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.provenance import (
    StaleArtifactError,
    changed_inputs,
    dir_digest,
    read_provenance,
    value_digest,
)
from pipeline.data.storage import Store
from pipeline.fanout.resume import first_meta

PACKAGE = "cpsample-ray"
SAMPLERS = ("ddim", "cpsample")


def package_version() -> str:
    """The installed version of this package ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_models(
    store: Store, run: str, denoiser: str | None = None, classifier: str | None = None
) -> dict[str, Any] | None:
    """The digests of a run's model directories as sampling computes them
    (:func:`pipeline.fanout.resume.open_models`: ``{"denoiser": ..., "classifier": ...}``, the
    classifier when it exists) and ``trained_on``: the data manifest digest recorded in the
    denoiser's ``provenance.json`` (None for a model saved without one). None when the run has no
    denoiser in the store (samples drawn from a model directory elsewhere)."""
    from pipeline.data.checkpoints import resolve_model_dir

    denoiser = denoiser or f"models/{run}/denoiser"
    classifier = classifier or f"models/{run}/classifier"
    if not Path(denoiser).is_dir() and not store.exists(*denoiser.split("/")):
        return None
    with tempfile.TemporaryDirectory(prefix="cpsample-inputs-") as tmp:
        den_dir = resolve_model_dir(store, denoiser, Path(tmp) / "denoiser")
        record = read_provenance(den_dir) or {}
        out: dict[str, Any] = {
            "denoiser": dir_digest(den_dir),
            "trained_on": (record.get("provenance") or {}).get("data"),
        }
        if Path(classifier).is_dir() or store.exists(*classifier.split("/")):
            out["classifier"] = dir_digest(resolve_model_dir(store, classifier, Path(tmp) / "clf"))
    return out


def check_dataset(
    store: Store, dataset: str | DatasetHandle, trained_on: str | None, what: str
) -> str | None:
    """The manifest digest of ``data/<dataset>`` (a name, or a handle already opened: not read
    again); refuses a dataset other than the one the model ``what`` was trained on (``trained_on``,
    from its provenance; None: not recorded, not checked)."""
    ds = as_handle(store, dataset)
    digest = ds.digest
    if trained_on is not None and digest != trained_on:
        raise StaleArtifactError(
            f"{what} was trained on data with manifest digest {trained_on[:19]}... but "
            f"{store.uri_of(ds.folder)} has {str(digest)[:19]}...: a wrong --dataset, or "
            "the data changed since training; pass the dataset the model was trained on, or retrain"
        )
    return digest


def _shard_heads(store: Store, folder: str, threads: int) -> list[tuple[str, dict | None]]:
    names = sorted(n for n in store.listdir(folder) if n.endswith(".tar"))
    with ThreadPoolExecutor(max(1, threads)) as pool:
        return list(zip(names, pool.map(lambda n: first_meta(store, folder, n), names)))


def check_samples(
    store: Store, folder: str, models: dict[str, Any] | None, threads: int = 8
) -> dict[str, Any]:
    """Check every sample shard under ``folder`` against the models evaluated with it; returns
    ``{"fingerprint", "num_shards", "settings", "provenance"}``.

    Only each shard's first record is read (streamed, ``threads`` at a time). A shard without a
    readable record or without provenance, shards drawn from different inputs, or a shard whose
    ``provenance`` names other model digests than ``models`` (:func:`run_models`; the classifier only
    where the samples used one) raises :class:`StaleArtifactError` naming the shard and what differs.
    ``fingerprint`` digests the shards' names, run fingerprints and member counts (stable under the
    replica check's annotations); ``settings`` are the sampler settings the first shard records."""
    heads = _shard_heads(store, folder, threads)
    rows, first = [], None
    for name, meta in heads:
        where = store.uri_of(folder, name)
        if meta is None or not meta.get("provenance"):
            raise StaleArtifactError(
                f"{where} records no provenance (unreadable, or drawn before samples recorded their "
                "models): its models cannot be shown to be this run's; resample with "
                "jobs/sample.py --overwrite"
            )
        first = first or meta
        if meta["provenance"] != first["provenance"]:
            changed = ", ".join(changed_inputs(first["provenance"], meta["provenance"]))
            raise StaleArtifactError(
                f"{where} was drawn from other inputs than {heads[0][0]} (changed: {changed}): "
                "the folder mixes runs; resample with jobs/sample.py --overwrite"
            )
        rows.append([name, meta.get("run_fingerprint"), meta.get("shard_members")])
    if first is not None and models is not None:
        recorded = first["provenance"]
        ours = {k: models[k] for k in ("denoiser", "classifier") if k in recorded and k in models}
        ours.setdefault("denoiser", models["denoiser"])
        changed = [k for k in ours if recorded.get(k) != ours[k]]
        if changed:
            raise StaleArtifactError(
                f"the samples under {store.uri_of(folder)} are stale: drawn by other models than "
                f"the ones evaluated (changed: {', '.join(changed)}); resample with "
                "jobs/sample.py --overwrite, or evaluate the models that drew them"
            )
    return {
        "fingerprint": value_digest(rows) if rows else None,
        "num_shards": len(rows),
        "settings": (first or {}).get("sampler_settings"),
        "provenance": (first or {}).get("provenance"),
    }


def sampler_folders(store: Store, run: str) -> dict[str, str]:
    """``samples/<run>/<sampler>`` of each sampler with shards."""
    from pipeline.data.layout import samples_folder

    out = {}
    for name in SAMPLERS:
        folder = samples_folder(run, name)
        if store.exists(folder) and any(n.endswith(".tar") for n in store.listdir(folder)):
            out[name] = folder
    return out


def run_inputs(
    models: dict[str, Any] | None = None,
    data: str | None = None,
    samples: dict[str, dict[str, Any]] | None = None,
    sidecar: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's ``inputs`` block: the model digests, the data manifest digest, each sampler's
    samples fingerprint (:func:`check_samples`), the replica index's sidecar digest (keyed by
    embedding and kind) and the package version. Unknown inputs are left out."""
    out: dict[str, Any] = {
        k: (models or {})[k] for k in ("denoiser", "classifier") if k in (models or {})
    }
    if data is not None:
        out["data"] = data
    if samples:
        out["samples"] = {k: v["fingerprint"] for k, v in samples.items() if v.get("fingerprint")}
    if sidecar is not None:
        key = f"{sidecar.get('embedding', '?')}/{sidecar.get('kind', '?')}"
        out["replica_index"] = {key: value_digest(sidecar)}
    out["package_version"] = package_version()
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def conflicts(report_inputs: dict[str, Any] | None, fragment_inputs: dict[str, Any]) -> list[str]:
    """The inputs (dotted: ``samples.cpsample``) that both blocks name with different digests."""
    ours, theirs = _flat(report_inputs or {}), _flat(fragment_inputs)
    return sorted(k for k in set(ours) & set(theirs) if ours[k] != theirs[k])


def check_run(
    store: Store,
    run: str,
    dataset: str | DatasetHandle,
    samplers: tuple[str, ...] = SAMPLERS,
    threads: int = 8,
) -> dict[str, Any]:
    """Check what a job about to read ``run``'s samples will combine: the run's models
    (:func:`run_models`; none in the store: not compared), the dataset they were trained on
    (:func:`check_dataset`) and each sampler's shards (:func:`check_samples`). Returns ``{"models",
    "data", "samples": {sampler: ...}}`` for :func:`run_inputs`; raises
    :class:`StaleArtifactError` naming what differs. ``dataset``: a name, or the job's handle."""
    models = run_models(store, run)
    trained_on = (models or {}).get("trained_on")
    data = check_dataset(store, dataset, trained_on, store.uri_of("models", run, "denoiser"))
    folders = {k: v for k, v in sampler_folders(store, run).items() if k in samplers}
    samples = {
        name: check_samples(store, folder, models, threads) for name, folder in folders.items()
    }
    return {"models": models, "data": data, "samples": samples}


def classifier_bits(store: Store, run: str) -> tuple[int, int, float]:
    """``(holdout_images, label_seed, fraction)`` of the run's classifier (``train`` and ``metrics`` in
    ``models/<run>/classifier/config.json``): how many held-out images it trained on, the seed of
    their roles, and the share of the held-out split it trained on as its own record states it
    (``metrics.holdout_fraction``); ``(0, 0, 0.0)`` without a classifier or without held-out bits.

    The share is never recomputed from the held-out split as it is now: a split that changed since
    training would move the roles. A classifier with held-out bits that does not record the share
    raises :class:`pipeline.core.models.CheckpointError`."""
    from pipeline.core.models import CheckpointError

    if not store.exists("models", run, "classifier", "config.json"):
        return 0, 0, 0.0
    record = json.loads(store.read_bytes("models", run, "classifier", "config.json"))
    train = record.get("train") or {}
    bits, label_seed = int(train.get("holdout_images", 0)), int(train.get("label_seed", 0))
    if bits == 0:
        return 0, label_seed, 0.0
    fraction = (record.get("metrics") or {}).get("holdout_fraction")
    if not isinstance(fraction, int | float):
        raise CheckpointError(
            f"classifier {store.uri_of('models', run, 'classifier')} trained on {bits} held-out "
            "images but does not record which share of the held-out split that was "
            "(config.json metrics.holdout_fraction): its never-seen images cannot be told apart; "
            "retrain it with jobs/train_classifier.py --overwrite"
        )
    return bits, label_seed, float(fraction)


def sampler_knobs(
    samples: Mapping[str, Any], alpha: float | None = None, scale: float | None = None
) -> Any:
    """CPSample's :class:`pipeline.core.config.SamplerConfig` for the attacks: the settings the
    ``cpsample`` samples record (``samples``: :func:`pipeline.evaluation.inputs.check_run`'s), with
    ``alpha``/``scale`` where given. Given knobs that differ from the samples' raise
    :class:`pipeline.core.config.ConfigError`: the report would mix two settings. Without CPSample
    samples: the given knobs, else SamplerConfig's defaults."""
    from pipeline.core.config import ConfigError, SamplerConfig, from_dict

    settings = dict((samples.get("cpsample") or {}).get("settings") or {})
    for name, given in (("alpha", alpha), ("scale", scale)):
        if given is not None and name in settings and float(given) != float(settings[name]):
            raise ConfigError(
                f"--{name} {given}: the cpsample samples were drawn with {name}="
                f"{settings[name]}; drop --{name} (the samples' value is used), or resample"
            )
    known = {f.name for f in dataclasses.fields(SamplerConfig)}
    sampler = from_dict(SamplerConfig, {k: v for k, v in settings.items() if k in known})
    knobs = {"alpha": alpha, "scale": scale}
    return dataclasses.replace(
        sampler, sampler="cpsample", **{k: v for k, v in knobs.items() if v is not None}
    )

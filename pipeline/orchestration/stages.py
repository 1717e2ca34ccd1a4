"""The pipeline's stages, each reading and writing store URIs; Ray appears only here and in ray_*.

make_shards -> train_denoiser (TorchTrainer) -> train_classifier (TorchTrainer) -> sample (Ray Data
actor pool) -> check_replicas (Ray Data + FAISS). Every stage works on a local folder or s3://.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    ReplicaConfig,
    UNetConfig,
    to_dict,
)
from pipeline.core.diffusion import linear_schedule
from pipeline.core.labels import holdout_info
from pipeline.core.models import NoiseClassifier, build_unet, save_classifier, save_denoiser
from pipeline.data.handle import DatasetHandle, as_handle
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.provenance import value_digest, write_provenance
from pipeline.data.shards import write_dataset
from pipeline.data.storage import Store
from pipeline.fanout.index import ReplicaStats, replica_stats
from pipeline.fanout.ray_init import init_ray
from pipeline.fanout.replica_index import ensure_replica_index, index_spec
from pipeline.orchestration.labels import labels_record, resolve_labels
from pipeline.orchestration.protect import check_image_shape, classifier_target
from pipeline.train.ingest import holdout_datasets, shard_names, split_info, training_dataset
from pipeline.train.run_state import claim_checkpoints, finished_line, finished_run
from pipeline.train.workers import classifier_worker, denoiser_worker, read_checkpoint


def make_shards(
    store: Store,
    dataset: str,
    train: ImageSet,
    holdout: ImageSet,
    shard_size: int = 1000,
    source: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write train and holdout WebDataset shards and ``data/<dataset>/manifest.json`` (counts, shard
    list, sha256 per shard, image size and mode). Resumable and idempotent: complete shards (same
    sha256) are skipped; see :func:`pipeline.data.shards.write_dataset`."""
    return write_dataset(
        store, dataset, {"train": train, "holdout": holdout}, shard_size, source, progress
    )


def webdataset(store: Store, folder: str):
    """``ray.data.read_webdataset`` over the shards under ``folder``, on the store's filesystem, with
    WebDataset's default decoders (rows ``__key__``, ``png`` as an array, ``json``).

    The filesystem carries the endpoint, region and static credentials, so read tasks reach S3 even
    in workers started without the driver's environment.

    With a manifest beside ``folder`` (``data/<dataset>/<split>``) the shards are checked before this
    returns (names and sha256, in parallel Ray tasks; the first mismatch raises :class:`DataError`
    naming the shard's URI): :func:`pipeline.train.ingest.shard_paths`. The training stages read
    :func:`pipeline.train.ingest.training_dataset` instead (the same checks, rows decoded to uint8
    in Ray Data tasks)."""
    import ray

    from pipeline.train.ingest import shard_paths

    paths, _, _ = shard_paths(store, folder)
    return ray.data.read_webdataset(paths, filesystem=store.fs, override_num_blocks=len(paths))


def _run_config(store: Store, name: str, num_to_keep: int, max_failures: int):
    import ray.train

    return ray.train.RunConfig(
        name=name,
        # a local path, or bucket/prefix together with the store's S3 filesystem
        storage_path=store.join("checkpoints"),
        storage_filesystem=None if store.is_local else store.fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=num_to_keep),
        failure_config=ray.train.FailureConfig(max_failures=max_failures),
    )


def worker_cpus(num_workers: int) -> float:
    """Logical CPUs per training worker: 1, or less on a private local Ray, so that at least one CPU
    stays free for the Ray Data read and decode tasks that stream to the workers every epoch (otherwise
    ingest waits forever). On a cluster 1: its head advertises no CPUs and the autoscaler adds nodes.
    Workers still run their own number of torch threads."""
    import ray

    from pipeline.data.parallel import private_local_ray

    if not private_local_ray():
        return 1.0
    total = float(ray.cluster_resources().get("CPU", 1.0))
    return max(0.25, min(1.0, (total - 1.0) / max(1, num_workers)))


def quiet_unsplit(datasets: dict, split: list[str] | None) -> dict:
    """Turn off Ray Data progress bars on the datasets TorchTrainer does not split; returns ``datasets``.

    An unsplit dataset runs whole inside every training worker, in a few seconds. The driver's
    ``tqdm_ray`` allocates a worker's bar on the first state it receives but closes it only on a later
    one, so a bar whose first state is already closed is never closed: it is redrawn under every log
    line for the rest of the job. The worker loops log their own progress.
    """
    for name, ds in datasets.items():
        if split is not None and name not in split:
            ds.context.enable_progress_bars = False
    return datasets


# Train-config fields that say how a run executes, not what it learns: a resume may change them.
EXECUTION_FIELDS = ("num_workers", "use_gpu", "max_failures", "num_to_keep", "checkpoint_every")


def training_provenance(
    store: Store, dataset: str | DatasetHandle, config: dict[str, Any], **inputs: str | None
) -> dict[str, str | None]:
    """The inputs of a training run as digests (:mod:`pipeline.data.provenance`): ``config`` (the
    resolved loop config less :data:`EXECUTION_FIELDS`), ``data`` (the dataset's manifest: every
    shard's sha256; None for shards without one; a handle's manifest is not read again) and any
    further ``inputs`` (the classifier's ``denoiser``)."""
    learned = {
        **config,
        "train": {k: v for k, v in config["train"].items() if k not in EXECUTION_FIELDS},
    }
    data = as_handle(store, dataset).digest
    return {"config": value_digest(learned), "data": data, **inputs}


def _fit(
    worker,
    config: dict,
    datasets: dict,
    tcfg,
    run_config,
    threads: int,
    split: list[str] | None = None,
):
    import ray.train
    from ray.train.torch import TorchTrainer

    cpus = worker_cpus(tcfg.num_workers)
    trainer = TorchTrainer(
        worker,
        train_loop_config={**config, "threads": threads},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu, resources_per_worker={"CPU": cpus}
        ),
        run_config=run_config,
        datasets=quiet_unsplit(datasets, split),
        dataset_config=ray.train.DataConfig(datasets_to_split=split or "all"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_config.name} reported no checkpoint")
    return result


def denoiser_plan(
    ds: DatasetHandle, unet: UNetConfig, train: DenoiserTrainConfig
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str | None]]:
    """``(config, input, provenance)`` of a denoiser run on the opened dataset ``ds``: the image
    shape checked against the UNet's, the training split's rows and bytes per row, the digests.
    Reads nothing: everything comes from the handle's manifest."""
    check_image_shape(ds.store, ds, unet.channels, unet.sample_size, "denoiser (unet)")
    config = {"unet": to_dict(unet), "train": to_dict(train)}
    inputs = {"train": split_info(ds.manifest, "train")}
    return config, inputs, training_provenance(ds.store, ds, config)


def train_denoiser(
    store: Store,
    run: str,
    dataset: str | DatasetHandle,
    unet: UNetConfig,
    train: DenoiserTrainConfig,
    threads: int = 1,
    loop_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Ray Train the denoiser on ``data/<dataset>/train``; export the EMA weights to the store layout.

    A run with the same ``run`` and store continues from its latest checkpoint (Ray Train V2 restores
    ``checkpoints/<run>-denoiser``) when its config and data are the same (:func:`claim_checkpoints`;
    ``overwrite`` starts afresh). The checkpoints and the exported model record those inputs
    (``state.json``, ``provenance.json``). A rerun of a finished run (its latest checkpoint is final
    and made from the same inputs: :func:`pipeline.train.run_state.finished_run`) exports that
    checkpoint again without starting Ray or reading a shard. Otherwise Ray starts here
    (``init_ray(num_cpus=ray_cpus)``, a no-op when it runs already), after a check that the split has
    shards. ``loop_config``: extra worker-loop keys (``step_delay_s`` for fault-injection tests).
    ``dataset``: a name, or a handle the caller opened (the manifest is
    read once: :func:`pipeline.data.handle.open_dataset`)."""
    ds = as_handle(store, dataset)
    config, inputs, provenance = denoiser_plan(ds, unet, train)
    schedule = linear_schedule()
    done = None if overwrite else finished_run(store, f"{run}-denoiser", provenance, train.steps)
    if done is not None:
        print(finished_line("denoiser", done), flush=True)
        tensors, state, metrics = done.tensors, done.state, done.metrics
    else:
        shard_names(store, ds.split("train"))  # no shards: exits before Ray starts
        init_ray(num_cpus=ray_cpus)
        datasets = {"train": training_dataset(store, ds.split("train"), train.seed, ds.manifest)}
        claim_checkpoints(store, f"{run}-denoiser", provenance, overwrite)
        loop = {**config, **(loop_config or {}), "input": inputs, "provenance": provenance}
        result = _fit(
            denoiser_worker, loop, datasets, train,
            _run_config(store, f"{run}-denoiser", train.num_to_keep, train.max_failures), threads,
        )  # fmt: skip
        with result.checkpoint.as_directory() as d:
            tensors, state, _ = read_checkpoint(d)
        metrics = dict(result.metrics or {})
    model = build_unet(unet)
    model.load_state_dict(tensors["ema"])
    run_config = {
        "run": run,
        "dataset": ds.dataset,
        "step": state["step"],
        "resumed_from": state.get("resumed_from", []),
        **config,
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_denoiser(model, Path(tmp) / "denoiser", run_config, schedule)
        write_provenance(Path(tmp) / "denoiser", provenance)
        store.put_dir(Path(tmp) / "denoiser", "models", run, "denoiser")
    return {"uri": store.uri_of("models", run, "denoiser"), "metrics": metrics}


class ClassifierPlan(NamedTuple):
    """What a classifier run learns, decided before any Ray work: ``target`` (the arch with the
    data's shape, the betas: :func:`classifier_target`), ``config``, ``labels`` and ``clusters``
    (:func:`resolve_labels`) and the ``provenance`` its checkpoints record."""

    target: Any
    config: dict[str, Any]
    labels: str
    clusters: Any
    provenance: dict[str, str | None]


def classifier_plan(
    ds: DatasetHandle,
    arch: ClassifierArchConfig,
    train: ClassifierTrainConfig,
    schedule_betas: list[float] | None = None,
    denoiser: str | None = None,
    model: str | None = None,
    text_cond: bool = False,
) -> ClassifierPlan:
    """The :class:`ClassifierPlan` of a run on the opened dataset ``ds``: its manifest is not read
    again (cluster bits read the clusters, and their check reads the training manifest)."""
    store = ds.store
    target = classifier_target(store, ds, arch, schedule_betas, denoiser, model, text_cond)
    config = {
        "arch": to_dict(target.arch),
        "train": to_dict(train),
        "betas": target.betas,
        "betas_from": denoiser or model,
    }
    labels, clusters = resolve_labels(store, ds, train)
    extra = {"clusters": clusters.digest} if clusters is not None else {}
    provenance = training_provenance(
        store, ds, {**config, "betas_from": None}, **target.inputs, **extra
    )
    return ClassifierPlan(target, config, labels, clusters, provenance)


def train_classifier(
    store: Store,
    run: str,
    dataset: str | DatasetHandle,
    arch: ClassifierArchConfig,
    train: ClassifierTrainConfig,
    threads: int = 1,
    schedule_betas: list[float] | None = None,
    denoiser: str | None = None,
    loop_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    model: str | None = None,
    text_cond: bool = False,
    ray_cpus: int | None = None,
) -> dict[str, Any]:
    """Ray Train the random-label classifier on the training images plus ``holdout_images`` held-out
    images with their own bits; the remaining held-out images are never seen and measure calibration.

    ``denoiser``: any diffusers UNet2DModel directory (a local folder or a store path such as
    ``models/<run>/denoiser``), for example a saved google/ddpm-cifar10-32. The model to protect is not
    trained: its noise schedule and image shape (C, H, W) define the classifier's inputs.

    A latent dataset (its manifest has a ``latent`` section) trains the same loop on the scaled VAE
    latents: the arch's channels and sample size are the latents'; ``model`` (a Stable Diffusion
    directory, local or in the store) gives the noise schedule and must denoise latents of that shape;
    ``text_cond`` (or ``arch.cond_dim``) conditions on the pooled text embeddings. See
    :func:`pipeline.orchestration.protect.classifier_target`; the model is never loaded.

    Resume and provenance as in :func:`train_denoiser`; the inputs also name the denoiser's (or the
    model's) digest. The saved ``config.json`` records the schedule it learned
    (:func:`pipeline.core.models.schedule_record`: every beta's digest and how the model reads them)
    and its model card ``fit`` (:func:`pipeline.train.loops.fit_card`, measured at the last
    checkpoint), which sampling checks (:func:`pipeline.data.checkpoints.check_classifier_fits`).
    Returns ``{"uri", "metrics", "fit"}``. ``dataset``: a name, or a handle the caller opened.
    """
    ds = as_handle(store, dataset)
    plan = classifier_plan(ds, arch, train, schedule_betas, denoiser, model, text_cond)
    target, provenance = plan.target, plan.provenance
    labels, clusters = plan.labels, plan.clusters
    held = holdout_info(split_info(ds.manifest, "holdout"), train.holdout_images)
    done = None
    if not overwrite and held is not None:
        done = finished_run(store, f"{run}-classifier", provenance, train.steps)
    if done is not None:
        print(finished_line("classifier", done), flush=True)
        tensors, state = done.tensors, done.state
    else:
        for split in ("train", "holdout"):  # no shards: exits before Ray starts
            shard_names(store, ds.split(split))
        init_ray(num_cpus=ray_cpus)
        tensors, state, held = _fit_classifier(
            store, run, ds, plan, train, threads, loop_config, overwrite
        )
    model = NoiseClassifier(target.arch)
    model.load_state_dict(tensors["model"])
    run_config = {
        "run": run,
        "dataset": ds.dataset,
        "step": state["step"],
        "train": to_dict(train),
        # with the held-out share it trained on (its bits' keys are never non-members): evaluation
        # reads it here rather than recomputing it from the held-out split as it is now
        "metrics": {**state.get("metrics", {}), "holdout_fraction": held["fraction"]},
        # the model card: the fit sampling checks (SamplerConfig.min_fit) and how it was measured
        "fit": state.get("fit"),
        "denoiser": denoiser,
        "schedule": state.get("schedule"),
        "resumed_from": state.get("resumed_from", []),
        "labels": labels_record(labels, clusters),
        **({"latent": target.latent} if target.latent is not None else {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_classifier(model, Path(tmp) / "classifier", run_config)
        write_provenance(Path(tmp) / "classifier", provenance)
        store.put_dir(Path(tmp) / "classifier", "models", run, "classifier")
    return {
        "uri": store.uri_of("models", run, "classifier"),
        "metrics": state.get("metrics", {}),
        "fit": state.get("fit"),
    }


def _fit_classifier(
    store: Store, run: str, ds: DatasetHandle, plan: ClassifierPlan, train: ClassifierTrainConfig,
    threads: int, loop_config: dict[str, Any] | None, overwrite: bool,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Ray Train the classifier of ``plan``: (its final checkpoint's tensors and state, the held-out
    split's info)."""
    config, provenance, target, clusters = plan.config, plan.provenance, plan.target, plan.clusters
    # the held-out roles are a keyed hash of each key (``is_trained_holdout``), applied in Ray Data
    # before the split: "holdout" holds the rows trained on with their bits, "never" at most
    # metrics_samples never-seen rows for rank 0's fit metrics
    bits, never, held = holdout_datasets(
        store, ds.split("holdout"), train.label_seed, train.holdout_images,
        train.metrics_samples, train.seed, ds.manifest,
    )  # fmt: skip
    datasets = {
        "train": training_dataset(store, ds.split("train"), train.seed, ds.manifest),
        "holdout": bits,
        "never": never,
    }
    inputs = {"train": split_info(ds.manifest, "train"), "holdout": held}
    claim_checkpoints(store, f"{run}-classifier", provenance, overwrite)
    loop = {**config, **(loop_config or {}), "input": inputs, "provenance": provenance}
    loop["label_of"] = clusters.label_of if clusters is not None else None  # cluster bits
    # how the model reads its schedule: recorded beside the betas' digest (the denoiser's or the
    # model's digest in the provenance already covers it)
    loop["reading"] = target.reading
    result = _fit(
        classifier_worker, loop, datasets, train,
        _run_config(store, f"{run}-classifier", train.num_to_keep, train.max_failures), threads,
        split=["train", "holdout"],
    )  # fmt: skip
    with result.checkpoint.as_directory() as d:
        tensors, state, _ = read_checkpoint(d)
    return tensors, state, held


def check_replicas(
    store: Store,
    run: str,
    folder: str,
    dataset: Any,
    replicas: ReplicaConfig,
    concurrency: int = 1,
    annotate: bool = True,
    name: str | None = None,
    s3_endpoint: str | None = None,
) -> tuple[ReplicaStats, list[dict[str, Any]]]:
    """Score every image under ``folder`` shard by shard (:mod:`pipeline.fanout.scoring_stream`): per
    sample shard a part and a summary under ``reports/<run>/replicas-<name>/`` (the layout of
    ``jobs/check_replicas.py``), shards annotated unless ``annotate`` is false. Returns the stats and,
    for the demo's figures, every sample's row read back from the parts, ordered by key: a demo's
    sample counts are small; the scale path is :func:`pipeline.orchestration.replica_report`.

    ``dataset``: the training dataset, whose stored replica index is built first when it has no valid
    one (:func:`pipeline.fanout.replica_index.ensure_replica_index`), or an ``index_spec`` naming an
    index already ensured. The scoring actors load the stored index; nothing is built per actor."""
    from pipeline.fanout.scoring_stream import score_shard_summaries
    from pipeline.orchestration.replica_report import iter_per_sample, parts_folder

    name = name or folder.rstrip("/").rsplit("/", 1)[-1]
    score_shard_summaries(
        store, folder, dataset, replicas, parts_folder(run, name), concurrency=concurrency,
        annotate=annotate, s3_endpoint=s3_endpoint,
    )  # fmt: skip
    rows = sorted(iter_per_sample(store, run, name), key=lambda r: r["key"])
    return replica_stats(np.asarray([r["nn_similarity"] for r in rows]), replicas.threshold), rows


def check_samplers_and_holdout(
    store: Store,
    run: str,
    dataset: str,
    folders: dict[str, str],
    replicas: ReplicaConfig,
    concurrency: int = 1,
) -> tuple[dict[str, tuple[ReplicaStats, list[dict[str, Any]]]], tuple[ReplicaStats, list]]:
    """A demo's replica checks: each sampler's ``folders[name]`` (annotated, reported under
    ``replicas-<name>/``) and the held-out real images (not annotated) against the training
    split's stored index, ensured once. Returns ``({name: (stats, rows)}, (stats, rows) held-out)``."""
    index_ref = index_spec(store, dataset, replicas, ensure_replica_index(store, dataset, replicas))
    checked = {
        name: check_replicas(store, run, folder, index_ref, replicas, concurrency, name=name)
        for name, folder in folders.items()
    }
    holdout = check_replicas(
        store, run, data_folder(dataset, "holdout"), index_ref, replicas, annotate=False,
        name="holdout",
    )  # fmt: skip
    return checked, holdout

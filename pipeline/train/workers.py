"""Ray Train (V2) edge: ``TorchTrainer`` worker loops for the denoiser and the classifier.

Each worker loop streams its data shard (``ray.train.get_dataset_shard``, rows decoded by Ray Data, see
:mod:`pipeline.train.ingest`) epoch by epoch, or caches it when small, wraps the model with
``prepare_model`` (DDP when there is more than one worker), resumes from ``ray.train.get_checkpoint()``
(step, epoch and position in the epoch) and reports checkpoints that carry the resolved config
(safetensors + ``state.json``) and how every rank consumed its input (``data``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    UNetConfig,
    from_dict,
)
from pipeline.core.diffusion import linear_schedule, schedule_from_betas
from pipeline.core.models import NoiseClassifier, build_unet, schedule_record
from pipeline.data.provenance import require_same
from pipeline.train.batches import batch_bits, batch_images, batch_pooled
from pipeline.train.ingest import (
    CHUNK,
    PREFETCH_BATCHES,
    StreamRows,
    cache_rows,
    concat,
    device_batches,
    expected_bytes,
    take,
)
from pipeline.train.loops import (
    EMA,
    classifier_metrics,
    fit_card,
    fit_classifier,
    fit_denoiser,
    train_log,
)

STATE = "state.json"


# ------------------------------------------------------------------------------------- data helpers
def shard_source(
    name: str,
    tcfg,
    rank: int,
    world: int,
    info: dict[str, Any] | None,
    stream: int = 0,
    keep: int = 0,
    rows: int | None = None,
    device: torch.device | None = None,
):
    """This worker's shard of dataset ``name`` (rows ``{"key", "image"}`` from
    :func:`pipeline.train.ingest.training_dataset`) as a row source: cached in memory when its
    expected decoded size (``info``: the manifest's rows and bytes per row; ``rows`` overrides the
    count) is at most ``tcfg.cache_max_bytes``, else streamed every epoch through a seeded shuffle
    buffer. The decision comes from the manifest, so it is the same on every rank. Ray Data fetches
    and decodes ``PREFETCH_BATCHES`` batches ahead; with ``device`` (a loop that needs no keys) a
    streamed pass arrives on it keyless (:func:`pipeline.train.ingest.device_batches`)."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)

    def open_epoch():
        return shard.iter_batches(
            batch_size=CHUNK, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES
        )

    expected = None if info is None else (info["rows"] if rows is None else rows)
    if expected_bytes(info, world, expected) <= tcfg.cache_max_bytes:
        return cache_rows(open_epoch(), tcfg.seed, rank, stream)
    size = None if expected is None else -(-expected // world)
    opened = open_epoch if device is None else (lambda: device_batches(shard, device))
    return StreamRows(opened, tcfg.shuffle_buffer, tcfg.seed, rank, stream, size, keep)


def read_rows(name: str, limit: int) -> dict[str, Any] | None:
    """At most ``limit`` rows of dataset ``name`` (one bounded pass; None if it has none)."""
    import ray.train

    parts, n = [], 0
    for batch in ray.train.get_dataset_shard(name).iter_batches(
        batch_size=CHUNK, batch_format="numpy"
    ):
        parts.append(batch)
        n += len(batch["key"])
        if n >= limit:
            break
    parts = [p for p in parts if len(p["key"])]
    return take(concat(parts), slice(0, limit)) if parts else None


def gather(value: Any, world: int) -> list[Any]:
    """``value`` of every rank (a collective: every rank calls it at the same step)."""
    import torch.distributed as dist

    if world > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world
        dist.all_gather_object(out, value)
        return out
    return [value]


def resume_position(state: dict, rank: int) -> dict | None:
    """This rank's input position (``{"train": {"epoch", "offset"}, ...}``) from a checkpoint's
    ``data`` (one entry per rank of the run that made it; rank 0's when the world grew)."""
    data = state.get("data") or []
    if not data:
        return None
    return data[rank] if rank < len(data) else data[0]


# ------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(
    dirpath: Path, tensors: dict[str, dict[str, torch.Tensor]], optimizer, state: dict
) -> None:
    for name, sd in tensors.items():
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in sd.items()},
            str(dirpath / f"{name}.safetensors"),
        )
    torch.save(optimizer.state_dict(), dirpath / "optimizer.pt")
    (dirpath / STATE).write_text(json.dumps(state, indent=2))


def _report(metrics: dict, rank: int, save: Callable[[Path], None] | None) -> None:
    """``ray.train.report`` on every rank (it is a barrier); only rank 0 attaches a checkpoint."""
    import ray.train

    if save is None or rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def read_checkpoint(directory: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, Path]:
    """(safetensors state dicts by name, state.json, path) of a checkpoint directory."""
    directory = Path(directory)
    tensors = {p.stem: load_file(str(p)) for p in directory.glob("*.safetensors")}
    return tensors, json.loads((directory / STATE).read_text()), directory


def _resume(
    optimizer, provenance: dict | None
) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    """(tensors, state with the optimizer's state) of the checkpoint Ray Train restores, None when it
    restores none. A checkpoint made from other inputs than ``provenance`` (the loop config's: the
    driver checked the run's record, :func:`pipeline.train.run_state.claim_checkpoints`; this
    checks the checkpoint itself) raises :class:`StaleArtifactError`."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        tensors, state, path = read_checkpoint(d)
        if provenance is not None:
            require_same(f"checkpoint {ckpt.path}", state.get("provenance"), provenance)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    return tensors, {**state, "optimizer": optimizer_state}


def _faults(model: torch.nn.Module, config: dict[str, Any], rank: int) -> None:
    """Fault injection for tests, never set in normal runs. ``step_delay_s``: sleep that long before
    every forward pass (time to kill a worker mid-run). ``exit_at`` ``{"rank", "step", "marker"}``:
    that rank's process exits hard (``os._exit(1)``: no cleanup, as a killed one) before its
    ``step``-th forward pass of an attempt where the file ``marker`` does not exist yet, creating it
    (once: the restarted group runs on, whatever checkpoint it resumed from)."""
    delay, spec, calls = config.get("step_delay_s", 0.0), config.get("exit_at") or {}, [0]
    exit_step = spec["step"] if spec.get("rank") == rank else None

    def hook(*_) -> None:
        calls[0] += 1
        if calls[0] == exit_step and not os.path.exists(spec["marker"]):
            Path(spec["marker"]).touch()  # once across attempts
            os._exit(1)
        if delay > 0:
            time.sleep(delay)

    if delay > 0 or spec:
        model.register_forward_pre_hook(hook)


def set_niceness(target: int = 0) -> int:
    """Move this process to niceness ``target`` (or as close as allowed); returns the niceness now.

    Ray starts worker processes at niceness 15 (raylet's ``worker_niceness``; ``init_ray`` sets it to
    0 for private local instances, but a cluster started with ``ray start`` keeps 15) so that its own
    daemons stay responsive. A training worker is the job's main compute, though: at niceness 15 it
    yields the CPU to every ordinary process on the node (bench P5 measures the cost). Lowering
    niceness needs CAP_SYS_NICE (root in a container); without it the worker keeps Ray's value.
    """
    current = os.getpriority(os.PRIO_PROCESS, 0)
    step = 1 if target < current else -1
    for value in range(target, current, step):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, value)
            return value
        except PermissionError:
            continue
    return current


def _worker_setup(threads: int, niceness: int | None = 0) -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    if threads > 0:
        torch.set_num_threads(threads)
    if niceness is not None:
        set_niceness(niceness)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


# ---------------------------------------------------------------------------------------- denoiser
def _schedule(config: dict[str, Any]):
    """The loop's noise schedule: ``config["betas"]`` (else DDPM's linear T=1000), read as
    ``config["reading"]`` says (``prediction_type``, ``timestep_spacing``, ``steps_offset`` of the
    model it is trained for: recorded, not used by the loss)."""
    reading = config.get("reading") or {}
    if config.get("betas"):
        return schedule_from_betas(torch.tensor(config["betas"]), **reading)
    return dataclasses.replace(linear_schedule(), **reading)


def denoiser_worker(config: dict[str, Any]) -> None:
    """Worker loop: eps-prediction MSE (Ho et al. 2020, eq. 14) with EMA, DDP via ``prepare_model``.

    ``config["input"]["train"]``: the manifest's ``{"rows", "row_bytes"}`` of the split (None: stream).
    """
    import ray.train.torch

    ucfg = from_dict(UNetConfig, config["unet"])
    tcfg = from_dict(DenoiserTrainConfig, config["train"])
    rank, world, device = _worker_setup(config.get("threads", 0), config.get("niceness", 0))
    torch.manual_seed(tcfg.seed)
    unet = build_unet(ucfg).to(device)
    ema = EMA(unet, tcfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=0.0)
    start, history, position = 0, [], None
    resumed = _resume(opt, config.get("provenance"))
    if resumed is not None:
        tensors, state = resumed
        unet.load_state_dict(tensors["model"])
        ema.shadow.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], [*state.get("resumed_from", []), state["step"]]
        position = resume_position(state, rank)
        train_log(rank, f"resumed denoiser from step {start} at {position}")
    _faults(unet, config, rank)
    model = ray.train.torch.prepare_model(unet)
    info = (config.get("input") or {}).get("train")
    source = shard_source("train", tcfg, rank, world, info, device=device)  # keyless: no bits
    state = {
        "kind": "denoiser",
        "unet": config["unet"],
        "train": config["train"],
        "provenance": config.get("provenance"),
        "resumed_from": history,
    }

    def on_checkpoint(step: int, metrics: dict) -> None:
        data = gather({"step": step, **metrics.pop("data")}, world)
        train_log(
            rank, f"denoiser checkpoint at step {step} ({metrics['images_per_s']:.0f} images/s)"
        )

        def save(d: Path) -> None:
            tensors = {"model": unet.state_dict(), "ema": ema.shadow.state_dict()}
            _save_checkpoint(d, tensors, opt, {**state, "step": step, "data": data})

        _report({**metrics, "data": data}, rank, save)

    fit_denoiser(
        model, ema, opt, _schedule(config), source, tcfg, start, world, rank, on_checkpoint,
        log_every=100, position=position,
    )  # fmt: skip


# --------------------------------------------------------------------------------------- classifier
def classifier_worker(config: dict[str, Any]) -> None:
    """Worker loop: BCE on random bits of noisy images (CPSample, Algorithm 1), plus fit metrics.

    Datasets: ``train`` and ``holdout`` (the held-out rows trained on with their own bits, both split
    over the workers) and ``never`` (never-seen held-out rows, at most ``metrics_samples``; rank 0
    reads it once for the metrics). ``config["input"]``: the manifest's ``{"rows", "row_bytes"}`` of
    ``train`` and of ``holdout`` (with ``"bits"``, the expected number of bit rows). Every checkpoint
    carries the schedule's record (:func:`schedule_record`; ``config["reading"]``: how the model it
    protects reads its schedule) and rank 0's model card (``"fit"``, :func:`fit_card`).
    """
    import ray.train.torch

    acfg = from_dict(ClassifierArchConfig, config["arch"])
    tcfg = from_dict(ClassifierTrainConfig, config["train"])
    rank, world, device = _worker_setup(config.get("threads", 0), config.get("niceness", 0))
    schedule = _schedule(config)
    torch.manual_seed(tcfg.seed)
    clf = NoiseClassifier(acfg).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start, history, position = 0, [], None
    resumed = _resume(opt, config.get("provenance"))
    if resumed is not None:
        tensors, state = resumed
        clf.load_state_dict(tensors["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], [*state.get("resumed_from", []), state["step"]]
        position = resume_position(state, rank)
        train_log(rank, f"resumed classifier from step {start} at {position}")
    _faults(clf, config, rank)
    model = ray.train.torch.prepare_model(clf)
    inputs = config.get("input") or {}
    label_of = config.get("label_of") or None  # key -> near-duplicate cluster id (cluster bits)
    keep = tcfg.metrics_samples if rank == 0 else 0
    train_src = shard_source("train", tcfg, rank, world, inputs.get("train"), 0, keep)
    held = inputs.get("holdout")
    bits_src = None
    if held is None or held.get("bits", world) >= world:  # at least one bit row per rank expected
        rows = None if held is None else held.get("bits")
        bits_src = shard_source("holdout", tcfg, rank, world, held, 1, 0, rows)
    state = {
        "kind": "classifier",
        "arch": config["arch"],
        "train": config["train"],
        "betas_from": config.get("betas_from"),
        "provenance": config.get("provenance"),
        "schedule": schedule_record(schedule),
        "resumed_from": history,
    }
    never: dict[str, torch.Tensor | None] = {}

    def pooled(rows: dict | None) -> torch.Tensor | None:  # a text-conditioned classifier's input
        return batch_pooled(rows, device) if acfg.cond_dim and rows else None

    def fit_metrics(step: int) -> tuple[dict, dict | None]:
        """Rank 0's fit metrics on at most ``metrics_samples`` training rows it has read and as many
        never-seen held-out rows, in batches of ``metrics_batch``, and the model card made of them
        (:func:`fit_card`); the noisings are drawn with ``tcfg.seed``."""
        if not never:
            rows = read_rows("never", tcfg.metrics_samples)
            never["x"] = batch_images(rows, device) if rows else torch.zeros(0, 1, 1, 1)
            never["y"] = (
                batch_bits(rows, tcfg.label_seed, device, label_of) if rows else torch.zeros(0)
            )
            never["c"] = pooled(rows)
        sample = train_src.sample(tcfg.metrics_samples)
        if sample is None:
            return {}, None
        metrics = classifier_metrics(
            clf, schedule, batch_images(sample, device),
            batch_bits(sample, tcfg.label_seed, device, label_of).cpu(), never["x"], never["y"].cpu(),
            seed=tcfg.seed, batch_size=tcfg.metrics_batch, train_cond=pooled(sample),
            never_cond=never["c"],
        )  # fmt: skip
        return metrics.to_dict(), fit_card(metrics, tcfg.seed, step)

    def on_checkpoint(step: int, metrics: dict) -> None:
        data = gather({"step": step, **metrics.pop("data")}, world)
        # the fit metrics of rank 0's sample of the training images (Ray keeps rank 0's metrics)
        fit, card = {}, None
        if rank == 0:
            fit, card = fit_metrics(step)
            clf.train()
            if fit:
                train_log(
                    rank,
                    f"classifier step {step}/{tcfg.steps} loss {metrics['loss']:.4f} "
                    f"acc {fit['train_accuracy_by_t']} held-out-bit acc "
                    f"{fit['holdout_accuracy']:.3f} lipschitz {fit['lipschitz_proxy']:.3g}",
                )

        def save(d: Path) -> None:
            _save_checkpoint(
                d,
                {"model": clf.state_dict()},
                opt,
                {**state, "step": step, "metrics": fit, "fit": card, "data": data},
            )

        _report({**metrics, **fit, "data": data}, rank, save)

    fit_classifier(
        model, opt, schedule, train_src, bits_src, None, tcfg, start, world, rank, on_checkpoint,
        log_every=200, position=position, label_of=label_of,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ job CLI flags
def add_train_flags(p) -> None:
    """The Ray Train flags shared by jobs/train_denoiser.py and jobs/train_classifier.py."""
    g = p.add_argument_group("Ray Train (each flag overrides the config's 'train' section)")
    g.add_argument("--steps", type=int, help="optimizer steps in total (all workers together)")
    g.add_argument("--batch-size", type=int, help="global batch, split over the workers")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), help="after the warm-up")
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--num-workers", type=int, help="ScalingConfig(num_workers)")
    g.add_argument(
        "--use-gpu", action="store_true", help="ScalingConfig(use_gpu=True): 1 GPU/worker"
    )
    g.add_argument(
        "--max-failures", type=int, help="FailureConfig: worker-group restarts (2; 0: off; -1: inf)"
    )
    g.add_argument("--num-to-keep", type=int, help="CheckpointConfig: checkpoints kept")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (and metrics)")
    g.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    g.add_argument("--ray-cpus", type=int, help="CPUs of a local Ray (ignored under RAY_ADDRESS)")
    g.add_argument("--s3-endpoint", help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="discard this run's checkpoints when they were made from another config or data "
        "(without it such a rerun exits 2 naming what changed)",
    )


def train_overrides(args) -> dict[str, Any]:
    """The non-None train-config overrides from :func:`add_train_flags`'s flags."""
    return {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "warmup_steps": args.warmup_steps,
        "num_workers": args.num_workers,
        "use_gpu": args.use_gpu or None,
        "max_failures": args.max_failures,
        "num_to_keep": args.num_to_keep,
        "checkpoint_every": args.checkpoint_every,
    }

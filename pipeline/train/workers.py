"""Ray Train (V2) edge: ``TorchTrainer`` worker loops for the denoiser and the classifier.

Each worker loop reads its data shard with ``ray.train.get_dataset_shard``, wraps the model with
``prepare_model`` (DDP when there is more than one worker), resumes from ``ray.train.get_checkpoint()``
and reports checkpoints that carry the resolved config (safetensors + ``state.json``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
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
from pipeline.core.labels import holdout_roles, random_bits
from pipeline.core.models import NoiseClassifier, build_unet
from pipeline.data.imageset import images_to_tensor
from pipeline.data.provenance import require_same
from pipeline.train.loops import EMA, classifier_metrics, fit_classifier, fit_denoiser, train_log

STATE = "state.json"


# ------------------------------------------------------------------------------------- data helpers
def rows_to_tensors(rows: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """A Ray Data batch of WebDataset rows -> ((B, C, H, W) float in [-1, 1], keys)."""
    images = np.stack([np.asarray(a) for a in rows["png"]])
    if images.ndim == 3:
        images = images[..., None]
    return images_to_tensor(images), [str(k) for k in rows["__key__"]]


def load_shard(name: str) -> tuple[torch.Tensor, list[str]]:
    """Materialise this worker's shard of a dataset (small data: it is iterated once, then cached)."""
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    xs, keys = [], []
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        x, k = rows_to_tensors(batch)
        xs.append(x)
        keys.extend(k)
    if not xs:
        return torch.zeros(0), []
    return torch.cat(xs), keys


def split_holdout(
    x: torch.Tensor, keys: list[str], n_bits: int, rank: int, world: int
) -> tuple[tuple[torch.Tensor, list[str]], tuple[torch.Tensor, list[str]]]:
    """Split the held-out images (every worker holds all of them) by sorted key.

    The first ``n_bits`` keys (at most all but one) are trained on with their own random bits, and
    rank ``r`` of ``world`` takes every ``world``-th of them from ``r``; the rest are never seen and
    measure calibration. Returns ``((x_bits, keys_bits), (x_never, keys_never))``.
    """
    trained, never = holdout_roles(keys, n_bits)
    mine = trained[rank::world]

    def take(idx: list[int]) -> tuple[torch.Tensor, list[str]]:
        if not idx:
            return x[:0], []
        return x[idx], [keys[i] for i in idx]

    return take(mine), take(never)


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
    driver checked the run's record, :func:`pipeline.orchestration.stages.claim_checkpoints`; this
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


def _slow_down(model: torch.nn.Module, seconds: float) -> None:
    """Sleep ``seconds`` before every forward pass: fault-injection tests use it (config key
    ``step_delay_s``) to have time to kill a worker mid-run; never set in normal runs."""
    if seconds > 0:
        import time

        model.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def set_niceness(target: int = 0) -> int:
    """Move this process to niceness ``target`` (or as close as allowed); returns the niceness now.

    Ray starts worker processes at niceness 15 (raylet's ``worker_niceness``; ``init_ray`` sets it to
    0 for private local instances, but a cluster started with ``ray start`` keeps 15) so that its own
    daemons stay responsive. A training worker is the job's main compute, though: at niceness 15 it
    yields the CPU to every ordinary process on the node (bench P5 measures the cost). Lowering
    niceness needs CAP_SYS_NICE (root in a container); without it the worker keeps Ray's value.
    """
    import os

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
    return (
        schedule_from_betas(torch.tensor(config["betas"]))
        if config.get("betas")
        else linear_schedule()
    )


def denoiser_worker(config: dict[str, Any]) -> None:
    """Worker loop: eps-prediction MSE (Ho et al. 2020, eq. 14) with EMA, DDP via ``prepare_model``."""
    import ray.train.torch

    ucfg = from_dict(UNetConfig, config["unet"])
    tcfg = from_dict(DenoiserTrainConfig, config["train"])
    rank, world, device = _worker_setup(config.get("threads", 0), config.get("niceness", 0))
    torch.manual_seed(tcfg.seed)
    unet = build_unet(ucfg).to(device)
    ema = EMA(unet, tcfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=0.0)
    start, history = 0, []
    resumed = _resume(opt, config.get("provenance"))
    if resumed is not None:
        tensors, state = resumed
        unet.load_state_dict(tensors["model"])
        ema.shadow.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], [*state.get("resumed_from", []), state["step"]]
        train_log(rank, f"resumed denoiser from step {start}")
    _slow_down(unet, config.get("step_delay_s", 0.0))
    model = ray.train.torch.prepare_model(unet)
    x_all, _ = load_shard("train")
    state = {
        "kind": "denoiser",
        "unet": config["unet"],
        "train": config["train"],
        "provenance": config.get("provenance"),
        "resumed_from": history,
    }

    def on_checkpoint(step: int, metrics: dict) -> None:
        train_log(
            rank, f"denoiser checkpoint at step {step} ({metrics['images_per_s']:.0f} images/s)"
        )

        def save(d: Path) -> None:
            tensors = {"model": unet.state_dict(), "ema": ema.shadow.state_dict()}
            _save_checkpoint(d, tensors, opt, {**state, "step": step})

        _report(metrics, rank, save)

    fit_denoiser(
        model,
        ema,
        opt,
        _schedule(config),
        x_all.to(device),
        tcfg,
        start,
        world,
        rank,
        on_checkpoint,
        log_every=100,
    )


# --------------------------------------------------------------------------------------- classifier
def classifier_worker(config: dict[str, Any]) -> None:
    """Worker loop: BCE on random bits of noisy images (CPSample, Algorithm 1), plus fit metrics."""
    import ray.train.torch

    acfg = from_dict(ClassifierArchConfig, config["arch"])
    tcfg = from_dict(ClassifierTrainConfig, config["train"])
    rank, world, device = _worker_setup(config.get("threads", 0), config.get("niceness", 0))
    schedule = _schedule(config)
    torch.manual_seed(tcfg.seed)
    clf = NoiseClassifier(acfg).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start, history = 0, []
    resumed = _resume(opt, config.get("provenance"))
    if resumed is not None:
        tensors, state = resumed
        clf.load_state_dict(tensors["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], [*state.get("resumed_from", []), state["step"]]
        train_log(rank, f"resumed classifier from step {start}")
    _slow_down(clf, config.get("step_delay_s", 0.0))
    model = ray.train.torch.prepare_model(clf)
    x_train, k_train = load_shard("train")
    (x_bits, k_bits), (x_never, k_never) = split_holdout(
        *load_shard("holdout"), tcfg.holdout_images, rank, world
    )
    y_train = random_bits(k_train, tcfg.label_seed)
    x_fit = torch.cat([x_train, x_bits]) if k_bits else x_train
    y_fit = torch.cat([y_train, random_bits(k_bits, tcfg.label_seed)]) if k_bits else y_train
    y_never = random_bits(k_never, tcfg.label_seed)
    state = {
        "kind": "classifier",
        "arch": config["arch"],
        "train": config["train"],
        "betas_from": config.get("betas_from"),
        "provenance": config.get("provenance"),
        "schedule": {
            "num_train_timesteps": schedule.num_train_timesteps,
            "beta_first": float(schedule.betas[0]),
            "beta_last": float(schedule.betas[-1]),
        },
        "resumed_from": history,
    }
    x_train, x_never = x_train.to(device), x_never.to(device)

    def on_checkpoint(step: int, metrics: dict) -> None:
        # the fit metrics of rank 0's shard of the training images (Ray keeps rank 0's metrics)
        fit = {}
        if rank == 0:
            fit = classifier_metrics(clf, schedule, x_train, y_train, x_never, y_never).to_dict()
            clf.train()
            train_log(
                rank,
                f"classifier step {step}/{tcfg.steps} loss {metrics['loss']:.4f} "
                f"acc {fit['train_accuracy_by_t']} held-out-bit acc {fit['holdout_accuracy']:.3f} "
                f"lipschitz {fit['lipschitz_proxy']:.3g}",
            )

        def save(d: Path) -> None:
            _save_checkpoint(
                d, {"model": clf.state_dict()}, opt, {**state, "step": step, "metrics": fit}
            )

        _report({**metrics, **fit}, rank, save)

    fit_classifier(
        model,
        opt,
        schedule,
        x_fit.to(device),
        y_fit.to(device),
        len(k_train),
        tcfg,
        start,
        world,
        rank,
        on_checkpoint,
        log_every=200,
    )


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
        "--max-failures", type=int, help="FailureConfig: worker-group restarts (-1: inf)"
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

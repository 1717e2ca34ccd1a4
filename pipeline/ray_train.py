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

from pipeline.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    UNetConfig,
    from_dict,
)
from pipeline.diffusion import linear_schedule, schedule_from_betas
from pipeline.labels import random_bits
from pipeline.models import NoiseClassifier, build_unet
from pipeline.training import EMA, classifier_metrics, fit_classifier, fit_denoiser

STATE = "state.json"


# ------------------------------------------------------------------------------------- data helpers
def rows_to_tensors(rows: dict[str, Any]) -> tuple[torch.Tensor, list[str]]:
    """A Ray Data batch of WebDataset rows -> ((B, C, H, W) float in [-1, 1], keys)."""
    images = np.stack([np.asarray(a) for a in rows["png"]])
    if images.ndim == 3:
        images = images[..., None]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, [str(k) for k in rows["__key__"]]


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


def _resume(optimizer) -> tuple[dict[str, dict[str, torch.Tensor]], dict] | None:
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        tensors, state, path = read_checkpoint(d)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    return tensors, {**state, "optimizer": optimizer_state}


def _worker_setup(threads: int) -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    if threads > 0:
        torch.set_num_threads(threads)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[train] {msg}", flush=True)


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
    rank, world, device = _worker_setup(config.get("threads", 0))
    torch.manual_seed(tcfg.seed)
    unet = build_unet(ucfg).to(device)
    ema = EMA(unet, tcfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, weight_decay=0.0)
    start = 0
    resumed = _resume(opt)
    if resumed is not None:
        tensors, state = resumed
        unet.load_state_dict(tensors["model"])
        ema.shadow.load_state_dict(tensors["ema"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        _log(rank, f"resumed denoiser from step {start}")
    model = ray.train.torch.prepare_model(unet)
    x_all, _ = load_shard("train")
    state = {"kind": "denoiser", "unet": config["unet"], "train": config["train"]}

    def on_checkpoint(step: int, metrics: dict) -> None:
        _log(rank, f"denoiser step {step}/{tcfg.steps} loss {metrics['loss']:.4f}")

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
    rank, world, device = _worker_setup(config.get("threads", 0))
    schedule = _schedule(config)
    torch.manual_seed(tcfg.seed)
    clf = NoiseClassifier(acfg).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    start = 0
    resumed = _resume(opt)
    if resumed is not None:
        tensors, state = resumed
        clf.load_state_dict(tensors["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        _log(rank, f"resumed classifier from step {start}")
    model = ray.train.torch.prepare_model(clf)
    x_train, k_train = load_shard("train")
    x_bits, k_bits = load_shard("holdout_bits")
    x_never, k_never = load_shard("never_seen")
    y_train = random_bits(k_train, tcfg.label_seed)
    x_fit = torch.cat([x_train, x_bits]) if k_bits else x_train
    y_fit = torch.cat([y_train, random_bits(k_bits, tcfg.label_seed)]) if k_bits else y_train
    y_never = random_bits(k_never, tcfg.label_seed)
    state = {"kind": "classifier", "arch": config["arch"], "train": config["train"]}

    def on_checkpoint(step: int, metrics: dict) -> None:
        fit = classifier_metrics(
            clf, schedule, x_train.cpu(), y_train, x_never.cpu(), y_never
        ).to_dict()
        clf.train()
        _log(
            rank,
            f"classifier step {step}/{tcfg.steps} loss {metrics['loss']:.4f} acc {fit['train_accuracy_by_t']}",
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

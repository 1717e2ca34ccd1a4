"""Training steps and metrics for the denoiser and the random-label classifier (Ray-free).

The Ray Train worker loops in :mod:`pipeline.train.workers` call these; so do the benchmarks' plain loops.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.core.diffusion import Schedule, q_sample
from pipeline.core.models import channels_last

T_RANGES: tuple[tuple[int, int], ...] = ((0, 100), (100, 300), (300, 600), (600, 1000))


class EMA:
    """Exponential moving average of parameters, ``theta_ema <- d theta_ema + (1 - d) theta``."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        # Warm-up as in Karras et al.: the effective decay grows with the step count early on.
        d = min(self.decay, (1 + step) / (10 + step))
        for p_ema, p in zip(self.shadow.parameters(), model.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.shadow.buffers(), model.buffers()):
            b_ema.copy_(b)


def lr_at(
    step: int, base_lr: float, warmup: int, schedule: str = "constant", total: int = 0
) -> float:
    """Linear warm-up over ``warmup`` steps, times ``(1 + cos(pi step / total)) / 2`` for "cosine"
    (Loshchilov & Hutter 2017, SGDR without restarts) or 1 for "constant"."""
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup))
    if schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    elif schedule != "constant":
        raise ValueError(f"unknown lr_schedule {schedule!r}; allowed: 'constant', 'cosine'")
    return lr


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (mixed precision); a no-op context on CPU."""
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


def denoiser_loss(
    unet: nn.Module,
    schedule: Schedule,
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``E ||eps - eps_theta(x_t, t)||^2`` at uniform t (Ho et al. 2020, eq. 14, "L_simple")."""
    b = x_start.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(x_start.device)
    noise = torch.randn(x_start.shape, generator=generator).to(x_start.device)
    x_t = q_sample(schedule, x_start, t, noise)
    return nn.functional.mse_loss(unet(channels_last(x_t), t).sample.float(), noise)


def classifier_loss(
    clf: nn.Module,
    schedule: Schedule,
    x_start: torch.Tensor,
    bits: torch.Tensor,
    t_max: int = 1000,
    mixup: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``BCEWithLogits(c_phi(x_t, t), y)`` with ``x_t`` from q_sample at uniform ``t < t_max``.

    ``mixup > 0`` blends pairs of images and their bits with ``lambda ~ Beta(mixup, mixup)`` (Zhang et al.
    2018), which makes the classifier less confident between training points.
    """
    b = x_start.shape[0]
    y = bits.float()
    if mixup > 0:
        # Beta draws through numpy, seeded from `generator`, so mixup runs are reproducible
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        lam = torch.from_numpy(rng.beta(mixup, mixup, size=b)).float().to(x_start.device)
        perm = torch.randperm(b, generator=generator).to(x_start.device)
        x_start = (
            lam[:, None, None, None] * x_start + (1 - lam[:, None, None, None]) * x_start[perm]
        )
        y = lam * y + (1 - lam) * y[perm]
    t = torch.randint(0, t_max, (b,), generator=generator).to(x_start.device)
    noise = torch.randn(x_start.shape, generator=generator).to(x_start.device)
    logits = clf(q_sample(schedule, x_start, t, noise), t)
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), y)


@dataclass
class ClassifierMetrics:
    """Random-label fit and calibration (keys are stable; they go into report.json)."""

    train_accuracy_by_t: dict[str, float]  # "0-100" -> accuracy on training images' bits
    holdout_accuracy: float  # accuracy on bits of images never seen in training (~0.5 expected)
    never_seen_confident_fraction: (
        float  # share of never-seen images with p<0.001 or p>0.999 at t<50
    )
    lipschitz_proxy: float  # mean ||d logit / d x|| at training points, t < 100

    def to_dict(self) -> dict:
        return {
            "train_accuracy_by_t": self.train_accuracy_by_t,
            "holdout_accuracy": self.holdout_accuracy,
            "never_seen_confident_fraction": self.never_seen_confident_fraction,
            "lipschitz_proxy": self.lipschitz_proxy,
        }


def _noisy_logits(clf, schedule, x, lo, hi, gen, repeats=4):
    """Logits of ``repeats`` noisy copies of each image at t ~ U[lo, hi); returns ((R*N,), t)."""
    xs = x.repeat(repeats, 1, 1, 1)
    t = torch.randint(lo, hi, (xs.shape[0],), generator=gen).to(x.device)
    noise = torch.randn(xs.shape, generator=gen).to(x.device)
    with torch.no_grad():
        return clf(q_sample(schedule, xs, t, noise), t).float().cpu(), t


def classifier_metrics(
    clf: nn.Module,
    schedule: Schedule,
    train_x: torch.Tensor,
    train_bits: torch.Tensor,
    never_x: torch.Tensor,
    never_bits: torch.Tensor,
    seed: int = 0,
) -> ClassifierMetrics:
    """Accuracy by t-range on training bits, held-out bit accuracy, calibration and Lipschitz proxy."""
    gen = torch.Generator().manual_seed(seed)
    clf = clf.eval()
    by_t = {}
    for lo, hi in T_RANGES:
        logits, _ = _noisy_logits(clf, schedule, train_x, lo, hi, gen)
        y = train_bits.repeat(4)
        by_t[f"{lo}-{hi}"] = float(((logits > 0).float() == y).float().mean())
    if len(never_x):
        logits, _ = _noisy_logits(clf, schedule, never_x, 0, 100, gen)
        holdout_acc = float(((logits > 0).float() == never_bits.repeat(4)).float().mean())
        small, _ = _noisy_logits(clf, schedule, never_x, 0, 50, gen, repeats=1)
        p = torch.sigmoid(small)
        confident = float(((p < 1e-3) | (p > 1 - 1e-3)).float().mean())
    else:
        holdout_acc, confident = math.nan, math.nan
    x = train_x.clone().requires_grad_(True)
    t = torch.randint(0, 100, (x.shape[0],), generator=gen).to(x.device)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(clf(x, t).sum(), x)
    lip = float(grad.flatten(1).norm(dim=1).mean())
    return ClassifierMetrics(by_t, holdout_acc, confident, lip)


def fit_denoiser(
    model: nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    schedule: Schedule,
    x_all: torch.Tensor,
    cfg,
    start: int = 0,
    world: int = 1,
    rank: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    log_every: int = 0,
) -> None:
    """The denoiser loop from ``start`` to ``cfg.steps``; ``on_checkpoint(step, metrics)`` at intervals.

    ``model`` may be DDP-wrapped; ``ema`` tracks the underlying module. Batches are sampled with
    replacement from the in-memory shard ``x_all`` (B, C, H, W).
    """
    from tqdm.auto import tqdm

    per_worker = max(1, cfg.batch_size // world)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + start)
    base = model.module if hasattr(model, "module") else model
    device = x_all.device
    losses, t0 = [], time.time()
    for step in tqdm(
        range(start, cfg.steps),
        desc="denoiser",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    ):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        idx = torch.randint(0, len(x_all), (per_worker,), generator=gen)
        with autocast(device, cfg.mixed_precision):
            loss = denoiser_loss(model, schedule, x_all[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(base, step)
        losses.append(float(loss.detach()))
        done = step + 1
        _log_progress("denoiser", done, cfg.steps, losses, log_every, rank)
        if on_checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            rate = per_worker * world * len(losses) / max(time.time() - t0, 1e-9)
            on_checkpoint(
                done, {"step": done, "loss": sum(losses) / len(losses), "images_per_s": rate}
            )
            losses, t0 = [], time.time()


def train_log(rank: int, msg: str) -> None:
    """One ``[train]`` line from rank 0, written to the process's own stdout (which Ray streams to the
    driver). Ray Train V2 patches ``print`` in its workers and, when ``sys.stdout`` is wrapped, sends
    each line both to its logger and to the stream, so a plain ``print`` would show up twice."""
    if rank == 0:
        print(f"[train] {msg}", file=sys.__stdout__, flush=True)


def _log_progress(
    name: str, done: int, total: int, losses: list[float], every: int, rank: int
) -> None:
    """A progress line every ``every`` steps from rank 0."""
    if every > 0 and done % every == 0:
        recent = losses[-every:]
        train_log(
            rank, f"{name} {done}/{total} ({done / total:.0%}) loss {sum(recent) / len(recent):.4f}"
        )


def classifier_batch(
    n_train: int, n_fit: int, size: int, train_fraction: float, gen
) -> torch.Tensor:
    """Indices into [train images | held-out bit images]; ``train_fraction`` of each batch is training.

    ``train_fraction <= 0`` samples the union uniformly. Oversampling the (few) training images makes
    the classifier fit their bits at every t without starving the held-out calibration set.
    """
    if train_fraction <= 0 or n_fit == n_train:
        return torch.randint(0, n_fit, (size,), generator=gen)
    k = max(1, round(size * train_fraction))
    a = torch.randint(0, n_train, (k,), generator=gen)
    b = torch.randint(n_train, n_fit, (size - k,), generator=gen)
    return torch.cat([a, b])


def fit_classifier(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: Schedule,
    x_fit: torch.Tensor,
    y_fit: torch.Tensor,
    n_train: int,
    cfg,
    start: int = 0,
    world: int = 1,
    rank: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    log_every: int = 0,
) -> None:
    """The classifier loop: BCE on random bits at uniform t, learning rate from :func:`lr_at`.

    ``x_fit`` is [training images | held-out images with their own bits]; the first ``n_train`` rows are
    the training images.
    """
    from tqdm.auto import tqdm

    per_worker = max(1, cfg.batch_size // world)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank * 7919 + start)
    device = x_fit.device
    losses = []
    for step in tqdm(
        range(start, cfg.steps),
        desc="classifier",
        disable=not progress,
        initial=start,
        total=cfg.steps,
    ):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        idx = classifier_batch(n_train, len(x_fit), per_worker, cfg.train_fraction, gen)
        with autocast(device, cfg.mixed_precision):
            loss = classifier_loss(
                model, schedule, x_fit[idx], y_fit[idx], cfg.t_max, cfg.mixup, gen
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        _log_progress("classifier", done, cfg.steps, losses, log_every, rank)
        if on_checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            on_checkpoint(done, {"step": done, "loss": sum(losses) / len(losses)})
            losses = []

"""Training steps and metrics for the denoiser and the random-label classifier (Ray-free).

The Ray Train worker loops in :mod:`pipeline.train.workers` call these; so do the benchmarks' plain loops.
The loops are step-driven and read their data as row sources (:mod:`pipeline.train.ingest`): a Ray Data
stream, a cached shard or in-memory tensors, consumed epoch by epoch in exact per-worker batches.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.core.config import MIN_FIT
from pipeline.core.diffusion import Schedule, q_sample
from pipeline.core.models import channels_last
from pipeline.train.batches import batch_bits, batch_images, batch_pooled
from pipeline.train.device import (
    LossWindows,
    Prefetch,
    beta_symmetric,
    draw_device,
    schedule_on,
    step_generator,
)
from pipeline.train.ingest import EpochBatches, MemoryRows

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
    """``E ||eps - eps_theta(x_t, t)||^2`` at uniform t (Ho et al. 2020, eq. 14, "L_simple").

    ``t`` and ``eps`` are drawn from ``generator`` on its own device (a CUDA generator: no copy)."""
    b, dev = x_start.shape[0], draw_device(generator, x_start)
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator, device=dev)
    noise = torch.randn(x_start.shape, generator=generator, device=dev).to(x_start.device)
    t = t.to(x_start.device)
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
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """``BCEWithLogits(c_phi(x_t, t), y)`` with ``x_t`` from q_sample at uniform ``t < t_max``.

    ``mixup > 0`` blends pairs of images and their bits with ``lambda ~ Beta(mixup, mixup)`` (Zhang et al.
    2018), which makes the classifier less confident between training points. ``cond``: (B, D) pooled
    text embeddings for a text-conditioned classifier, ``c_phi(x_t, t, cond)`` (blended alike).
    Every draw (lambda by :func:`beta_symmetric`, the pairing, t, eps) comes from ``generator`` on
    its own device, so a CUDA step needs no host round trip.
    """
    b, dev = x_start.shape[0], draw_device(generator, x_start)
    y = bits.float()
    if mixup > 0:
        lam = beta_symmetric(mixup, b, generator, dev).to(x_start.device)
        perm = torch.randperm(b, generator=generator, device=dev).to(x_start.device)
        x_start = (
            lam[:, None, None, None] * x_start + (1 - lam[:, None, None, None]) * x_start[perm]
        )
        y = lam * y + (1 - lam) * y[perm]
        if cond is not None:
            cond = lam[:, None] * cond + (1 - lam[:, None]) * cond[perm]
    t = torch.randint(0, t_max, (b,), generator=generator, device=dev).to(x_start.device)
    noise = torch.randn(x_start.shape, generator=generator, device=dev).to(x_start.device)
    args = () if cond is None else (cond,)
    logits = clf(q_sample(schedule, x_start, t, noise), t, *args)
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
    train_margin_by_t: dict[str, float]  # "0-100" -> mean |p - 1/2| on training images
    train_rows: int  # training images measured (4 noisings each per t-range)
    never_rows: int  # never-seen images measured

    def to_dict(self) -> dict:
        return asdict(self)


# the classifier's model card measures its fit here: where guidance decides what a sample becomes
FIT_T_RANGE = T_RANGES[0]
CONFIDENT_P = 1e-3  # never-seen "confident": p < 1e-3 or p > 1 - 1e-3, at t < 50


def fit_card(metrics: ClassifierMetrics, seed: int, step: int, threshold: float = MIN_FIT) -> dict:
    """The classifier's model card (``fit`` in its config.json; DESIGN.md section 10): its accuracy on
    its own training bits and mean |p - 1/2| at ``FIT_T_RANGE`` (``metrics.train_rows`` rows, 4
    noisings each, drawn with ``seed``), its confident fraction on never-seen images, and the
    ``threshold`` (``SamplerConfig.min_fit``'s default) that sampling judges the accuracy against."""
    lo, hi = FIT_T_RANGE
    key = f"{lo}-{hi}"
    accuracy = metrics.train_accuracy_by_t[key]
    return {
        "accuracy": accuracy,
        "mean_margin": metrics.train_margin_by_t[key],
        "t_range": [lo, hi],
        "rows": metrics.train_rows,
        "draws": 4,
        "seed": seed,
        "step": step,
        "threshold": threshold,
        "fits": accuracy >= threshold,
        "never_seen": {
            "rows": metrics.never_rows,
            "t_range": [0, 50],
            "confident_fraction": metrics.never_seen_confident_fraction,
            "confident_p": CONFIDENT_P,
        },
    }


def _noisy_logits(clf, schedule, x, lo, hi, gen, repeats=4, batch_size=256, cond=None):
    """Logits of ``repeats`` noisy copies of each image at t ~ U[lo, hi); returns ((R*N,), t).

    The copies are in ``x.repeat(repeats, 1, 1, 1)`` order and run in forward passes of at most
    ``batch_size`` images without autograd, so memory is bounded whatever ``len(x)``. ``cond``:
    (N, D) pooled text embeddings of the images, for a text-conditioned classifier."""
    n = len(x)
    logits, ts = [], []
    for s in range(0, repeats * n, batch_size):
        idx = torch.arange(s, min(s + batch_size, repeats * n)) % n
        xb = x[idx.to(x.device)]
        t = torch.randint(lo, hi, (len(idx),), generator=gen).to(x.device)
        noise = torch.randn(xb.shape, generator=gen).to(x.device)
        args = () if cond is None else (cond[idx.to(cond.device)],)
        with torch.no_grad():
            logits.append(clf(q_sample(schedule, xb, t, noise), t, *args).float().cpu())
        ts.append(t.cpu())
    if not logits:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(ts)


def classifier_metrics(
    clf: nn.Module,
    schedule: Schedule,
    train_x: torch.Tensor,
    train_bits: torch.Tensor,
    never_x: torch.Tensor,
    never_bits: torch.Tensor,
    seed: int = 0,
    batch_size: int = 256,
    train_cond: torch.Tensor | None = None,
    never_cond: torch.Tensor | None = None,
) -> ClassifierMetrics:
    """Accuracy and mean |p - 1/2| by t-range on training bits, held-out bit accuracy, calibration
    and Lipschitz proxy.

    Callers pass bounded samples (the workers: ``metrics_samples`` rows); every forward pass holds at
    most ``batch_size`` images, and the Lipschitz proxy ``mean ||d logit / d x||`` keeps the autograd
    graph of one batch at a time. ``train_cond``/``never_cond``: the images' pooled text embeddings
    for a text-conditioned classifier (None: unconditioned)."""
    gen = torch.Generator().manual_seed(seed)
    clf = clf.eval()
    by_t, margin_by_t = {}, {}
    for lo, hi in T_RANGES:
        logits, _ = _noisy_logits(
            clf, schedule, train_x, lo, hi, gen, batch_size=batch_size, cond=train_cond
        )
        y = train_bits.repeat(4)
        by_t[f"{lo}-{hi}"] = float(((logits > 0).float() == y).float().mean())
        margin_by_t[f"{lo}-{hi}"] = float((torch.sigmoid(logits) - 0.5).abs().mean())
    if len(never_x):
        logits, _ = _noisy_logits(
            clf, schedule, never_x, 0, 100, gen, batch_size=batch_size, cond=never_cond
        )
        holdout_acc = float(((logits > 0).float() == never_bits.repeat(4)).float().mean())
        small, _ = _noisy_logits(
            clf, schedule, never_x, 0, 50, gen, repeats=1, batch_size=batch_size, cond=never_cond
        )
        p = torch.sigmoid(small)
        confident = float(((p < CONFIDENT_P) | (p > 1 - CONFIDENT_P)).float().mean())
    else:
        holdout_acc, confident = math.nan, math.nan
    norms = []
    for s in range(0, len(train_x), batch_size):
        x = train_x[s : s + batch_size].detach().clone().requires_grad_(True)
        t = torch.randint(0, 100, (x.shape[0],), generator=gen).to(x.device)
        args = () if train_cond is None else (train_cond[s : s + batch_size],)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(clf(x, t, *args).sum(), x)
        norms.append(grad.flatten(1).norm(dim=1).cpu())
    lip = float(torch.cat(norms).mean()) if norms else math.nan
    return ClassifierMetrics(
        by_t, holdout_acc, confident, lip, margin_by_t, len(train_x), len(never_x)
    )


def _source(data, seed: int, rank: int, stream: int = 0):
    """A row source (:mod:`pipeline.train.ingest`) of ``data``: tensors become :class:`MemoryRows`."""
    if isinstance(data, torch.Tensor):
        return MemoryRows({"x": data}, seed, rank, stream)
    if isinstance(data, dict):
        return MemoryRows(data, seed, rank, stream)
    return data


def _batches(source, size: int, position: dict | None) -> EpochBatches:
    pos = position or {}
    return EpochBatches(source, size, pos.get("epoch", 0), pos.get("offset", 0))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _steps(name: str, start: int, total: int, progress: bool):
    """Steps ``start .. total - 1``, with a tqdm bar when ``progress``."""
    from tqdm.auto import tqdm

    return tqdm(range(start, total), desc=name, disable=not progress, initial=start, total=total)


def fit_denoiser(
    model: nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    schedule: Schedule,
    data,
    cfg,
    start: int = 0,
    world: int = 1,
    rank: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    log_every: int = 0,
    position: dict | None = None,
) -> dict:
    """The denoiser loop from ``start`` to ``cfg.steps``; ``on_checkpoint(step, metrics)`` at intervals.

    Minimises ``E ||eps - eps_theta(x_t, t)||^2`` (Ho et al. 2020, eq. 14) on batches of exactly
    ``cfg.batch_size // world`` rows: consecutive epochs of ``data`` (a row source of
    :mod:`pipeline.train.ingest`, or a (B, C, H, W) tensor held in memory), each in a seeded
    ``(cfg.seed, epoch, rank)`` order without replacement. The loop is step-driven, so every rank runs
    the same number of steps whatever its shard size. ``position`` (``{"train": {"epoch",
    "offset"}}`` from a checkpoint) resumes inside an epoch. ``model`` may be DDP-wrapped; ``ema``
    tracks the underlying module. The metrics carry ``"data"``: ``{"train": EpochBatches.state()}``
    after the last batch trained on, which is also returned. On CUDA the step never syncs the host:
    draws on the device (:func:`step_generator`), batches copied :data:`PREFETCH` ahead, the loss
    read back only at log and checkpoint steps (:mod:`pipeline.train.device`).
    """
    per_worker = max(1, cfg.batch_size // world)
    base = model.module if hasattr(model, "module") else model
    device = _device(base)
    gen, schedule = step_generator(cfg.seed, rank, start, device), schedule_on(schedule, device)
    batches = _batches(_source(data, cfg.seed, rank), per_worker, (position or {}).get("train"))
    feed = Prefetch(
        lambda: (batch_images(batches.next(), device), batches.state()), cfg.steps - start
    )
    losses, state, t0 = LossWindows(device, "log", "checkpoint"), batches.state(), time.time()
    for step in _steps("denoiser", start, cfg.steps, progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        x, state = feed.next()
        with autocast(device, cfg.mixed_precision):
            loss = denoiser_loss(model, schedule, x, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update(base, step)
        losses.add(loss)
        done = step + 1
        _log_progress("denoiser", done, cfg.steps, losses, log_every, rank)
        if on_checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            n, mean = losses.count("checkpoint"), losses.mean("checkpoint")  # syncs: then time
            rate = per_worker * world * n / max(time.time() - t0, 1e-9)
            on_checkpoint(
                done,
                {"step": done, "loss": mean, "images_per_s": rate, "data": {"train": state}},
            )
            t0 = time.time()
    return {"train": state}


def train_log(rank: int, msg: str) -> None:
    """One ``[train]`` line from rank 0, written to the process's own stdout (which Ray streams to the
    driver). Ray Train V2 patches ``print`` in its workers and, when ``sys.stdout`` is wrapped, sends
    each line both to its logger and to the stream, so a plain ``print`` would show up twice."""
    if rank == 0:
        print(f"[train] {msg}", file=sys.__stdout__, flush=True)


def _log_progress(
    name: str, done: int, total: int, losses: LossWindows, every: int, rank: int
) -> None:
    """A progress line every ``every`` steps from rank 0: the mean loss of the ``every`` steps
    before (the window "log", read back from the device here and only here)."""
    if every > 0 and done % every == 0 and rank == 0:
        mean = losses.mean("log")
        train_log(rank, f"{name} {done}/{total} ({done / total:.0%}) loss {mean:.4f}")


def mix_sizes(size: int, train_fraction: float, n_train: int, n_bits: int) -> tuple[int, int]:
    """(training rows, held-out bit rows) of a batch of ``size``: ``train_fraction`` of it training
    rows (at least one), or, with ``train_fraction <= 0``, their share ``n_train / (n_train + n_bits)``
    of the two splits' counts. No bit rows when there are none. Oversampling the (few) training
    images makes the classifier fit their bits at every t without starving the held-out calibration
    set."""
    if n_bits <= 0:
        return size, 0
    share = train_fraction if train_fraction > 0 else n_train / max(1, n_train + n_bits)
    k = min(size, max(1, round(size * share)))
    return k, size - k


def fit_classifier(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    schedule: Schedule,
    train,
    bits,
    n_train: int | None,
    cfg,
    start: int = 0,
    world: int = 1,
    rank: int = 0,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    log_every: int = 0,
    position: dict | None = None,
    label_of: dict[str, str] | None = None,
) -> dict:
    """The classifier loop: ``BCEWithLogits(c_phi(x_t, t), y)`` on random bits at uniform ``t <
    t_max`` (CPSample, Algorithm 1), learning rate from :func:`lr_at`.

    ``train`` and ``bits`` are row sources (:mod:`pipeline.train.ingest`; rows with ``"key"`` and
    ``"image"`` or ``"latent"`` get their bits from :func:`random_bits` with ``cfg.label_seed``, and
    from their near-duplicate cluster's id where ``label_of`` names one; a text-conditioned model,
    ``config.cond_dim > 0``, also gets their ``"pooled"`` embeddings) of the training
    images and of the held-out images trained on with their own bits (None: none); ``n_train`` is then
    unused. Tensors work too: ``train`` = ``x_fit`` [training images | held-out bit images],
    ``bits`` = ``y_fit``, and the first ``n_train`` rows are the training images. Each step takes
    exactly ``cfg.batch_size // world`` rows, split by :func:`mix_sizes` between the two sources,
    each consumed epoch after epoch in a seeded order without replacement (as in
    :func:`fit_denoiser`, including ``position`` for a resume). The metrics carry ``"data"``:
    ``{"train": ..., "bits": ...}`` (:meth:`EpochBatches.state`), which is also returned.
    """
    if isinstance(train, torch.Tensor):
        x_fit, y_fit = train, bits
        n = len(x_fit) if n_train is None else n_train
        train = {"x": x_fit[:n], "y": y_fit[:n]}
        bits = {"x": x_fit[n:], "y": y_fit[n:]} if len(x_fit) > n else None
    train = _source(train, cfg.seed, rank, 0)
    bits = _source(bits, cfg.seed, rank, 1) if bits is not None else None
    per_worker = max(1, cfg.batch_size // world)
    n_rows = train.size or 1  # a size the source does not know weighs as much as the other
    n_bits = 0 if bits is None else (bits.size if bits.size is not None else n_rows)
    k_train, k_bits = mix_sizes(per_worker, cfg.train_fraction, n_rows, n_bits)
    pos = position or {}
    streams = {"train": _batches(train, k_train, pos.get("train"))}
    if bits is not None and k_bits:
        streams["bits"] = _batches(bits, k_bits, pos.get("bits"))
    device = _device(model)
    gen, schedule = step_generator(cfg.seed, rank, start, device), schedule_on(schedule, device)
    arch = getattr(getattr(model, "module", model), "config", None)  # DDP wraps the classifier
    text = getattr(arch, "cond_dim", 0) > 0  # c_phi(x_t, t, pooled)

    def make() -> tuple[tuple, dict]:  # one step's (x, y, cond) on the device, and the position
        parts = [b.next() for b in streams.values()]
        x = torch.cat([batch_images(p, device) for p in parts])
        y = torch.cat([batch_bits(p, cfg.label_seed, device, label_of) for p in parts])
        c = torch.cat([batch_pooled(p, device) for p in parts]) if text else None
        return (x, y, c), {k: b.state() for k, b in streams.items()}

    feed = Prefetch(make, cfg.steps - start)
    losses = LossWindows(device, "log", "checkpoint")
    state = {k: b.state() for k, b in streams.items()}
    for step in _steps("classifier", start, cfg.steps, progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)
        (x, y, c), state = feed.next()
        with autocast(device, cfg.mixed_precision):
            loss = classifier_loss(model, schedule, x, y, cfg.t_max, cfg.mixup, gen, c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.add(loss)
        done = step + 1
        _log_progress("classifier", done, cfg.steps, losses, log_every, rank)
        if on_checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            on_checkpoint(done, {"step": done, "loss": losses.mean("checkpoint"), "data": state})
    return state

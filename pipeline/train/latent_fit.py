"""Training loops of a small latent text-to-image model, the VAE then the UNet (Ray-free).

The latent demo trains a :mod:`pipeline.core.latent_build` model from scratch on CPU: first the
``AutoencoderKL`` (it stands in for a public pretrained autoencoder, so it is fitted on held-out
images, not the private ones), then the ``UNet2DConditionModel`` on the private images' latents
``z = f * mean(q(z | x))`` with their captions' frozen text embeddings. Both loops draw seeded
batches from in-memory tensors, epoch by epoch without replacement, and return a metrics dict.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.core.diffusion import Schedule, q_sample
from pipeline.train.loops import EMA, lr_at


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_fit_args(steps: int, batch_size: int, lr: float) -> None:
    for name, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        _require(value > 0, f"{name} must be > 0, got {value}")


def _epoch_batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless (b,) index batches: consecutive seeded permutations of ``range(n)``, each batch of
    exactly ``min(batch_size, n)`` rows (an epoch's tail is carried into the next epoch)."""
    size, pending = min(batch_size, n), torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        yield pending[:size]
        pending = pending[size:]


def _recent(losses: list[float], fraction: float = 0.1) -> float:
    """Mean of the last ``fraction`` of ``losses`` (at least one)."""
    k = max(1, math.ceil(len(losses) * fraction))
    return sum(losses[-k:]) / k


def _summary(losses: list[float], t0: float) -> dict[str, Any]:
    """The keys both loops report: ``steps``, ``seconds``, ``loss_first``, ``loss_last``."""
    seconds = round(time.perf_counter() - t0, 2)
    first, last = _recent(losses[::-1]), _recent(losses)
    return {"steps": len(losses), "seconds": seconds, "loss_first": first, "loss_last": last}


def _update(opt: torch.optim.Optimizer, module: nn.Module, loss: torch.Tensor) -> None:
    """One Adam step on ``loss`` with the gradient norm clipped at 1 (as the pixel denoiser's)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(module.parameters(), 1.0)
    opt.step()


@torch.no_grad()
def _posterior_means(vae: Any, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``mean(q(z | x))`` (N, C, h, w), unscaled, in batches of ``batch_size``."""
    return torch.cat([vae.encode(x).latent_dist.mean for x in images.split(batch_size)])


@torch.no_grad()
def vae_reconstruction(vae: Any, images: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """How well ``D(mean(q(z | x)))`` reproduces ``images`` in [-1, 1] (B, C, H, W).

    Keys: ``mse`` (per pixel), ``psnr`` (dB, peak-to-peak 2), ``min_cosine``, ``mean_cosine`` (of
    reconstruction and original, both less the images' mean image: the replica check's embedding,
    which a sample that copies a training latent exactly scores against its training image).
    """
    vae.eval()
    mu = _posterior_means(vae, images, batch_size)
    recon = torch.cat([vae.decode(z).sample for z in mu.split(batch_size)]).clamp(-1, 1)
    mse = float(((recon - images) ** 2).mean())
    mean = images.mean(0, keepdim=True)
    cos = nn.functional.cosine_similarity((recon - mean).flatten(1), (images - mean).flatten(1))
    psnr = 10 * math.log10(4.0 / max(mse, 1e-12))
    return {
        "mse": mse,
        "psnr": psnr,
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


def fit_vae(
    vae: Any,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    progress: bool = True,
    set_scaling_factor: bool = True,
) -> dict[str, Any]:
    """Fit a diffusers ``AutoencoderKL`` to ``images`` (N, C, H, W) in [-1, 1]; returns metrics.

    Minimises the negative ELBO of Kingma & Welling 2014 (eq. 10, with a Gaussian decoder of fixed
    variance and a reweighted KL, as Rombach et al. 2022 train their KL-f autoencoders):

        L = mean_pixels ||x - D(z)||^2 + kl_weight * mean_latents KL(q(z | x) || N(0, I)),
        z = mu(x) + sigma(x) * e,  e ~ N(0, I)   (reparameterisation)

    by Adam, warm-up over 5% of the steps, gradient norm clipped at 1. ``set_scaling_factor`` then
    writes ``scaling_factor = 1 / std(mean(q(z | x)))`` over ``images`` into ``vae.config``
    (Rombach et al. 2022, sec. G: unit-variance latents for the UNet), which ``encode_images`` and
    ``decode_latents`` read through ``LatentModel.scaling_factor``. The VAE is left in eval mode.

    Keys: ``steps``, ``seconds``, ``loss_first`` / ``loss_last`` (mean of the first / last 10% of
    steps), ``kl`` (last 10%), ``scaling_factor``, ``recon`` (:func:`vae_reconstruction`).
    """
    _check_fit_args(steps, batch_size, lr)
    _require(kl_weight >= 0, f"kl_weight must be >= 0, got {kl_weight}")
    c, shape = int(vae.config.in_channels), tuple(images.shape)
    ok = images.ndim == 4 and images.shape[1] == c and len(images) > 0
    _require(ok, f"images must be (N, {c}, H, W) for this VAE, got {shape}")
    ok = float(images.min()) >= -1.001 and float(images.max()) <= 1.001
    _require(ok, "images must be scaled to [-1, 1] (images_to_tensor does this)")
    images = images.float()
    gen = torch.Generator().manual_seed(seed)
    batches = _epoch_batches(len(images), batch_size, gen)
    vae.requires_grad_(True)  # a VAE loaded for inference has its gradients off
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    losses, kls, t0 = [], [], time.perf_counter()
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, max(1, steps // 20))
        x = images[next(batches)]  # (b, C, H, W)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = posterior.kl() / posterior.mean[0].numel()  # (b,) per latent element
        loss = nn.functional.mse_loss(recon, x) + kl_weight * kl.mean()
        _update(opt, vae, loss)
        losses.append(float(loss.detach()))
        kls.append(float(kl.mean().detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{_recent(losses):.4f}", refresh=False)
    vae.eval()
    if set_scaling_factor:
        std = _posterior_means(vae, images).std().clamp_min(1e-6)
        vae.register_to_config(scaling_factor=float(1.0 / std))
    return {
        **_summary(losses, t0),
        "kl": _recent(kls),
        "scaling_factor": float(vae.config.scaling_factor),
        "recon": vae_reconstruction(vae, images),
    }


def _check_unet_inputs(unet, latents, text_hidden, empty_hidden, cond_dropout, ema_decay) -> None:
    _require(0.0 <= cond_dropout <= 1.0, f"cond_dropout must be in [0, 1], got {cond_dropout}")
    ok = cond_dropout == 0 or empty_hidden is not None
    _require(ok, "cond_dropout > 0 needs empty_hidden, the empty prompt's embedding")
    ok = ema_decay is None or 0.0 < ema_decay < 1.0
    _require(ok, f"ema_decay must be in (0, 1) or None, got {ema_decay}")
    c, d = int(unet.config.in_channels), int(unet.config.cross_attention_dim)
    ok = latents.ndim == 4 and latents.shape[1] == c and len(latents) > 0
    _require(ok, f"latents must be (N, {c}, h, w) for the UNet, got {tuple(latents.shape)}")
    n, shape = len(latents), tuple(text_hidden.shape)
    ok = text_hidden.ndim == 3 and shape[0] == n and shape[2] == d
    _require(ok, f"text_hidden must be (N={n}, L, {d}), one caption per latent, got {shape}")
    ok = empty_hidden is None or tuple(empty_hidden.shape[-2:]) == shape[1:]
    _require(ok, f"empty_hidden must be (1, L, D) = (1, {shape[1]}, {d}) like one caption's")


def fit_latent_unet(
    unet: Any,
    schedule: Schedule,
    latents: torch.Tensor,
    text_hidden: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    cond_dropout: float,
    seed: int,
    ema_decay: float | None = None,
    progress: bool = True,
    empty_hidden: torch.Tensor | None = None,
    warmup_steps: int = 50,
    lr_schedule: str = "constant",
) -> dict[str, Any]:
    """Fit a diffusers ``UNet2DConditionModel`` to predict the noise of text-conditioned latents.

    ``latents`` (N, C, h, w) are ``f * mean(q(z | x))`` of the training images and ``text_hidden``
    (N, L, D) the text encoder's last hidden states of their captions (the encoder itself is frozen
    and never seen here). The loss is Ho et al. 2020's eq. 14 ("L_simple") with the caption as the
    UNet's cross-attention context:

        E_{t ~ U[0, T), eps ~ N(0, I)} || eps - eps_theta(z_t, t, c) ||^2,
        z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps   (Ho et al. 2020, eq. 4)

    where ``c`` is replaced by the empty prompt's embedding ``empty_hidden`` (1, L, D) with
    probability ``cond_dropout`` per row (Ho & Salimans 2022, Algorithm 1), so one network gives
    both terms of classifier-free guidance. Adam with :func:`pipeline.train.loops.lr_at`, gradient
    norm clipped at 1. With ``ema_decay`` an :class:`pipeline.train.loops.EMA` of the weights is
    kept and copied into ``unet`` at the end. The UNet is left in eval mode.

    Keys: ``steps``, ``seconds``, ``loss_first`` / ``loss_last`` (mean of the first / last 10% of
    steps), ``dropped_fraction`` (share of rows trained unconditionally), ``ema_decay``.
    """
    _check_fit_args(steps, batch_size, lr)
    _check_unet_inputs(unet, latents, text_hidden, empty_hidden, cond_dropout, ema_decay)
    latents, text_hidden = latents.float(), text_hidden.float()
    empty = None if empty_hidden is None else empty_hidden.float().reshape(text_hidden.shape[1:])
    gen = torch.Generator().manual_seed(seed)
    batches = _epoch_batches(len(latents), batch_size, gen)
    unet.requires_grad_(True)  # a UNet loaded for inference has its gradients off
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    ema = EMA(unet, ema_decay) if ema_decay is not None else None
    unet.train()
    losses, dropped, rows, t0 = [], 0, 0, time.perf_counter()
    bar = tqdm(range(steps), desc="latent unet", disable=not progress)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr, warmup_steps, lr_schedule, steps)
        idx = next(batches)
        z0, ctx = latents[idx], text_hidden[idx]  # (b, C, h, w), (b, L, D)
        t = torch.randint(0, schedule.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        drop = torch.rand(len(idx), generator=gen) < cond_dropout  # (b,)
        if empty is not None and bool(drop.any()):
            ctx = torch.where(drop[:, None, None], empty.expand_as(ctx), ctx)
        pred = unet(q_sample(schedule, z0, t, noise), t, encoder_hidden_states=ctx).sample
        loss = nn.functional.mse_loss(pred.float(), noise)
        _update(opt, unet, loss)
        if ema is not None:
            ema.update(unet, step)
        losses.append(float(loss.detach()))
        dropped, rows = dropped + int(drop.sum()), rows + len(idx)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{_recent(losses):.4f}", refresh=False)
    if ema is not None:
        unet.load_state_dict(ema.shadow.state_dict())
    unet.eval()
    return {
        **_summary(losses, t0),
        "dropped_fraction": dropped / max(1, rows),
        "ema_decay": ema_decay,
    }

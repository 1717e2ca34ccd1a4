"""P1: CPSample ÷ plain DDIM wall time on the demo architecture: same model, steps, batch and seeds.

The two samplers are run interleaved (DDIM, CPSample, DDIM, ...) and the ratio of the medians is
reported, so drift of the machine affects both alike. The ratio is for the default sampler (alpha 0.5,
guidance at t < 600: a classifier forward and backward on 60% of the steps); the worst case, guiding at
every step, is a detail.

Where the time goes: the denoiser forward, the classifier forward and its input-gradient backward are
also timed alone on the same batch, giving the floor ``1 + fired * (classifier fwd + bwd) / denoiser fwd``
(at alpha 0.5 every guided sample fires, so the gating forward is the one the backward reuses).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from pipeline.core.config import ClassifierArchConfig, SamplerConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import (
    NoiseClassifier,
    build_unet,
    load_classifier,
    load_denoiser,
    load_schedule,
    num_parameters,
    unet_image_shape,
)
from pipeline.core.sampler import sample, unet_denoiser


def _models(model_dir: str | None):
    if model_dir and (Path(model_dir) / "denoiser").is_dir():
        unet = load_denoiser(Path(model_dir) / "denoiser")
        clf = load_classifier(Path(model_dir) / "classifier", unet_image_shape(unet))
        return unet, clf, load_schedule(Path(model_dir) / "denoiser"), "trained demo model"
    torch.manual_seed(0)
    return (
        build_unet(UNetConfig()).eval(),
        NoiseClassifier(ClassifierArchConfig()).eval(),
        linear_schedule(),
        "demo architecture, random weights",
    )


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(unet, clf, shape, batch: int, repeats: int = 10) -> dict[str, float]:
    """Seconds per call, on one batch at t = 300: denoiser forward, classifier forward with the graph
    kept, and the classifier's input-gradient backward (``autograd.grad`` of the summed logits)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen)
    t = torch.full((batch,), 300, dtype=torch.long)
    den = unet_denoiser(unet)
    with torch.no_grad():
        den_s = _median_s(lambda: den(x, t), repeats)

    def forward():
        xg = x.detach().requires_grad_(True)
        return xg, clf(xg, t)

    def forward_backward():
        xg, logits = forward()
        torch.autograd.grad(logits.sum(), xg)

    fwd_s = _median_s(forward, repeats)
    fwd_bwd_s = _median_s(forward_backward, repeats)
    return {
        "denoiser_forward_s": den_s,
        "classifier_forward_s": fwd_s,
        "classifier_backward_s": max(fwd_bwd_s - fwd_s, 0.0),
    }


def time_samplers(
    unet, schedule, seeds: list[int], shape, steps: int, guides: dict, repeats: int, device="cpu"
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time of each sampler in ``guides`` (name -> guidance function or None), run
    interleaved so that drift of the machine affects all alike, and the fired fraction of each.
    On CUDA the device is synchronised around every run."""
    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    den = unet_denoiser(unet)
    for g in guides.values():  # warm-up
        sample(den, schedule, seeds[:2], shape, 2, guidance=g, device=dev)
    times: dict[str, list[float]] = {name: [] for name in guides}
    fired: dict[str, float] = {}
    for _ in range(repeats):
        for name, g in guides.items():
            sync()
            t0 = time.perf_counter()
            out = sample(den, schedule, seeds, shape, steps, guidance=g, device=dev)
            sync()
            times[name].append(time.perf_counter() - t0)
            assert out.images.shape == (len(seeds), *shape)
            fired[name] = float(out.fired_fraction.mean())
    return {k: statistics.median(v) for k, v in times.items()}, fired


def run(model_dir: str | None = None, batch: int = 128, steps: int = 20, repeats: int = 5) -> dict:
    unet, clf, schedule, source = _models(model_dir)
    shape = unet_image_shape(unet)
    cfg = SamplerConfig()
    guides = {
        "ddim": None,
        "cpsample": cpsample_guidance(clf, cfg.alpha, cfg.scale, t_max=cfg.guidance_t_max),
        "every_step": cpsample_guidance(clf, cfg.alpha, cfg.scale, t_max=1000),
    }
    med, fired_by = time_samplers(unet, schedule, list(range(batch)), shape, steps, guides, repeats)
    fired = fired_by["cpsample"]
    parts = breakdown(unet, clf, shape, batch)
    clf_s = parts["classifier_forward_s"] + parts["classifier_backward_s"]
    return {
        "ratio": med["cpsample"] / med["ddim"],
        "goal": "<= 1.15",
        "ddim_s": med["ddim"],
        "cpsample_s": med["cpsample"],
        "ratio_guiding_every_step": med["every_step"] / med["ddim"],
        "guidance_t_max": cfg.guidance_t_max,
        "ddim_images_per_s": batch / med["ddim"],
        "cpsample_images_per_s": batch / med["cpsample"],
        "batch": batch,
        "steps": steps,
        "repeats": repeats,
        "alpha": cfg.alpha,
        "guidance_fired_fraction": fired,
        **parts,
        "floor": 1.0 + fired * clf_s / parts["denoiser_forward_s"],
        "floor_every_step": 1.0 + clf_s / parts["denoiser_forward_s"],
        "unet_params": num_parameters(unet),
        "classifier_params": num_parameters(clf),
        "model": source,
        "torch_threads": torch.get_num_threads(),
    }

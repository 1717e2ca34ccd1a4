"""P7: CUDA images/s for DDIM and CPSample on a CIFAR-size UNet, and faiss-gpu query throughput.

The denoiser is a diffusers ``UNet2DModel`` with the google/ddpm-cifar10-32 configuration (35.7M
parameters, random weights: nothing is downloaded), sampled with 100 DDIM steps; CPSample adds a
noise-conditioned classifier of the same image shape (guidance at t < 600, alpha 0.5, s 5, so a forward
and an input-gradient backward on 60% of the steps). Images/s is the batch over the median wall time of
``repeats`` runs after a warm-up, with ``torch.cuda.synchronize()`` around each.

faiss-gpu: the project's exact ``IndexFlatIP`` on the GPU (``build_index(..., use_gpu=True)``) over
50k x 3072-d training vectors, 10k queries; queries/s, and agreement with the CPU index on a subset.

Without CUDA the run records why it was skipped; ``device="cpu"`` with a small batch and few steps
exercises the same code on the CPU (the test suite does that).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from p1_guidance_overhead import time_samplers  # bench/ is on sys.path (run.py, the test)

from pipeline.core.config import ClassifierArchConfig, SamplerConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import NoiseClassifier, num_parameters, unet_image_shape
from pipeline.fanout.index import build_index, gpu_available, l2_normalise, nearest


def cifar_unet():
    """google/ddpm-cifar10-32's architecture (its config.json), with random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        dropout=0.1, norm_num_groups=32,
    ).eval()  # fmt: skip


def cifar_classifier() -> NoiseClassifier:
    torch.manual_seed(1)
    arch = ClassifierArchConfig(
        sample_size=32, channels=3, base_channels=32, channel_mults=(1, 2, 2, 2)
    )
    return NoiseClassifier(arch).eval()


def sampling_rates(device: str, batch: int, steps: int, repeats: int) -> dict:
    dev = torch.device(device)
    unet, clf = cifar_unet().to(dev), cifar_classifier().to(dev)
    for p in clf.parameters():
        p.requires_grad_(False)
    cfg = SamplerConfig()
    guides = {
        "ddim": None,
        "cpsample": cpsample_guidance(clf, cfg.alpha, cfg.scale, t_max=cfg.guidance_t_max),
    }
    med, fired = time_samplers(
        unet, linear_schedule(), list(range(batch)), unet_image_shape(unet), steps, guides,
        repeats, dev,
    )  # fmt: skip
    return {
        "ddim_images_per_s": batch / med["ddim"],
        "cpsample_images_per_s": batch / med["cpsample"],
        "ratio": med["cpsample"] / med["ddim"],
        "guidance_fired_fraction": fired["cpsample"],
        "unet_params": num_parameters(unet),
        "classifier_params": num_parameters(clf),
        "batch": batch, "steps": steps, "repeats": repeats, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }  # fmt: skip


def faiss_gpu_rate(n_train: int, n_query: int, dim: int, repeats: int) -> dict:
    """The project's own exact index (``build_index(..., use_gpu=True)``) on the GPU, against the same
    index on the CPU for a subset of the queries."""
    if not gpu_available():
        return {"faiss_gpu": "skipped: this faiss has no GPU support or sees no GPU (faiss-cpu)"}
    import faiss

    rng = np.random.default_rng(0)
    train = l2_normalise(rng.standard_normal((n_train, dim), dtype=np.float32))
    queries = l2_normalise(rng.standard_normal((n_query, dim), dtype=np.float32))
    gpu = build_index(train, "flat", use_gpu=True)
    nearest(gpu, queries[:100])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, idx = nearest(gpu, queries)
        times.append(time.perf_counter() - t0)
    sub = min(500, n_query)
    _, cpu_idx = nearest(build_index(train, "flat"), queries[:sub])
    return {
        "faiss_gpu_queries_per_s": n_query / statistics.median(times),
        "faiss_gpu_agreement": float((cpu_idx[:, 0] == idx[:sub, 0]).mean()),
        "faiss_n_train": n_train, "faiss_n_query": n_query, "faiss_dim": dim,
        "faiss_gpus": faiss.get_num_gpus(),
    }  # fmt: skip


def run(
    device: str | None = None,
    batch: int = 256,
    steps: int = 100,
    repeats: int = 3,
    faiss_shape: tuple[int, int, int] = (50_000, 10_000, 3 * 32 * 32),
) -> dict:
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine", "goal": "recorded"}
        device = "cuda"
    out = sampling_rates(device, batch, steps, repeats)
    if torch.device(device).type == "cuda":
        out.update(faiss_gpu_rate(*faiss_shape, repeats))
    out["goal"] = "recorded"
    return out

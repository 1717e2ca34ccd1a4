"""P7: CUDA images/s for DDIM and CPSample on a CIFAR-size UNet, and faiss-gpu query throughput.

The denoiser is a diffusers ``UNet2DModel`` with the google/ddpm-cifar10-32 configuration (35.7M
parameters, random weights: nothing is downloaded), sampled with 100 DDIM steps; CPSample adds a
noise-conditioned classifier of the same image shape (guidance at t < 600, alpha 0.5, s 5, so a forward
and an input-gradient backward on 60% of the steps). Images/s is the batch over the median wall time of
``repeats`` runs after a warm-up, with ``torch.cuda.synchronize()`` around each.

faiss-gpu: exact ``IndexFlatIP`` on the GPU (``index_cpu_to_all_gpus``) over 50k x 3072-d training
vectors, 10k queries; queries/s, and agreement with the CPU index on a subset.

Without CUDA the run records why it was skipped; ``device="cpu"`` with a small batch and few steps
exercises the same code on the CPU (the test suite does that).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from pipeline.config import ClassifierArchConfig, SamplerConfig
from pipeline.diffusion import linear_schedule
from pipeline.guidance import cpsample_guidance
from pipeline.models import NoiseClassifier, num_parameters
from pipeline.replicas import l2_normalise
from pipeline.sampling import sample, unet_denoiser


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sampling_rates(device: str, batch: int, steps: int, repeats: int) -> dict:
    dev = torch.device(device)
    unet, clf = cifar_unet().to(dev), cifar_classifier().to(dev)
    for p in clf.parameters():
        p.requires_grad_(False)
    cfg = SamplerConfig()
    guide = cpsample_guidance(clf, cfg.alpha, cfg.scale, t_max=cfg.guidance_t_max)
    schedule, shape, seeds = linear_schedule(), (3, 32, 32), list(range(batch))
    den = unet_denoiser(unet)
    sample(den, schedule, seeds[:2], shape, 2, guidance=guide, device=dev)  # warm-up
    times: dict[str, list[float]] = {"ddim": [], "cpsample": []}
    fired = 0.0
    for _ in range(repeats):
        for name, g in (("ddim", None), ("cpsample", guide)):
            _sync(dev)
            t0 = time.perf_counter()
            out = sample(den, schedule, seeds, shape, steps, guidance=g, device=dev)
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
            if g is not None:
                fired = float(out.fired_fraction.mean())
            assert out.images.shape == (batch, *shape)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "ddim_images_per_s": batch / med["ddim"],
        "cpsample_images_per_s": batch / med["cpsample"],
        "ratio": med["cpsample"] / med["ddim"],
        "guidance_fired_fraction": fired,
        "unet_params": num_parameters(unet),
        "classifier_params": num_parameters(clf),
        "batch": batch, "steps": steps, "repeats": repeats, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }  # fmt: skip


def faiss_gpu_rate(n_train: int, n_query: int, dim: int, repeats: int) -> dict:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {"faiss_gpu": "skipped: this faiss has no GPU support or sees no GPU (faiss-cpu)"}
    rng = np.random.default_rng(0)
    train = l2_normalise(rng.standard_normal((n_train, dim), dtype=np.float32))
    queries = l2_normalise(rng.standard_normal((n_query, dim), dtype=np.float32))
    cpu = faiss.IndexFlatIP(dim)
    cpu.add(train)
    gpu = faiss.index_cpu_to_all_gpus(cpu)
    gpu.search(queries[:100], 1)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, idx = gpu.search(queries, 1)
        times.append(time.perf_counter() - t0)
    sub = min(500, n_query)
    _, cpu_idx = cpu.search(queries[:sub], 1)
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

"""P7: CUDA images/s for DDIM and CPSample on a CIFAR-size UNet, and faiss-gpu query throughput.

The denoiser is a diffusers ``UNet2DModel`` with the google/ddpm-cifar10-32 configuration (35.7M
parameters, random weights: nothing is downloaded), sampled with 100 DDIM steps; CPSample adds a
noise-conditioned classifier of the same image shape (guidance at t < 600, alpha 0.5, s 5, so a forward
and an input-gradient backward on 60% of the steps). Images/s is the batch over the median wall time of
``repeats`` runs after a warm-up, with ``torch.cuda.synchronize()`` around each.

faiss-gpu: the project's exact ``IndexFlatIP`` on the GPU (``build_index(..., use_gpu=True)``) over
50k x 3072-d training vectors, 10k queries; queries/s, and agreement with the CPU index on a subset.

Training (:func:`training_rates`): denoiser and classifier steps of the CIFAR-size models through
the loops' own path (:mod:`pipeline.train.device`: uint8 batches copied from pinned memory two steps
ahead, noise, timesteps and mixup drawn on the device, the loss summed there), images/s over the
median of ``repeats`` runs; on CUDA the same steps also run under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any host sync (``host_sync_free``).
Ray input (:func:`ray_input_rate`): rows of a Ray Data dataset through ``iter_torch_batches(device=
"cuda", prefetch_batches=2)`` (:func:`pipeline.train.ingest.device_batches`), images/s. Stages
(:func:`gpu_stages`): ``train_denoiser`` and ``train_classifier`` with ``use_gpu=True`` on a local
digits store (Ray Train's ScalingConfig asks for a GPU per worker), wall seconds and their device.

Classifier scaling (:func:`classifier_scaling_curve`): bench/classifier_scaling.py's measurement
(steps to 95% on N random bits at t < 100, 8x8 synthetic RGB, batch 128) at larger N and widths on
the device, under a wall-clock budget; its summary carries the per-width fits (steps ~ a N^k) to
extend the CPU curve in results.json.

Without CUDA the run records why it was skipped; ``device="cpu"`` with a small batch and few steps
exercises the same code on the CPU (the test suite does that).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from p1_guidance_overhead import time_samplers  # bench/ is on sys.path (run.py, the test)

from pipeline.core.config import (
    ClassifierArchConfig,
    ClassifierTrainConfig,
    DenoiserTrainConfig,
    SamplerConfig,
    UNetConfig,
)
from pipeline.core.diffusion import linear_schedule
from pipeline.core.guidance import cpsample_guidance
from pipeline.core.models import NoiseClassifier, num_parameters, unet_image_shape
from pipeline.fanout.index import build_index, gpu_available, l2_normalise, nearest
from pipeline.train.ingest import MemoryRows
from pipeline.train.loops import EMA, fit_classifier, fit_denoiser


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


def _rows(n: int, seed: int = 0) -> dict:
    """``n`` random 32x32 RGB uint8 rows with keys, as Ray Data decodes them."""
    rng = np.random.default_rng(seed)
    keys = np.asarray([f"r{i:06d}" for i in range(n)], dtype=object)
    return {"key": keys, "image": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _sync_free(dev: torch.device, fn) -> bool | str:
    """True when ``fn()`` runs with no host sync (CUDA's sync debug mode raises at one), else why."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        free: bool | str = True
    except RuntimeError as exc:  # the synchronising call, named by torch
        free = f"host sync: {str(exc)[:300]}"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _sync(dev)
    return free


def training_rates(device: str, batch: int, steps: int, repeats: int) -> dict:
    """Images/s of the denoiser (CIFAR UNet, EMA, grad clip) and classifier (mixup 0.2, key bits)
    training loops on ``device``, without checkpoints (no read-back), median of ``repeats``."""
    dev = torch.device(device)
    rows, schedule = MemoryRows(_rows(4 * batch)), linear_schedule()
    unet, clf = cifar_unet().train().to(dev), cifar_classifier().train().to(dev)
    ema, opt_u = EMA(unet, 0.999), torch.optim.AdamW(unet.parameters(), lr=1e-4)
    opt_c = torch.optim.AdamW(clf.parameters(), lr=1e-4)
    dcfg = DenoiserTrainConfig(steps=steps, batch_size=batch, checkpoint_every=steps)
    ccfg = ClassifierTrainConfig(steps=steps, batch_size=batch, checkpoint_every=steps, mixup=0.2)
    loops = {
        "denoiser": lambda: fit_denoiser(unet, ema, opt_u, schedule, rows, dcfg),
        "classifier": lambda: fit_classifier(clf, opt_c, schedule, rows, None, None, ccfg),
    }
    times: dict[str, list[float]] = {k: [] for k in loops}
    for name, loop in loops.items():
        loop()  # warm-up (cuDNN autotuning, allocator)
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            loop()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
    out = {
        f"train_{k}_images_per_s": batch * steps / statistics.median(v) for k, v in times.items()
    }
    out.update(train_batch=batch, train_steps=steps)
    if dev.type == "cuda":
        out.update({f"train_{k}_host_sync_free": _sync_free(dev, f) for k, f in loops.items()})
    return out


def ray_input_rate(device: str, n: int = 20_000, batch: int = 256) -> dict:
    """Images/s of 32x32x3 uint8 rows from a Ray Data dataset (in the object store) reaching
    ``device`` through :func:`pipeline.train.ingest.device_batches` (``iter_torch_batches(device=...,
    prefetch_batches=2)``), one pass after a warm-up pass."""
    import ray

    from pipeline.train.ingest import device_batches

    ds = ray.data.from_numpy(_rows(n)["image"]).rename_columns({"data": "image"}).materialize()
    dev = torch.device(device)
    for _ in device_batches(ds.iterator(), dev, batch):  # warm-up
        pass
    _sync(dev)
    t0, rows = time.perf_counter(), 0
    for b in device_batches(ds.iterator(), dev, batch):
        assert b["image"].device.type == dev.type and b["image"].dtype == torch.uint8
        rows += len(b["image"])
    _sync(dev)
    return {"ray_input_images_per_s": rows / (time.perf_counter() - t0), "ray_input_rows": rows}


def gpu_stages(tmp: str, steps: int = 40, use_gpu: bool = True) -> dict:
    """Wall seconds of the Ray Train stages with ``use_gpu=True`` (1 worker, 1 GPU) on digits."""
    from pipeline.data.datasets import digits_source, split
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import make_shards, train_classifier, train_denoiser

    store = open_store(tmp)
    train, holdout = split(digits_source(16), 256, 0)
    make_shards(store, "digits", train, holdout.subset(range(512)), shard_size=128)
    out = {}
    t0 = time.perf_counter()
    unet = UNetConfig()
    den = DenoiserTrainConfig(steps=steps, batch_size=64, checkpoint_every=steps, use_gpu=use_gpu)
    res = train_denoiser(store, "p7", "digits", unet, den)
    out["stage_train_denoiser_gpu_s"] = time.perf_counter() - t0
    out["stage_train_denoiser_images_per_s"] = float(res["metrics"]["images_per_s"])
    t0 = time.perf_counter()
    clf = ClassifierTrainConfig(
        steps=steps, batch_size=64, checkpoint_every=steps, use_gpu=use_gpu, holdout_images=256
    )
    train_classifier(store, "p7", "digits", ClassifierArchConfig(), clf)
    out["stage_train_classifier_gpu_s"] = time.perf_counter() - t0
    return out


def _cuda_only_parts(repeats: int, faiss_shape: tuple[int, int, int]) -> dict:
    """faiss-gpu, the Ray input path to the GPU and the use_gpu=True stages (each recorded as an
    error string if it fails, so one broken part does not lose the others' numbers)."""
    import os
    import tempfile

    from pipeline.fanout.ray_init import init_ray

    out: dict = {}
    parts = [lambda: faiss_gpu_rate(*faiss_shape, repeats)]
    parts += [lambda: ray_input_rate("cuda"), lambda: gpu_stages(tempfile.mkdtemp(prefix="p7-"))]
    init_ray(num_cpus=max(2, min(8, os.cpu_count() or 2)), num_gpus=1)
    for part in parts:
        try:
            out.update(part())
        except Exception as exc:  # recorded, not fatal: the bench runs once per lent GPU
            out.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
    return out


def classifier_scaling_curve(
    device: str,
    ns: tuple[int, ...] = (16_384, 65_536, 262_144),
    widths: tuple[int, ...] = (16, 32, 64),
    max_steps: int = 400_000,
    seconds: float | None = 300.0,
) -> dict:
    """bench/classifier_scaling.py's curve on ``device`` (``ns`` x ``widths``, widest first at each
    N), stopping new work after ``seconds``: the bench's summary (fits, cheapest width by N, rows)
    plus the device's name. A row cut by the budget is kept with ``stopped`` (a lower bound)."""
    import classifier_scaling as cs  # bench/ is on sys.path

    deadline = time.time() + seconds if seconds else None
    rows = cs.measure(ns, widths, max_steps, "synthetic", device, deadline)
    out = cs.summarise(rows, "synthetic")
    dev = torch.device(device)
    out["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return out


def run(
    device: str | None = None,
    batch: int = 256,
    steps: int = 100,
    repeats: int = 3,
    faiss_shape: tuple[int, int, int] = (50_000, 10_000, 3 * 32 * 32),
    train_steps: int | None = None,
    scaling_seconds: float | None = 300.0,
) -> dict:
    """P7's record on ``device`` (default: CUDA, else a skip record); ``train_steps`` defaults to
    ``min(steps, 50)``; on CUDA also :func:`classifier_scaling_curve` for ``scaling_seconds``
    (None or 0: skip it)."""
    if device is None:
        if not torch.cuda.is_available():
            return {"skipped": "no CUDA device on this machine", "goal": "recorded"}
        device = "cuda"
    out = sampling_rates(device, batch, steps, repeats)
    out.update(training_rates(device, batch, train_steps or min(steps, 50), repeats))
    if torch.device(device).type == "cuda":
        out.update(_cuda_only_parts(repeats, faiss_shape))
        if scaling_seconds:
            try:
                out["classifier_scaling"] = classifier_scaling_curve(
                    device, seconds=scaling_seconds
                )
            except Exception as exc:  # recorded, not fatal, as the other CUDA parts
                out.setdefault("errors", []).append(f"{type(exc).__name__}: {str(exc)[:300]}")
    out["goal"] = "recorded"
    return out

"""P5: images/s of the denoiser's training step through Ray Train's TorchTrainer (1 worker) ÷ the same
step in a plain PyTorch loop: same model (the demo UNet), data (64 16x16 digits), batch and torch threads.

Both sides run :func:`pipeline.train.loops.fit_denoiser`; the rate is the steady state, the images/s of the
second checkpoint interval (the first one holds warm-up, and for Ray the data ingest), so trainer
start-up is excluded and reported separately (wall time of ``fit`` minus the steps). Runs are
interleaved (plain, Ray 1 worker, Ray 2 workers, Ray 1 worker at Ray's default niceness 15, ...) and
the medians are compared, so the machine's drift affects all alike.
Details: 2 workers ÷ 1 (the global batch split over two workers on this 2-core machine, 1 thread each),
and the Ray run with the worker at niceness 15, Ray's default on a ``ray start`` cluster (which
``set_niceness`` in ray_train undoes).
With a GPU, ``use_gpu=True`` runs record images/s too (``gpu_images_per_s``).
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from pipeline.core.config import DenoiserTrainConfig, UNetConfig
from pipeline.core.diffusion import linear_schedule
from pipeline.core.models import build_unet, num_parameters
from pipeline.data.datasets import digits_source, split
from pipeline.train.loops import EMA, fit_denoiser


def _steady_rate(reports: list[dict]) -> float:
    return float(reports[-1]["images_per_s"])


def plain_loop(x: torch.Tensor, unet_cfg: UNetConfig, cfg: DenoiserTrainConfig, threads: int):
    """(steady images/s, wall s) of fit_denoiser without Ray, in this process."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(cfg.seed)
        unet = build_unet(unet_cfg)
        ema = EMA(unet, cfg.ema_decay)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
        reports: list[dict] = []
        t0 = time.perf_counter()
        fit_denoiser(
            unet, ema, opt, linear_schedule(), x, cfg,
            on_checkpoint=lambda step, m: reports.append(m),
        )  # fmt: skip
        return _steady_rate(reports), time.perf_counter() - t0
    finally:
        torch.set_num_threads(previous)


def ray_run(store, unet_cfg, cfg, threads: int, name: str, niceness: int = 0):
    """(steady images/s, start-up s) of stages.train_denoiser (TorchTrainer) on the store's shards."""
    from pipeline.orchestration.stages import train_denoiser

    t0 = time.perf_counter()
    out = train_denoiser(
        store, name, "digits", unet_cfg, cfg, threads,
        loop_config={"niceness": niceness},
    )  # fmt: skip
    wall = time.perf_counter() - t0
    rate = float(out["metrics"]["images_per_s"])
    startup = wall - cfg.steps * cfg.batch_size / rate
    return rate, startup


def run(repeats: int = 3, interval: int = 12, threads: int = 2, gpu: bool | None = None) -> dict:
    import ray

    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray
    from pipeline.orchestration.stages import make_shards

    unet_cfg = UNetConfig()  # the demo architecture
    cfg = DenoiserTrainConfig(steps=2 * interval, checkpoint_every=interval, num_to_keep=1)
    train, holdout = split(digits_source(16), 64, 0)
    x = train.to_tensor()
    init_ray(num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpu = torch.cuda.is_available() if gpu is None else gpu
    res: dict[str, list[float]] = {
        k: [] for k in ("plain", "ray1", "ray2", "ray1_nice15", "startup1", "startup2", "gpu")
    }
    with tempfile.TemporaryDirectory(prefix="p5-") as tmp:
        store = open_store(tmp)
        make_shards(store, "digits", train, holdout.subset(range(16)), shard_size=64)
        cfg2 = DenoiserTrainConfig(**{**cfg.__dict__, "num_workers": 2})
        for r in range(repeats):
            res["plain"].append(plain_loop(x, unet_cfg, cfg, threads)[0])
            rate, start = ray_run(store, unet_cfg, cfg, threads, f"p5-{r}-1")
            res["ray1"].append(rate)
            res["startup1"].append(start)
            rate, start = ray_run(store, unet_cfg, cfg2, 1, f"p5-{r}-2")
            res["ray2"].append(rate)
            res["startup2"].append(start)
            res["ray1_nice15"].append(
                ray_run(store, unet_cfg, cfg, threads, f"p5-{r}-n", niceness=15)[0]
            )
            if gpu:
                cfg_gpu = DenoiserTrainConfig(**{**cfg.__dict__, "use_gpu": True})
                res["gpu"].append(ray_run(store, unet_cfg, cfg_gpu, threads, f"p5-{r}-g")[0])
            print(
                f"[P5] repeat {r + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items() if v),
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in res.items() if v}
    out = {
        "ratio": med["ray1"] / med["plain"],
        "goal": ">= 0.9",
        "plain_images_per_s": med["plain"],
        "ray_1_worker_images_per_s": med["ray1"],
        "ray_2_workers_images_per_s": med["ray2"],
        "ratio_2_workers_vs_1": med["ray2"] / med["ray1"],
        "ratio_1_worker_at_ray_niceness_15": med["ray1_nice15"] / med["plain"],
        "startup_s_1_worker": med["startup1"],
        "startup_s_2_workers": med["startup2"],
        "gpu_images_per_s": med.get("gpu"),
        "batch": cfg.batch_size,
        "steps_per_run": cfg.steps,
        "measured_steps": interval,
        "torch_threads": threads,
        "repeats": repeats,
        "unet_params": num_parameters(build_unet(unet_cfg)),
        "samples": {k: v for k, v in res.items() if v},
        "note": "2 shared CPU cores, contended by other sessions; ratios of interleaved medians",
    }
    ray.shutdown()
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))

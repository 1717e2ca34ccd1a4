"""Train the diffusers UNet2DModel denoiser with Ray Train on data/<dataset>/train shards.

    python jobs/train_denoiser.py --store demo-out --dataset digits --run demo [--config den.yaml]
    ray job submit --working-dir . -- python jobs/train_denoiser.py --store s3://bucket/p --num-workers 4 --use-gpu

Checkpoints go to <store>/checkpoints/<run>-denoiser (Ray Train); the EMA model is exported to
<store>/models/<run>/denoiser (save_pretrained + scheduler_config.json + run_config.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.config import DenoiserTrainConfig, UNetConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--run", default="demo")
    p.add_argument("--config", help="YAML with 'unet' and 'train' sections")
    p.add_argument("--steps", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--s3-endpoint")
    args = p.parse_args()
    cfg = load_sections(args.config, {"unet": UNetConfig, "train": DenoiserTrainConfig})
    train = override(
        cfg["train"], steps=args.steps, num_workers=args.num_workers, use_gpu=args.use_gpu or None
    )
    from pipeline.stages import train_denoiser
    from pipeline.storage import open_store

    store = open_store(args.store, args.s3_endpoint)
    out = train_denoiser(store, args.run, args.dataset, cfg["unet"], train, args.threads)
    print(f"denoiser: {out['uri']}  metrics: {out['metrics']}")


if __name__ == "__main__":
    run_main(main)

"""Train the random-label classifier c_phi(x_t, t) with Ray Train (CPSample, Algorithm 1).

Only the classifier is trained: the noise schedule comes from the denoiser directory, which can be any
diffusers UNet2DModel directory (for example a saved google/ddpm-cifar10-32).

    python jobs/train_classifier.py --store demo-out --dataset digits --run demo
    python jobs/train_classifier.py --store s3://bucket/p --denoiser /models/ddpm-cifar10-32 --num-workers 2

Checkpoints go to <store>/checkpoints/<run>-classifier; the final model to <store>/models/<run>/classifier
(model.safetensors with the architecture in its metadata, plus config.json with the fit metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.config import ClassifierArchConfig, ClassifierTrainConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--run", default="demo")
    p.add_argument(
        "--denoiser", help="diffusers model dir for the noise schedule (default: linear T=1000)"
    )
    p.add_argument("--config", help="YAML with 'arch' and 'train' sections")
    p.add_argument("--steps", type=int)
    p.add_argument("--holdout-images", type=int, help="held-out images given their own random bits")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    p.add_argument("--s3-endpoint")
    args = p.parse_args()
    cfg = load_sections(args.config, {"arch": ClassifierArchConfig, "train": ClassifierTrainConfig})
    train = override(
        cfg["train"], steps=args.steps, holdout_images=args.holdout_images,
        num_workers=args.num_workers, use_gpu=args.use_gpu or None,
    )  # fmt: skip
    from pipeline.models import load_schedule
    from pipeline.stages import train_classifier
    from pipeline.storage import open_store

    betas = load_schedule(args.denoiser).betas.tolist() if args.denoiser else None
    store = open_store(args.store, args.s3_endpoint)
    out = train_classifier(store, args.run, args.dataset, cfg["arch"], train, args.threads, betas)
    print(f"classifier: {out['uri']}  metrics: {out['metrics']}")


if __name__ == "__main__":
    run_main(main)

"""Generate samples, plain DDIM or CPSample-protected, as WebDataset shards with a Ray Data actor pool.

    python jobs/sample.py --store demo-out --run demo --sampler cpsample --num-samples 512 --alpha 0.5 --scale 5
    python jobs/sample.py --store s3://bucket/batch-42 --denoiser /models/ddpm-cifar10-32 \
        --classifier models/demo/classifier --num-gpus-per-actor 0.5 --concurrency 8

Each shard is one task with seeds derived from (seed, shard, index): the images do not depend on the
number of actors. Shards are written atomically to samples/<run>/<sampler>/; a rerun skips complete ones.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.config import SamplerConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True)
    p.add_argument("--run", default="demo")
    p.add_argument(
        "--denoiser", help="model dir or store-relative path (default models/<run>/denoiser)"
    )
    p.add_argument(
        "--classifier",
        help="classifier dir or store-relative path (default models/<run>/classifier)",
    )
    p.add_argument("--config", help="YAML with a 'sampler' section")
    p.add_argument("--sampler", choices=["ddim", "cpsample"])
    p.add_argument("--num-samples", type=int)
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--eta", type=float)
    p.add_argument("--alpha", type=float, help="confidence threshold, in (0, 0.5]")
    p.add_argument("--scale", type=float, help="guidance scale s, >= 0")
    p.add_argument("--seed", type=int)
    p.add_argument("--concurrency", type=int, default=1, help="number of sampling actors")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument(
        "--num-gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs"
    )
    p.add_argument("--s3-endpoint")
    args = p.parse_args()
    cfg = override(
        load_sections(args.config, {"sampler": SamplerConfig})["sampler"],
        sampler=args.sampler, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
        steps=args.steps, eta=args.eta, alpha=args.alpha, scale=args.scale, seed=args.seed,
    )  # fmt: skip
    from pipeline.ray_data import run_sampling
    from pipeline.storage import open_store

    store = open_store(args.store, args.s3_endpoint)
    out = run_sampling(
        store.uri, args.run, cfg, args.denoiser or f"models/{args.run}/denoiser",
        args.classifier or f"models/{args.run}/classifier", args.concurrency,
        args.num_cpus_per_actor, args.num_gpus_per_actor, args.s3_endpoint,
    )  # fmt: skip
    print(
        f"{out['num_samples']} samples in {out['num_shards']} shards ({out['skipped_shards']} already complete) "
        f"under {store.uri_of(out['folder'])}; guidance fired fraction {out['guidance_fired_fraction']:.3f}"
    )


if __name__ == "__main__":
    run_main(main)

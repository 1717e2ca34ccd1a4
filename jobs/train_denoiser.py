r"""Train the diffusers UNet2DModel denoiser with Ray Train on data/<dataset>/train shards.

    python jobs/train_denoiser.py --store demo-out --dataset digits --run demo [--config den.yaml]
    ray job submit --working-dir . -- python jobs/train_denoiser.py --store s3://bucket/p \
        --num-workers 4 --use-gpu --max-failures 3

Checkpoints (safetensors model + EMA, optimizer, state.json with the resolved config) go to
<store>/checkpoints/<run>-denoiser; a run killed mid-way continues from its latest checkpoint when the
same command (same --run and --store) is run again, and a finished run's final checkpoint is exported
again without starting Ray or reading a shard. A rerun with another config (beyond --num-workers,
--use-gpu, --max-failures, --num-to-keep, --checkpoint-every) or other data exits 2 naming what changed;
--overwrite discards the old checkpoints instead. The EMA model is exported to
<store>/models/<run>/denoiser (save_pretrained + scheduler_config.json + run_config.json). On CUDA the
step runs under bf16 autocast (config key train.mixed_precision).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.core.config import DenoiserTrainConfig, UNetConfig
from pipeline.train.workers import add_train_flags, train_overrides


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--run", default="demo", help="run name: checkpoints/<run>-denoiser")
    p.add_argument("--config", help="YAML with 'unet' and 'train' sections")
    add_train_flags(p)
    args = p.parse_args()
    cfg = load_sections(args.config, {"unet": UNetConfig, "train": DenoiserTrainConfig})
    train = override(cfg["train"], **train_overrides(args))
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import train_denoiser

    store = open_store(args.store, args.s3_endpoint)
    # Ray starts (or joins the cluster of `ray job submit` through RAY_ADDRESS) only when there is
    # something to train: a finished run's rerun exports its final checkpoint without it
    out = train_denoiser(
        store, args.run, args.dataset, cfg["unet"], train, args.threads,
        overwrite=args.overwrite, ray_cpus=args.ray_cpus,
    )  # fmt: skip
    print(f"denoiser: {out['uri']}  metrics: {out['metrics']}")


if __name__ == "__main__":
    run_main(main)

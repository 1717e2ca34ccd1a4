r"""Train the random-label classifier c_phi(x_t, t) with Ray Train (CPSample, Algorithm 1).

Only the classifier is trained. With --denoiser, the noise schedule and the image shape come from that
directory, which can be any diffusers UNet2DModel directory (for example a saved google/ddpm-cifar10-32)
or a store path such as models/<run>/denoiser; without it the schedule is DDPM's linear T=1000.
On a latent dataset (precomputed VAE latents: its manifest has a 'latent' section) the same job trains
on the latents: --model names the Stable Diffusion directory whose scheduler and unet latent shape the
classifier uses (read from its configs; the model is not loaded), and --text-cond also conditions the
classifier on each image's pooled text embedding (cond_dim = the manifest's latent.pooled_dim).

    python jobs/train_classifier.py --store demo-out --dataset digits --run demo
    ray job submit --working-dir . -- python jobs/train_classifier.py --store s3://bucket/p \
        --denoiser models/demo/denoiser --num-workers 2 --use-gpu --max-failures 2
    python jobs/train_classifier.py --store out --dataset digits-latents --model /models/sd --text-cond

Checkpoints go to <store>/checkpoints/<run>-classifier (rerunning the same command continues from the
latest one; with another config, data or denoiser it exits 2 naming what changed, or --overwrite starts
afresh); the final model to <store>/models/<run>/classifier (model.safetensors with the architecture
in its metadata, plus config.json with the fit metrics: accuracy by t-range, held-out-bit accuracy,
Lipschitz proxy, and which bits it trained on; and its model card "fit": accuracy and mean |p - 1/2|
on its own bits at t < 100 on a seeded sample of training rows, the confident fraction on never-seen
images, and the threshold min_fit, 0.9, below which sample --sampler cpsample refuses it unless
--allow-unfit). With near-duplicate clusters in the store
(jobs/cluster_duplicates.py), every copy of a picture gets its cluster's bit (--labels cluster, the
default wherever clusters exist); --labels key keeps the paper's bit per key. Scale to large N with --steps, the width (arch.base_channels, arch.channel_mults) and
--lr-schedule/--warmup-steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.core.config import ClassifierArchConfig, ClassifierTrainConfig
from pipeline.train.workers import add_train_flags, train_overrides


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--run", default="demo", help="run name: checkpoints/<run>-classifier")
    protect = p.add_mutually_exclusive_group()
    protect.add_argument(
        "--denoiser",
        help="diffusers UNet2DModel dir (local, or models/<run>/denoiser in the store) whose noise "
        "schedule and image shape the classifier uses (default: linear T=1000, arch's shape)",
    )
    protect.add_argument(
        "--model",
        metavar="DIR",
        help="latent datasets: the diffusers Stable Diffusion dir (local or in the store) whose "
        "scheduler and unet latent shape the classifier uses",
    )
    p.add_argument(
        "--text-cond",
        action="store_true",
        help="latent datasets: condition the classifier on the pooled text embeddings too",
    )
    p.add_argument("--config", help="YAML with 'arch' and 'train' sections")
    p.add_argument("--holdout-images", type=int, help="held-out images given their own random bits")
    p.add_argument("--base-channels", type=int, help="classifier width (arch.base_channels)")
    p.add_argument(
        "--labels",
        choices=("auto", "key", "cluster"),
        help="random bits per training key (the paper), per near-duplicate cluster (made by "
        "jobs/cluster_duplicates.py), or auto: cluster bits wherever clusters exist (default)",
    )
    add_train_flags(p)
    args = p.parse_args()
    cfg = load_sections(args.config, {"arch": ClassifierArchConfig, "train": ClassifierTrainConfig})
    train = override(
        cfg["train"],
        holdout_images=args.holdout_images,
        labels=args.labels,
        **train_overrides(args),
    )
    arch = override(cfg["arch"], base_channels=args.base_channels)
    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray
    from pipeline.orchestration.stages import train_classifier

    store = open_store(args.store, args.s3_endpoint)
    init_ray(num_cpus=args.ray_cpus)  # joins the cluster of `ray job submit` through RAY_ADDRESS
    out = train_classifier(
        store,
        args.run,
        args.dataset,
        arch,
        train,
        args.threads,
        denoiser=args.denoiser,
        overwrite=args.overwrite,
        model=args.model,
        text_cond=args.text_cond,
    )
    print(f"classifier: {out['uri']}  metrics: {out['metrics']}")
    print(fit_line(out.get("fit")))


def fit_line(card: dict | None) -> str:
    """One line on the classifier's model card: its fit, and whether sampling will take it."""
    if not card:
        return "fit: not measured (no training rows reached rank 0's metrics)"
    lo, hi = card["t_range"]
    line = (
        f"fit: {card['accuracy']:.1%} of its own bits at {lo} <= t < {hi} ({card['rows']} training "
        f"rows, mean |p - 1/2| {card['mean_margin']:.3f}); never-seen images confident: "
        f"{card['never_seen']['confident_fraction']:.1%}"
    )
    if card["fits"]:
        return f"{line}; meets min_fit {card['threshold']:.0%}"
    return (
        f"{line}; BELOW min_fit {card['threshold']:.0%}: sample --sampler cpsample refuses it "
        "(exit 2) unless --allow-unfit; train further: more --steps, a wider classifier "
        "(--base-channels)"
    )


if __name__ == "__main__":
    run_main(main)

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
latest one, or, when that one is final, exports it again without starting Ray; with another config,
data or denoiser it exits 2 naming what changed, or --overwrite starts afresh); the final model to <store>/models/<run>/classifier (model.safetensors with the architecture
in its metadata, plus config.json with the fit metrics: accuracy by t-range, held-out-bit accuracy,
Lipschitz proxy, and which bits it trained on; and its model card "fit": accuracy and mean |p - 1/2|
on its own bits at t < 100 on a seeded sample of training rows, the confident fraction on never-seen
images, and the threshold min_fit, 0.9, below which sample --sampler cpsample refuses it unless
--allow-unfit). With near-duplicate clusters in the store
(jobs/cluster_duplicates.py), every copy of a picture gets its cluster's bit (--labels cluster, the
default wherever clusters exist); --labels key keeps the paper's bit per key.

Sizing: by default the steps and the width (arch.base_channels) follow the measured scaling fit
(bench/classifier_scaling.py; pipeline.core.classifier_sizing) for N = the training images plus the
held-out images trained on with their own bits (from the dataset's manifest): never below the
calibrated 1,600 steps and width 16, growing with N. --steps and --base-channels (or train.steps and
arch.base_channels in --config) win. The choice is logged and recorded as train.sized_for (N; 0: set
by hand) in the classifier's config.json.
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
    p.add_argument(
        "--base-channels",
        type=int,
        help="classifier width (arch.base_channels; default: sized from N with --steps, see above)",
    )
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
    from pipeline.data.handle import open_dataset
    from pipeline.data.storage import open_store
    from pipeline.orchestration.stages import train_classifier

    store = open_store(args.store, args.s3_endpoint)
    ds = open_dataset(store, args.dataset)
    given = given_keys(args.config)
    arch, train, line = sized_configs(
        arch, train, bits_in(ds, train.holdout_images),
        steps_given=args.steps is not None or "steps" in given["train"],
        width_given=args.base_channels is not None or "base_channels" in given["arch"],
    )  # fmt: skip
    print(line, flush=True)
    # Ray starts (or joins the cluster of `ray job submit` through RAY_ADDRESS) only when there is
    # something to train: a finished run's rerun exports its final checkpoint without it
    out = train_classifier(
        store,
        args.run,
        ds,
        arch,
        train,
        args.threads,
        denoiser=args.denoiser,
        overwrite=args.overwrite,
        model=args.model,
        text_cond=args.text_cond,
        ray_cpus=args.ray_cpus,
    )
    print(f"classifier: {out['uri']}  metrics: {out['metrics']}")
    print(fit_line(out.get("fit")))


def given_keys(path: str | None) -> dict[str, set[str]]:
    """The keys the --config YAML sets in its 'train' and 'arch' sections (what sizing must not touch)."""
    from pipeline.core.config_base import read_yaml

    data = (read_yaml(path) or {}) if path else {}
    return {name: set(data.get(name) or {}) for name in ("train", "arch")}


def bits_in(ds, holdout_images: int) -> int | None:
    """N: the training images plus the held-out images trained on with their own bits, from the
    dataset's manifest (None without one: hand-made shards)."""
    from pipeline.core.classifier_sizing import images_with_bits

    if ds.manifest is None:
        return None
    n_holdout = ds.count("holdout") if "holdout" in ds.manifest["splits"] else 0
    return images_with_bits(ds.count("train"), n_holdout, holdout_images)


def sized_configs(arch, train, n_bits: int | None, steps_given: bool, width_given: bool):
    """(arch, train, log line): the configs with the steps and width that
    :func:`pipeline.core.classifier_sizing.size_classifier` gives for ``n_bits``, except what was
    given (flag or --config); ``train.sized_for`` records N when anything was sized."""
    from pipeline.core.classifier_sizing import size_classifier

    if n_bits is None:
        return (
            arch,
            train,
            "sizing: no manifest (hand-made shards), so the config's steps and width",
        )
    if steps_given and width_given:
        return arch, train, f"sizing: N={n_bits}; --steps and --base-channels given, kept"
    s = size_classifier(n_bits, train.batch_size)
    if not width_given:
        arch = override(arch, base_channels=s.base_channels)
    if not steps_given:
        train = override(train, steps=s.steps)
    train = override(train, sized_for=n_bits)
    kept = (
        " (--steps given, kept)" if steps_given else " (width given, kept)" if width_given else ""
    )
    return (
        arch,
        train,
        (f"sizing: base_channels {arch.base_channels}, {train.steps} steps{kept}; {s.reason}"),
    )


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

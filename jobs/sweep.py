"""The (alpha, s) trade-off sweep with Ray Tune: sample, check replicas and measure quality per point.

    python jobs/sweep.py --store demo-out --run demo --alphas 0.5 --scales 3 5 7 --target-rate 0.02

Every point samples --num-samples images with the same seeds (plus plain DDIM as the reference), finds
each sample's nearest training image (mean-centred pixels, the replica threshold) and measures quality:
the domain Fréchet distance when held-out labels exist (the digits, or an image folder's label
subfolders) and, for an image folder, the Fréchet distance in the code of an autoencoder trained on
its held-out images (pipeline/evaluation/folder_quality.py). Writes reports/<run>/pareto.png (replication rate vs quality, each point labelled),
merges the "sweep" key into reports/<run>/report.json and report.md, and names the recommended
setting: the best quality with replication rate <= --target-rate and share above the held-out p99
<= --target-above-p99.

Two threshold-free privacy axes per point: the share of samples whose nearest-training similarity is
above the held-out real images' p95 / p99 (a seeded subset of at most --max-holdout held-out images
searched in the same replica index; real images score 5% / 1% by construction), and the AUC of the
sample-only membership attack (--num-members training images vs --num-nonmembers never-seen
held-out images, scored by their similarity to the point's nearest sample; --no-attack skips it).

The run's models must have been trained on data/<dataset> (their provenance's manifest digest), and
the report's "inputs" must name the same models, data and index: otherwise it exits 2 before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_allow_unfit_arg, add_store_args, load_sections, override, run_main

from pipeline.core.config import EvalConfig, ReplicaConfig, SamplerConfig, SweepConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument(
        "--config", help="YAML with 'sweep', 'sampler', 'replicas' and 'evaluation' sections"
    )
    p.add_argument("--alphas", type=float, nargs="+")
    p.add_argument("--scales", type=float, nargs="+")
    p.add_argument("--num-samples", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--target-rate", type=float, help="largest acceptable replication rate (0.02)")
    p.add_argument(
        "--target-above-p99",
        type=float,
        help="largest acceptable share of samples above the held-out p99 NN similarity (0.05)",
    )
    p.add_argument(
        "--max-holdout", type=int, help="held-out images setting the p95 / p99 reference (2000)"
    )
    p.add_argument("--num-members", type=int, help="members of the sample-only attack (64)")
    p.add_argument("--num-nonmembers", type=int, help="non-members of the attack (256)")
    p.add_argument("--no-attack", action="store_true", help="skip the sample-only attack")
    p.add_argument("--no-ddim", action="store_true", help="skip the plain DDIM reference point")
    p.add_argument("--steps", type=int, help="DDIM steps per sample")
    p.add_argument("--threshold", type=float, help="replica threshold (cosine)")
    p.add_argument("--cpus-per-trial", type=float)
    add_allow_unfit_arg(p)
    args = p.parse_args()
    sections = load_sections(
        args.config,
        {"sweep": SweepConfig, "sampler": SamplerConfig, "replicas": ReplicaConfig,
         "evaluation": EvalConfig},
    )  # fmt: skip
    cfg = override(
        sections["sweep"], alphas=args.alphas, scales=args.scales, num_samples=args.num_samples,
        seed=args.seed, target_rate=args.target_rate, cpus_per_trial=args.cpus_per_trial,
        include_ddim=False if args.no_ddim else None, target_above_p99=args.target_above_p99,
        max_holdout=args.max_holdout,
    )  # fmt: skip
    ecfg = override(
        sections["evaluation"], num_members=args.num_members, num_nonmembers=args.num_nonmembers,
        seed=cfg.seed,
    )  # fmt: skip
    sampler = override(sections["sampler"], steps=args.steps, allow_unfit=args.allow_unfit or None)
    replicas = override(sections["replicas"], threshold=args.threshold)
    from pipeline.data.checkpoints import preflight_models
    from pipeline.data.handle import open_dataset
    from pipeline.data.storage import open_store
    from pipeline.data.subsets import pick_images
    from pipeline.evaluation.evaluate import holdout_similarities, run_sets, sample_only_attack
    from pipeline.evaluation.folder_quality import quality_evaluator
    from pipeline.evaluation.inputs import check_run, run_inputs
    from pipeline.evaluation.report import merge_report, require_inputs
    from pipeline.evaluation.sweep import make_points, run_sweep
    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.replica_index import LazyReplicaIndex, ensure_replica_index

    pairs = [(a, s) for a in cfg.alphas for s in cfg.scales]
    make_points(pairs)  # bad knobs fail before anything starts
    store = open_store(args.store, args.s3_endpoint, create=False)
    ds = open_dataset(store, args.dataset)  # its manifest read once, passed down
    # the run's models and the dataset they were trained on, before any work (no stored samples read)
    checked = check_run(store, args.run, ds, samplers=())
    # missing or unfit models fail here, before the domain CNN trains or the index is built
    preflight_models(
        store, f"models/{args.run}/denoiser", f"models/{args.run}/classifier",
        dataclasses.replace(sampler, sampler="cpsample"),
    )  # fmt: skip
    # the domain CNN trains on a seeded subset of the held-out images, never the whole split
    holdout, _ = pick_images(store, ds.split("holdout"), 20_000, cfg.seed, manifest=ds.manifest)
    # digits: the domain CNN; an image folder: the held-out-trained encoder (+ label subfolders)
    evaluator, _ = quality_evaluator(holdout, cfg.quality_epochs, cfg.seed, progress=True)
    init_ray()
    # the held-out reference of the threshold-free shares, in the replica index the sweep uses
    sidecar = ensure_replica_index(store, args.dataset, replicas)
    inputs = run_inputs(checked["models"], checked["data"], None, sidecar)
    require_inputs(store, args.run, inputs)
    index = LazyReplicaIndex(store, sidecar, replicas)
    holdout_sims = holdout_similarities(store, ds, index, cfg.max_holdout, cfg.seed)
    attack = None
    if not args.no_attack:
        attack = sample_only_attack(run_sets(store, args.run, ds, ecfg))
    result = run_sweep(
        store, args.run, ds, pairs, cfg.num_samples, cfg.seed, evaluator,
        cfg.target_rate, sampler, replicas, cfg.include_ddim, cfg.cpus_per_trial,
        holdout_sims=holdout_sims, attack=attack, target_above_p99=cfg.target_above_p99,
    )  # fmt: skip
    merge_report(store, args.run, {"sweep": result}, inputs=inputs)
    keys = ("label", "replication_rate", "above_holdout_p95", "above_holdout_p99", "mia_auc",
            "quality")  # fmt: skip
    table = [{k: p[k] for k in keys if k in p} for p in result["points"]]
    print(json.dumps({"points": table, "recommended": result.get("recommended")}, indent=2))
    print(f"plot: {store.uri_of('reports', args.run, result['figure'])}")


if __name__ == "__main__":
    run_main(main)

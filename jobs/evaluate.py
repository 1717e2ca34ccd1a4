"""Evaluate a run: FID (local Inception weights) and membership-inference attacks, into its report.

    python jobs/evaluate.py --store demo-out --run demo [--inception-weights pt_inception-2015-12-05-6726825d.pth]

Attack 1: reconstruction loss (Matsumoto et al. 2023); attack 2: SecMI t-error (Duan et al. 2023);
PIA (Kong et al. 2024, proximal initialisation); attack 3: similarity to the nearest generated
sample (when samples/<run>/<sampler> exist). Each against
plain DDIM and the CPSample classifier-corrected noise estimate: ROC AUC, TPR at 1% FPR, permutation
p-value. Members are data/<dataset>/train, non-members data/<dataset>/holdout. Results are merged into
reports/<run>/report.json (keys "fid", "membership_inference", "threshold_free" and "extraction":
Carlini et al. 2023's extraction criterion per sampler and for held-out images), report.md and
roc_*.png. FID needs the standard FID Inception weights as a local file; nothing is downloaded.

Before any work the inputs are checked: every sample shard must have been drawn by models/<run>/
(the digests its records carry), and the denoiser must have been trained on data/<dataset> (its
provenance's manifest digest); CPSample's alpha and scale are the ones its samples record. A stale
sample folder (models retrained since), a wrong --dataset, or a report made from other inputs exits
2 naming what differs. report.json's "inputs" names the models, data, samples, index and version.

Threshold-free replication ("threshold_free"; --no-shares skips it): the held-out real images'
nearest-training similarity (a seeded subset of at most --max-holdout of them, searched in the stored
replica index, built when missing) gives a p95 and a p99; each sampler's share of samples above them
is reported (real images: 5% / 1% by construction).

Every sampler folder is streamed, never held: FID's Inception features come from a Ray Data actor
pool (--feature-actors, one GPU each with --use-gpu; a private local Ray without a GPU exits 2) that returns only
per-batch mean and covariance moments; the nearest-sample attack searches the samples chunk by chunk
(an exact FAISS index per chunk, a running top-1 per member and non-member); the threshold-free shares
fold per-shard counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_store_args, load_sections, override, run_main

from pipeline.core.config import ConfigError, EvalConfig, ReplicaConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument(
        "--inception-weights", help="local FID Inception weights (.pth state dict or .safetensors)"
    )
    p.add_argument("--config", help="YAML with 'evaluation' (EvalConfig) and 'replicas' sections")
    p.add_argument("--num-members", type=int)
    p.add_argument("--num-nonmembers", type=int)
    p.add_argument("--draws", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--alpha", type=float, help="CPSample alpha (default: the one its samples record)"
    )
    p.add_argument(
        "--scale", type=float, help="CPSample scale s (default: the one its samples record)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument(
        "--max-holdout", type=int, default=2000, help="held-out images setting the p95 / p99"
    )
    p.add_argument("--no-shares", action="store_true", help="skip the threshold-free shares")
    p.add_argument(
        "--use-gpu", action="store_true",
        help="one GPU per FID feature actor (a cluster adds GPU nodes for them); exits 2 when the job's own local Ray has no GPU",
    )  # fmt: skip
    p.add_argument("--feature-actors", type=int, default=1, help="FID feature actors (Ray Data)")
    args = p.parse_args()
    sections = load_sections(args.config, {"evaluation": EvalConfig, "replicas": ReplicaConfig})
    cfg = override(
        sections["evaluation"], num_members=args.num_members, num_nonmembers=args.num_nonmembers,
        draws=args.draws, seed=args.seed,
    )  # fmt: skip
    if args.max_holdout < 1:
        raise ConfigError(f"--max-holdout must be >= 1, got {args.max_holdout}")
    if args.feature_actors < 1:
        raise ConfigError(f"--feature-actors must be >= 1, got {args.feature_actors}")
    import torch

    from pipeline.data.handle import open_dataset
    from pipeline.data.storage import open_store
    from pipeline.evaluation.evaluate import evaluate_run
    from pipeline.evaluation.fid import load_inception
    from pipeline.evaluation.inputs import check_run, run_inputs
    from pipeline.evaluation.report import merge_report, require_inputs

    torch.set_num_threads(max(1, args.threads))
    if args.inception_weights:
        load_inception(args.inception_weights)  # a wrong file fails before any work or write
    if args.inception_weights or args.use_gpu:  # FID's feature actors run on the Ray cluster
        from pipeline.fanout.features import require_gpus
        from pipeline.fanout.ray_init import init_ray

        init_ray()
        require_gpus(args.use_gpu)  # no GPU: exit 2 before any work
    store = open_store(args.store, args.s3_endpoint, create=False)
    ds = open_dataset(store, args.dataset)  # its manifest read once, the handle passed down
    # models, data and samples are checked before anything is built, run or written
    checked = check_run(store, args.run, ds)
    if checked["models"] is None:  # the attacks need the run's own models
        from pipeline.core.models import CheckpointError

        raise CheckpointError(
            f"model 'models/{args.run}/denoiser' is neither a local folder nor under {store.uri}: "
            "evaluate attacks the run's own models; train them, or pass the --run that has them"
        )
    index, sidecar = None, None
    if not args.no_shares:
        from pipeline.fanout.replica_index import LazyReplicaIndex, ensure_replica_index

        replicas = sections["replicas"]
        sidecar = ensure_replica_index(store, args.dataset, replicas, args.s3_endpoint)
        index = LazyReplicaIndex(store, sidecar, replicas)
    inputs = run_inputs(checked["models"], checked["data"], checked["samples"], sidecar)
    require_inputs(store, args.run, inputs)
    updates, figures = evaluate_run(
        store, args.run, ds, cfg, args.inception_weights, args.alpha, args.scale,
        replica_index=index, max_holdout=args.max_holdout, sidecar=sidecar, checked=checked,
        use_gpu=args.use_gpu, feature_actors=args.feature_actors,
    )  # fmt: skip
    merge_report(store, args.run, updates, figures, inputs=updates.pop("inputs"))
    mi = updates["membership_inference"]
    summary = {
        attack: {
            m: {k: r[k] for k in ("auc", "tpr_at_fpr", "p_value")} for m, r in mi[attack].items()
        }
        for attack in ("reconstruction", "secmi", "pia", "nn_distance")
    }
    out = {"fid": updates["fid"], "membership_inference": summary}
    out["extraction"] = {k: v for k, v in updates["extraction"].items() if k != "criterion"}
    if "threshold_free" in updates:
        out["threshold_free"] = updates["threshold_free"]
    print(json.dumps(out, indent=2))
    print(f"report: {store.uri_of('reports', args.run, 'report.md')}")


if __name__ == "__main__":
    run_main(main)

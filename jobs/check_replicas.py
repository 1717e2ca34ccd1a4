"""Find every sample's nearest training image with FAISS and report the replication rate.

    python jobs/check_replicas.py --store demo-out --run demo --dataset digits --sampler cpsample

Writes reports/<run>/replicas-<sampler>.jsonl (key, nn_key, nn_similarity, is_replicate), adds
nn_key/nn_similarity to each sample's <key>.json, and prints the replication statistics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_sections, override, run_main

from pipeline.config import ReplicaConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True)
    p.add_argument("--run", default="demo")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--sampler", choices=["ddim", "cpsample"], default="cpsample")
    p.add_argument("--config", help="YAML with a 'replicas' section")
    p.add_argument("--threshold", type=float)
    p.add_argument("--embedding", choices=["centred", "raw"])
    p.add_argument("--index", choices=["flat", "ivf"])
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--s3-endpoint")
    args = p.parse_args()
    cfg = override(
        load_sections(args.config, {"replicas": ReplicaConfig})["replicas"],
        threshold=args.threshold, embedding=args.embedding, index=args.index,
    )  # fmt: skip
    import ray

    from pipeline.ray_init import init_ray
    from pipeline.stages import check_replicas, train_index_spec
    from pipeline.storage import open_store

    store = open_store(args.store, args.s3_endpoint)
    init_ray()
    spec, _ = train_index_spec(store, args.dataset, cfg)
    stats, _ = check_replicas(
        store, args.run, f"samples/{args.run}/{args.sampler}", ray.put(spec), cfg, args.concurrency
    )
    print(json.dumps({"sampler": args.sampler, "threshold": cfg.threshold, **stats.to_dict()}))


if __name__ == "__main__":
    run_main(main)

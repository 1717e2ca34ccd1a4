"""Build the replica index of a dataset's training images once, and store it.

    python jobs/build_index.py --store demo-out --dataset digits
    python jobs/build_index.py --store s3://bucket/prefix --dataset synth1000000 --ray-cpus 8
    python jobs/build_index.py --store photos-out --dataset photos --embedding module:/models/sscd.pt

Embeds data/<dataset>/train with Ray tasks over groups of shards (one index part each, at most
--rows-per-task rows) and writes indexes/<dataset>/<embedding>/<kind>/ (the FAISS index or its parts,
the training images' uint8 rows and keys per part, the split's mean image) with sidecar.json last: the embedding, dims, parameters, the dataset manifest's digest,
build time, measured recall@1 and replicate-decision agreement, and a build id. Up to
--exact-max-images training images the index is exact (IndexFlatIP); above, PCA + IVF with exact
re-ranking of the top candidates (--index flat|ivf forces a kind). A valid stored index (same manifest
digest, format and parameters) is reused unless --rebuild; --use-gpu makes k-means, module
embeddings and the measurement's search request one GPU each; check_replicas and guard sampling load it. With
--embedding module:PATH (a local TorchScript file) the folder is indexes/<dataset>/module-<sha256[:12]>/
and the sidecar records the file's sha256: changed weights make the stored index stale (rebuilt).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_embedding_args,
    add_s3_endpoint_arg,
    embedding_overrides,
    load_sections,
    override,
    run_main,
)

from pipeline.core.config import ReplicaConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--store", required=True, help="store root: a local folder or s3://bucket/prefix"
    )
    p.add_argument("--dataset", default="digits", help="shards under data/<dataset>/train")
    p.add_argument("--config", help="YAML with a 'replicas' section")
    add_embedding_args(p)
    p.add_argument("--index", choices=["auto", "flat", "ivf"])
    p.add_argument("--exact-max-images", type=int)
    p.add_argument("--nlist", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--pca-dims", type=int)
    p.add_argument("--ivf-codec", choices=["flat", "sq8"])
    p.add_argument("--rerank-k", type=int)
    p.add_argument("--threshold", type=float)
    p.add_argument("--rows-per-task", type=int, help="rows per index part (one build task each)")
    p.add_argument(
        "--use-gpu", action="store_true", default=None,
        help="k-means, module embeddings and searches ask Ray for GPUs (the autoscaler adds GPU nodes)",
    )  # fmt: skip
    p.add_argument("--rebuild", action="store_true", help="build even when a valid index is stored")
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (ignored under RAY_ADDRESS)")
    add_s3_endpoint_arg(p)
    args = p.parse_args()
    cfg = override(
        load_sections(args.config, {"replicas": ReplicaConfig})["replicas"],
        index=args.index, exact_max_images=args.exact_max_images,
        nlist=args.nlist, nprobe=args.nprobe, pca_dims=args.pca_dims, ivf_codec=args.ivf_codec,
        rerank_k=args.rerank_k, threshold=args.threshold, rows_per_task=args.rows_per_task,
        use_gpu=args.use_gpu, **embedding_overrides(args),
    )  # fmt: skip
    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.replica_index import build_replica_index, ensure_replica_index

    store = open_store(args.store, args.s3_endpoint)
    init_ray(num_cpus=args.ray_cpus)
    if args.rebuild:
        sidecar = build_replica_index(store, args.dataset, cfg, s3_endpoint=args.s3_endpoint)
    else:
        sidecar = ensure_replica_index(store, args.dataset, cfg, args.s3_endpoint)
    print(json.dumps({k: v for k, v in sidecar.items() if k != "parts"}))


if __name__ == "__main__":
    run_main(main)

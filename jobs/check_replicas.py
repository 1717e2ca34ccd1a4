r"""Find every sample's nearest training image with FAISS and report the replication rate.

    python jobs/check_replicas.py --store demo-out --run demo --dataset digits --sampler cpsample
    python jobs/check_replicas.py --store s3://bucket/batch-42 --run batch-42 --index ivf --nprobe 64
    python jobs/check_replicas.py --store photos-out --run r1 --dataset photos \
        --embedding module:/models/sscd_disc_mixup.torchscript.pt --embedding-size 288 --threshold 0.5

--embedding module:PATH embeds with a local TorchScript file (e.g. SSCD for photographs: its weights
are CC-BY-NC, so bring your own; nothing is downloaded); the default --threshold 0.97 is for centred
pixels only, on SSCD features the literature calls a copy at cosine > 0.5 (Somepalli et al. 2023).

Loads the stored replica index of data/<dataset>/train (indexes/<dataset>/<embedding>/<kind>/, built
once by jobs/build_index.py, or here when missing or stale): exact IndexFlatIP up to
--exact-max-images training images, else PCA + IVF whose top --rerank-k candidates are re-ranked by
the exact similarity (--index flat|ivf forces a kind), its recall@1 and decision agreement measured
against exact brute force on at most min(--recall-queries, 512) samples spread over the shards.
Scores samples/<run>/<sampler>/ with a Ray Data actor pool (--concurrency actors, each loading the
index; --use-gpu: each asks Ray for a GPU, so an autoscaling cluster adds GPU nodes, and uses
faiss-gpu when present). Per sample shard an actor writes, under reports/<run>/replicas-<sampler>/,
<shard>.jsonl (key, nn_key, nn_similarity, is_replicate) and <shard>.summary.json (counts, a
fixed-bin histogram, counts above the held-out p95/p99 and the threshold, the --pairs-k closest
pairs), and adds nn_key and nn_similarity to each sample's <key>.json in the shard; the driver
folds the summaries only.
Then: the similarity histogram (from the folded counts), a grid of the --pairs-k closest pairs, and
the statistics merged into report.json ("per_sample": "replicas-<sampler>/"). A killed or repeated
check resumes shard by shard: a shard whose summary records the same index build, threshold,
held-out percentiles, search settings, samples and shard bytes is not scored again.

Before anything is built or scored, every shard's first record is checked: all shards were drawn from the
same inputs, by models/<run>/ where the run has models there, whose denoiser was trained on
data/<dataset> (its provenance's manifest digest); and the report's "inputs" name the same models,
data, samples and index. Otherwise it exits 2 naming what differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_embedding_args,
    add_store_args,
    embedding_overrides,
    load_sections,
    override,
    run_main,
)

from pipeline.core.config import ConfigError, ReplicaConfig


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_store_args(p)
    p.add_argument("--sampler", choices=["ddim", "cpsample", "amg"], default="cpsample")
    p.add_argument("--config", help="YAML with a 'replicas' section")
    p.add_argument("--threshold", type=float)
    add_embedding_args(p)
    p.add_argument("--index", choices=["auto", "flat", "ivf"])
    p.add_argument("--exact-max-images", type=int)
    p.add_argument("--pca-dims", type=int)
    p.add_argument("--rerank-k", type=int)
    p.add_argument("--nlist", type=int)
    p.add_argument("--nprobe", type=int)
    p.add_argument("--recall-queries", type=int)
    p.add_argument("--pairs-k", type=int)
    p.add_argument(
        "--use-gpu",
        action="store_true",
        default=None,
        help="each scoring actor requests a GPU (faiss-gpu index if present)",
    )
    p.add_argument("--concurrency", type=int, default=1)
    args = p.parse_args()
    cfg = override(
        load_sections(args.config, {"replicas": ReplicaConfig})["replicas"],
        threshold=args.threshold, index=args.index, nlist=args.nlist,
        nprobe=args.nprobe, recall_queries=args.recall_queries, pairs_k=args.pairs_k,
        use_gpu=args.use_gpu, exact_max_images=args.exact_max_images, pca_dims=args.pca_dims,
        rerank_k=args.rerank_k, **embedding_overrides(args),
    )  # fmt: skip
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {args.concurrency}")
    from pipeline.data.imageset import DataError
    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray
    from pipeline.orchestration.replica_report import replica_check_report

    store = open_store(args.store, args.s3_endpoint)
    if not store.listdir("samples", args.run, args.sampler):
        raise DataError(f"no sample shards under {store.uri_of('samples', args.run, args.sampler)}")
    init_ray()
    summary = replica_check_report(
        store, args.run, args.dataset, args.sampler, cfg, args.concurrency, args.s3_endpoint
    )
    print(json.dumps({"sampler": args.sampler, **summary}))


if __name__ == "__main__":
    run_main(main)

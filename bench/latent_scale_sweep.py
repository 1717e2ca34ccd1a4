"""CPSample's scale in latent space: sample a finished latent demo's models at other (alpha, s).

    python bench/latent_scale_sweep.py --out lat-out --points 0.5,5 0.5,10 0.5,20 0.5,30 0.5,40
    python bench/latent_scale_sweep.py --out lat-out --text-cond --points 0.5,5 0.5,30

Reads the store a ``jobs/demo.py --scenario latent --out lat-out [--seed N]`` run wrote (``--seed``
must be that run's) and, per point, samples the demo's seeds and prompts into
``samples/sweep-a<alpha>-s<s>[-tc]/`` (s = 0: plain DDIM), checks replicas against the private pixel
digits and prints one JSON line: copies, mean nearest similarity, the digit CNN's quality and prompt
agreement. ``--text-cond`` first trains a classifier that also sees the pooled caption embedding
(``models/latent-tc/classifier``: the demo's arch, steps and bits) and guides with it. The README's
latent sweep and text-conditioning rows came from these commands on the seed-0 demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="a finished latent demo's store")
    p.add_argument("--seed", type=int, default=0, help="the demo's --seed")
    p.add_argument("--points", nargs="+", required=True, help="alpha,scale pairs")
    p.add_argument(
        "--text-cond", action="store_true", help="guide with a text-conditioned classifier"
    )
    args = p.parse_args()

    import numpy as np
    import ray
    import torch

    from pipeline.core.latent import TextGuidance
    from pipeline.data.imageset import images_to_tensor
    from pipeline.data.shards import read_image_shards
    from pipeline.data.storage import open_store
    from pipeline.evaluation.domain import train_domain_evaluator
    from pipeline.fanout.latent_sampling import latent_family, read_captions
    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.replica_index import ensure_replica_index, index_spec
    from pipeline.fanout.sampling import run_sampling
    from pipeline.orchestration.latent_demo import (
        DATASET,
        LATENTS,
        RUN,
        latent_config,
        prompt_digits,
    )
    from pipeline.orchestration.stages import check_replicas, train_classifier

    cfg = latent_config(args.seed)
    store = open_store(args.out, create=False)
    init_ray(num_cpus=cfg.ray_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = False
    model, classifier, tag = f"models/{RUN}/sd", f"models/{RUN}/classifier", ""
    if args.text_cond:
        run = train_classifier(
            store, f"{RUN}-tc", LATENTS, cfg.classifier_arch, cfg.classifier, cfg.ray_cpus,
            model=model, text_cond=True,
        )  # fmt: skip
        fit = {k: v for k, v in run["metrics"].items() if k != "data"}
        print(json.dumps({"text_cond_classifier": fit}), flush=True)
        classifier, tag = f"models/{RUN}-tc/classifier", "-tc"
    text = TextGuidance(tuple(read_captions(store, LATENTS, "train", cfg.num_train)), cfg.cfg_scale)
    ref = index_spec(
        store, DATASET, cfg.replicas, ensure_replica_index(store, DATASET, cfg.replicas)
    )
    held = read_image_shards(store, f"data/{DATASET}/holdout")
    evaluator = train_domain_evaluator(
        held.to_tensor(), torch.tensor(held.labels), cfg.quality_epochs, seed=cfg.seed
    )
    for point in args.points:
        alpha, scale = (float(v) for v in point.split(","))
        t0, kind = time.time(), "ddim" if scale == 0 else "cpsample"
        scfg = dataclasses.replace(
            cfg.sampler, sampler=kind, seed=cfg.seed, alpha=alpha, scale=scale
        )
        name = f"sweep-a{alpha}-s{scale}{tag}"
        out = run_sampling(
            store, name, scfg, model, classifier if scale else None,
            concurrency=cfg.sample_concurrency, cpus_per_actor=1, family=latent_family(text),
        )  # fmt: skip
        stats, rows = check_replicas(store, name, out["folder"], ref, cfg.replicas, name=kind)
        drawn = read_image_shards(store, out["folder"])
        x = images_to_tensor(drawn.images)
        with torch.no_grad():
            digits = torch.cat([evaluator.model(b).argmax(-1) for b in x.split(512)]).numpy()
        line = {
            "alpha": alpha, "scale": scale, "text_cond": args.text_cond,
            "replication": stats.replication_rate,
            "mean_nn": float(np.mean([r["nn_similarity"] for r in rows])),
            "fired": out["guidance_fired_fraction"], **evaluator.quality(x),
            "prompt_agreement": float((digits == prompt_digits(drawn.meta or [{}] * len(drawn))).mean()),
            "seconds": round(time.time() - t0, 1),
        }  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()

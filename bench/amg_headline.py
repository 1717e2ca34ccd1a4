"""AMG (Anti-Memorization Guidance, pipeline.core.amg) against DDIM and CPSample on the headline's
memorising 8x8 model, on the same seeds; and the time per sample relative to DDIM.

    python bench/amg_headline.py --points 0.97,100 0.97,300 0.97,1000 0.9,300
    python bench/amg_headline.py --seed-start 20000 --points 0.97,300
    python bench/amg_headline.py --timing 0.97,300

Trains the models of :mod:`tests.headline_models` (a UNet that copies its 8 training digits, and the
CPSample classifier; a few minutes on one CPU thread), then draws 128 samples per sampler (20 DDIM
steps, one thread): plain DDIM, CPSample at the project's default knobs (alpha 0.5, s 5) and AMG at
each ``threshold,scale`` point, its nearest-neighbour search being the replica rule's (centred-pixel
cosine, exact FAISS). One JSON line per sampler: copies (share >= 0.97), mean nearest similarity,
shares above the held-out p95/p99, steps fired, and the digit CNN's quality (confident fraction,
Fréchet distance to the held-out images; pipeline.evaluation.domain). ``--timing`` instead times
DDIM, AMG at that point and CPSample, interleaved, best of 5.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--points", nargs="*", default=["0.97,300"], help="amg threshold,scale pairs")
    p.add_argument("--seed-start", type=int, default=10_000, help="the first of 128 sample seeds")
    p.add_argument("--timing", help="time DDIM, AMG at this threshold,scale and CPSample")
    args = p.parse_args()

    import numpy as np
    import torch

    from pipeline.core.amg import amg_guidance
    from pipeline.core.guidance import cpsample_guidance
    from pipeline.core.sampler import sample, unet_denoiser
    from pipeline.evaluation.domain import train_domain_evaluator
    from tests.headline_models import (
        ALPHA,
        NUM_SAMPLES,
        SAMPLE_STEPS,
        SCALE,
        T_MAX,
        ReplicaScorer,
        train_headline_models,
    )  # fmt: skip

    torch.set_num_threads(1)
    h = train_headline_models()
    scorer = ReplicaScorer(h.train)
    nearest, centre = scorer.amg_parts(h.train)

    den = unet_denoiser(h.unet, h.schedule)
    seeds = list(range(args.seed_start, args.seed_start + NUM_SAMPLES))
    cps = cpsample_guidance(h.classifier, ALPHA, SCALE, "x_t", T_MAX)

    def draw(guidance):
        return sample(den, h.schedule, seeds, (1, 8, 8), SAMPLE_STEPS, guidance=guidance)

    if args.timing:
        thr, s = (float(v) for v in args.timing.split(","))
        runs = {"ddim": None, "amg": amg_guidance(nearest, centre, thr, s), "cpsample": cps}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(5):
            for name, g in runs.items():
                t0 = time.perf_counter()
                draw(g)
                best[name] = min(best[name], time.perf_counter() - t0)
        for name, v in best.items():
            ms = v / len(seeds) * 1e3
            print(json.dumps({"sampler": name, "ms_per_sample": round(ms, 2),
                              "relative_to_ddim": round(v / best["ddim"], 2)}))  # fmt: skip
        return

    held = h.holdout.to_tensor()
    held_sims = scorer.nn_similarity(held)[0]
    p95, p99 = np.quantile(held_sims, 0.95), np.quantile(held_sims, 0.99)
    evaluator = train_domain_evaluator(held, torch.tensor(h.holdout.labels), seed=0)

    def report(name: str, out) -> None:
        s = scorer.nn_similarity(out.images)[0]
        q = evaluator.quality(out.images)
        print(json.dumps({
            "sampler": name, "copies": float((s >= scorer.threshold).mean()),
            "mean_nn_similarity": round(float(s.mean()), 4),
            "above_heldout_p95": float((s > p95).mean()), "above_heldout_p99": float((s > p99).mean()),
            "fired_fraction": round(float(out.fired_fraction.mean()), 3),
            "confident_fraction": round(q["confident_fraction"], 3), "fd_digitcnn": round(q["fd"], 1),
        }), flush=True)  # fmt: skip

    report("ddim", draw(None))
    report(f"cpsample alpha {ALPHA} s {SCALE}", draw(cps))
    for point in args.points:
        thr, s = (float(v) for v in point.split(","))
        report(f"amg threshold {thr} s {s}", draw(amg_guidance(nearest, centre, thr, s)))


if __name__ == "__main__":
    main()

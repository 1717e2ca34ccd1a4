"""The samplers side by side on another set of seeds, in a finished demo's store.

    python jobs/demo.py --out demo-out                  # its report holds the seed-0 table
    python jobs/compare.py --store demo-out --seed 1    # the same models, the next sampling seeds
    python jobs/compare.py --store dup-out --seed 1 --contenders ddim cpsample guard

Plain DDIM, CPSample, the guard (DDIM with rejection against the training set), AMG and CPSample with
the guard, each on the same seeds (the demo's sampling seed plus --seed), with the demo's models,
replica index, threshold and quality evaluator: copies, shares above the held-out p95/p99, quality,
time per sample relative to DDIM, and what each needs at sampling time. Works on the pixel demo
(`--data` folders too) and the duplicates scenario. Writes reports/<run>/comparison-seed<seed>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_s3_endpoint_arg, run_main

from pipeline.core.config_eval import CONTENDER_NAMES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="a finished demo's --out (folder or s3://)")
    p.add_argument(
        "--seed",
        type=int,
        default=1,
        help="offset to the demo's sampling seed (default 1; 0 resamples the demo's own seeds)",
    )
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDER_NAMES,
        help="the samplers (default: the demo's compare.contenders; ddim is always one)",
    )
    p.add_argument("--num-samples", type=int, help="samples per sampler (default: the demo's)")
    add_s3_endpoint_arg(p)
    args = p.parse_args(argv)

    from pipeline.core.config import CompareConfig, ConfigError, from_dict, to_dict
    from pipeline.orchestration.compare_store import compare_demo_store

    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")
    overrides = {}
    if args.contenders:
        chosen = {"ddim", *args.contenders}
        overrides["contenders"] = [n for n in CONTENDER_NAMES if n in chosen]
    if args.num_samples is not None:
        overrides["num_samples"] = args.num_samples
    from_dict(CompareConfig, {**to_dict(CompareConfig()), **overrides}, "compare")  # fail early
    section, uri = compare_demo_store(args.store, args.seed, overrides, args.s3_endpoint)
    keep = ("name", "copies", "above_holdout_p95", "above_holdout_p99", "time_vs_ddim")
    for row in section["rows"]:
        print(json.dumps({k: row.get(k) for k in keep}))
    print(f"report: {uri}")


if __name__ == "__main__":
    run_main(main)

"""The whole CPSample pipeline end to end on embedded defaults (local Ray, local store).

    python jobs/demo.py --out demo-out            # digits, 10-13 minutes on 2 cores
    python jobs/demo.py --out /tmp/q --quick      # tiny configuration for tests (< 3 minutes)
    python jobs/demo.py --out out --data ./my_images --seed 1
    python jobs/demo.py --out dup-out --scenario duplicates   # duplicated training images
    python jobs/demo.py --out lat-out --scenario latent       # a latent text-to-image model

Writes data/, models/, samples/, reports/ and report.json under --out (DESIGN.md sections 4-5).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_main

from pipeline.core.config import DemoConfig, from_dict, load_yaml, to_dict
from pipeline.core.config_eval import CONTENDER_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", required=True, help="store root: a local folder (created) for every output"
    )
    p.add_argument(
        "--data",
        help="an image folder (PNG/JPEG, any size, grayscale or RGB) instead of the digits",
    )
    p.add_argument("--quick", action="store_true", help="tiny configuration for tests")
    p.add_argument(
        "--scenario",
        choices=("memorise", "duplicates", "latent"),
        default="memorise",
        help="memorise: the denoiser trains on 64 digits until it copies them (default); "
        "duplicates: all the digits with 16 pictures repeated 101 times as near-duplicates, "
        "comparing DDIM, CPSample with key bits and CPSample with cluster bits; latent: a small "
        "text-to-image latent diffusion model (VAE, frozen CLIP text encoder, conditional UNet) "
        "fine-tuned on 64 captioned digits, DDIM and CPSample with classifier-free guidance",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="offset to every seed: the split, both models' training, the classifier's random "
        "labels and sampling (default 0: the configured seeds)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard what an earlier demo with other settings left in --out (without it: exit 2)",
    )
    p.add_argument(
        "--config",
        help="YAML file with DemoConfig fields (unknown keys are rejected); with --scenario "
        "duplicates its fields override the scenario's settings",
    )
    p.add_argument("--alpha", type=float, help="CPSample confidence threshold, in (0, 0.5]")
    p.add_argument("--scale", type=float, help="CPSample guidance scale s, >= 0")
    p.add_argument("--num-samples", type=int, help="samples per sampler")
    p.add_argument(
        "--compare",
        nargs="+",
        choices=(*CONTENDER_NAMES, "none"),
        help="the samplers of the side-by-side table (default: all five; 'none' skips it; "
        "ddim is always one of them); not in the latent scenario",
    )
    p.add_argument(
        "--compare-samples", type=int, help="samples per sampler in the side-by-side table"
    )
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data progress bars")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """The DemoConfig (memorise, duplicates) or LatentDemoConfig (latent) the flags ask for."""
    from pipeline.orchestration.demo import quick_config, with_seed

    if args.scenario != "memorise" and args.data:
        from pipeline.core.config import ConfigError

        raise ConfigError(f"--scenario {args.scenario} runs on the digits; drop --data")
    if args.scenario == "latent":
        from pipeline.orchestration.latent_config import LatentDemoConfig, latent_config

        cfg = latent_config(args.seed, args.quick)
        if args.config:
            from pipeline.orchestration.latent_config import offset_seeds

            cfg = offset_seeds(load_yaml(LatentDemoConfig, args.config), args.seed)
    elif args.scenario == "duplicates":
        from pipeline.orchestration.duplicates import duplicates_config

        cfg = duplicates_config(0 if args.config else args.seed, args.quick)
        if args.config:  # the scenario's settings, the file's fields over them
            cfg = with_seed(over_scenario(cfg, args.config), args.seed)
    elif args.config:
        cfg = with_seed(load_yaml(DemoConfig, args.config), args.seed)
    else:
        cfg = with_seed(quick_config() if args.quick else DemoConfig(), args.seed)
    overrides = {
        k: v
        for k, v in (
            ("alpha", args.alpha),
            ("scale", args.scale),
            ("num_samples", args.num_samples),
        )
        if v is not None
    }
    if overrides:
        cfg.sampler = from_dict(type(cfg.sampler), {**to_dict(cfg.sampler), **overrides})
    if args.compare is not None or args.compare_samples is not None:
        if args.scenario == "latent":
            from pipeline.core.config import ConfigError

            raise ConfigError("--compare and --compare-samples are for the pixel scenarios")
        compare = to_dict(cfg.compare)
        if args.compare is not None:
            names = [] if "none" in args.compare else ["ddim", *args.compare]
            compare["contenders"] = [n for n in CONTENDER_NAMES if n in names]
        if args.compare_samples is not None:
            compare["num_samples"] = args.compare_samples
        cfg.compare = from_dict(type(cfg.compare), compare, "compare")
    return cfg


def over_scenario(base: DemoConfig, path: str) -> DemoConfig:
    """``base`` (the duplicates scenario's config) with the YAML file's fields over it, sections
    merged field by field: a file without a ``duplicates`` section runs the scenario with its
    defaults. ``duplicates: null`` would run the plain demo instead, so it is refused."""
    from pipeline.core.config import ConfigError
    from pipeline.core.config_base import read_yaml

    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if "duplicates" in data and data["duplicates"] is None:
        raise ConfigError(
            f"{path}: 'duplicates: null' turns the scenario off; drop it for --scenario duplicates"
        )
    return from_dict(DemoConfig, _merged(to_dict(base), data))


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def main() -> None:
    args = parse_args()
    cfg = build_config(args)
    if args.scenario == "latent":
        from pipeline.orchestration.latent_demo import run_latent_demo

        report = run_latent_demo(
            cfg, args.out, progress=not args.no_progress, overwrite=args.overwrite
        )
        for name, r in report["samplers"].items():
            print(
                f"{name:9s} replication {r['replication_rate']:.2%}  > held-out p99 "
                f"{r['above_holdout_p99']:.2%}  prompt agreement {r['prompt_agreement']:.2%}  "
                f"quality {r.get('quality')}"
            )
        c = report["vae_ceiling"]
        print(
            f"VAE ceiling: {c['share_above_threshold']:.2%} of private reconstructions are copies"
        )
        return
    if cfg.duplicates is not None:
        from pipeline.orchestration.duplicates import run_duplicates

        report = run_duplicates(
            cfg, args.out, progress=not args.no_progress, overwrite=args.overwrite
        )
        for name, r in report["samplers"].items():
            print(
                f"{name:17s} replication {r['replication_rate']:.2%} (duplicated "
                f"{r['replication_duplicated']:.2%}, unique {r['replication_unique']:.2%})  "
                f"> held-out p99 {r['above_holdout_p99']:.2%}  quality {r.get('quality')}"
            )
        return
    from pipeline.orchestration.demo import run_demo

    report = run_demo(
        cfg, args.out, args.data, progress=not args.no_progress, overwrite=args.overwrite
    )
    for name, r in report["samplers"].items():
        q = r.get("quality", {})
        print(
            f"{name:9s} replication {r['replication_rate']:.2%}  mean NN sim {r['mean_nn_similarity']:.4f}  {q}"
        )
    h = report["holdout_baseline"]
    print(
        f"held-out  replication {h['replication_rate']:.2%}  mean NN sim {h['mean_nn_similarity']:.4f}"
    )


if __name__ == "__main__":
    run_main(main)

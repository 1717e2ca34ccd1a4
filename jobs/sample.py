r"""Generate samples, plain DDIM or CPSample-protected, as WebDataset shards with a Ray Data actor pool.

    python jobs/sample.py --store demo-out --run demo --sampler cpsample --num-samples 512 --alpha 0.5 --scale 5
    python jobs/sample.py --store s3://bucket/batch-42 --denoiser /models/ddpm-cifar10-32 \
        --classifier models/demo/classifier --num-gpus-per-actor 0.5 --concurrency 8
    python jobs/sample.py --store demo-out --run demo --guard 0.9 --guard-budget 64 --dataset digits
    python jobs/sample.py --store demo-out --run demo --sampler amg --amg-threshold 0.97 --amg-scale 300 \
        --dataset digits

Each shard is one task with seeds derived from (seed, shard, index): the images do not depend on the
number of actors. Shards are written atomically to samples/<run>/<sampler>/; a rerun skips complete ones
(checked by the driver: the tar parses, its members carry this run's settings and their recorded count;
only the other shards go to actors, so a finished run's rerun starts none). Every sample
records the digests of the denoiser and classifier directories and of the sampler settings: a rerun
into a folder whose shards (any of them) were drawn from other models or settings exits 2 naming what
changed; --overwrite discards them instead. Every sample also records the plain sampler settings
("sampler_settings": alpha, scale, steps, eta, guard, ...), which evaluate reads back. The run's
report.json gets "inputs" (model digests, the samples' fingerprint); a report that describes other
models is refused before sampling, unless --overwrite, which starts it afresh.

Guard mode (--guard T): every sample is compared with the training images of --dataset (exact FAISS
search, mean-centred pixels by default); one at or above T is discarded and redrawn with a fresh derived
seed while the shard's --guard-budget lasts. No shipped sample is at or above T. The counts are merged
into reports/<run>/report.json.

Anti-Memorization Guidance (--sampler amg; Chen et al. 2024, its dissimilarity guidance, the baseline
pipeline/core/amg.py implements): at every step the predicted image is searched in the same stored
index of --dataset, and where its nearest training image is at or above --amg-threshold, the step is
steered down the gradient of that similarity with scale --amg-scale. It needs the training images at
sampling time; CPSample does not.

Latent text-to-image models (a diffusers Stable Diffusion directory, local or in the store):

    python jobs/sample.py --store s3://bucket/ft --run ft --model /models/sd-finetune \
        --classifier models/ft/classifier --prompts prompts.txt --cfg-scale 7.5 --use-gpu
    python jobs/sample.py --store demo-out --run latent --model models/latent/sd \
        --prompts-from digits-latents --sampler ddim

sample in latent space with classifier-free guidance (CPSample's gradient is taken on the latents),
decode with the VAE and write PNG samples, so check_replicas and evaluate read them as any others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    add_allow_unfit_arg,
    add_s3_endpoint_arg,
    load_sections,
    override,
    run_main,
)

from pipeline.core.config import SamplerConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True)
    p.add_argument("--run", default="demo")
    p.add_argument(
        "--denoiser", help="model dir or store-relative path (default models/<run>/denoiser)"
    )
    p.add_argument(
        "--classifier",
        help="classifier dir or store-relative path (default models/<run>/classifier)",
    )
    p.add_argument(
        "--model",
        help="a diffusers Stable Diffusion directory (unet/, vae/, text_encoder/, tokenizer/, "
        "scheduler/), local or store-relative: sample its latents and decode (instead of --denoiser)",
    )
    p.add_argument("--prompts", help="latent models: a text file, one prompt per line")
    p.add_argument(
        "--prompts-from", help="latent models: the captions of data/<DATASET>/train as prompts"
    )
    p.add_argument("--max-prompts", type=int, default=1000, help="captions read by --prompts-from")
    p.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--negative-prompt", default="", help="the unconditional prompt (default empty)")
    p.add_argument("--config", help="YAML with a 'sampler' section")
    p.add_argument("--sampler", choices=["ddim", "cpsample", "amg"])
    p.add_argument("--num-samples", type=int)
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--eta", type=float)
    p.add_argument("--alpha", type=float, help="confidence threshold, in (0, 0.5]")
    p.add_argument("--scale", type=float, help="guidance scale s, >= 0")
    p.add_argument(
        "--amg-threshold", type=float, help="amg: guide where the x0 NN similarity >= this"
    )
    p.add_argument("--amg-scale", type=float, help="amg: dissimilarity guidance scale, >= 0")
    p.add_argument("--seed", type=int)
    p.add_argument("--guard", type=float, help="reject samples with NN similarity >= this")
    p.add_argument("--guard-budget", type=int, help="regenerations allowed per shard")
    p.add_argument("--guard-embedding", choices=["centred", "raw"])
    p.add_argument(
        "--dataset", default="digits", help="training shards data/<dataset>/train (guard, amg)"
    )
    p.add_argument("--concurrency", type=int, default=1, help="number of sampling actors")
    p.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    p.add_argument(
        "--num-gpus-per-actor",
        type=float,
        default=None,
        help="GPUs per actor, fractions allowed (default: 1 if the cluster has GPUs, else 0)",
    )
    p.add_argument(
        "--use-gpu",
        action="store_true",
        help="one GPU per actor unless --num-gpus-per-actor says otherwise, requested even while "
        "the cluster has no GPU node yet (the autoscaler starts one)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard samples/<run>/<sampler> when it was drawn from other models or settings (and "
        "start the run's report afresh when it describes other inputs)",
    )
    add_allow_unfit_arg(p)
    add_s3_endpoint_arg(p)
    return p.parse_args()


def prompt_lines(args: argparse.Namespace) -> list[str] | None:
    """Check the latent-model flags and read ``--prompts FILE``: before the store is opened, so a bad
    flag or a missing file writes nothing. None for a pixel model or ``--prompts-from``."""
    from pipeline.core.config import ConfigError

    if args.model is None:
        if args.prompts or args.prompts_from:
            raise ConfigError("--prompts and --prompts-from are for latent models: add --model DIR")
        return None
    if args.denoiser:
        raise ConfigError("give either --model (a latent Stable Diffusion dir) or --denoiser")
    if bool(args.prompts) == bool(args.prompts_from):
        raise ConfigError(
            "a latent model needs exactly one of --prompts FILE or --prompts-from DATASET"
        )
    if not args.prompts:
        return None
    path = Path(args.prompts)
    if not path.exists() or path.is_dir():
        raise ConfigError(f"--prompts {args.prompts}: no such file (one prompt per line)")
    try:
        prompts = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--prompts {args.prompts}: cannot read it as text ({exc})") from None
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"--prompts {args.prompts}: a latent model needs at least one prompt")
    return prompts


def text_guidance(args: argparse.Namespace, store, prompts: list[str] | None):
    """The prompts (``prompts``, :func:`prompt_lines`, or the captions of ``--prompts-from``) and
    CFG scale of a latent model (--model), None for a pixel model."""
    from pipeline.core.latent import TextGuidance

    if args.model is None:
        return None
    if prompts is None:
        from pipeline.fanout.latent_sampling import read_captions

        prompts = read_captions(store, args.prompts_from, "train", args.max_prompts)
    return TextGuidance(tuple(prompts), args.cfg_scale, args.negative_prompt)


def main() -> None:
    args = parse_args()
    cfg = override(
        load_sections(args.config, {"sampler": SamplerConfig})["sampler"],
        sampler=args.sampler, num_samples=args.num_samples, samples_per_shard=args.samples_per_shard,
        batch_size=args.batch_size, steps=args.steps, eta=args.eta, alpha=args.alpha,
        scale=args.scale, seed=args.seed, guard=args.guard, guard_budget=args.guard_budget,
        guard_embedding=args.guard_embedding, allow_unfit=args.allow_unfit or None,
        amg_threshold=args.amg_threshold, amg_scale=args.amg_scale,
    )  # fmt: skip
    if cfg.sampler == "amg" and args.model is not None:
        from pipeline.core.config import ConfigError

        raise ConfigError("--sampler amg works on pixel models (--denoiser), not on --model")
    prompts = prompt_lines(args)  # bad flags and files fail before the store is created
    from pipeline.data.storage import open_store
    from pipeline.evaluation.inputs import check_samples, run_inputs
    from pipeline.evaluation.report import merge_report, require_inputs
    from pipeline.fanout.sampling import run_sampling

    store = open_store(args.store, args.s3_endpoint)
    text = text_guidance(args, store, prompts)
    family = None
    if text is not None:
        from pipeline.fanout.latent_sampling import latent_family

        family = latent_family(text)
    out = run_sampling(
        store, args.run, cfg, args.model or args.denoiser or f"models/{args.run}/denoiser",
        args.classifier or f"models/{args.run}/classifier", args.concurrency,
        args.num_cpus_per_actor, args.num_gpus_per_actor, args.s3_endpoint, args.dataset,
        overwrite=args.overwrite, use_gpu=args.use_gpu, family=family,
        precheck=lambda prov: require_inputs(store, args.run, run_inputs(prov), args.overwrite),
    )  # fmt: skip
    updates: dict = {"sampling": {cfg.sampler: out}}
    if "guard" in out:
        updates["samplers"] = {cfg.sampler: {"guard": out["guard"]}}
    # the report's inputs: these models and samples; --overwrite starts a report of other inputs afresh
    samples = {cfg.sampler: check_samples(store, out["folder"], None)}
    inputs = run_inputs(out["provenance"], None, samples)
    merge_report(store, args.run, updates, deep=True, inputs=inputs, restart=args.overwrite)
    print(
        f"{out['num_samples']} samples in {out['num_shards']} shards ({out['skipped_shards']} already complete) "
        f"under {store.uri_of(out['folder'])}; guidance fired fraction {out['guidance_fired_fraction']:.3f}"
    )
    if "guard" in out:
        g = out["guard"]
        print(
            f"guard: {g['rejected']} rejected and redrawn, {g['unfilled']} slots left empty (budget "
            f"{g['budget_per_shard']} per shard); guarantee: {g['guarantee']}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    run_main(main)

r"""Precompute the VAE latents and text embeddings of an image dataset once, on a Ray actor pool.

    python jobs/encode_latents.py --store out --dataset digits --model /models/tiny-sd \
        --caption-template "a handwritten {label}"
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".venv", ".git", "out"]}' \
        -- python jobs/encode_latents.py --store s3://bucket/cps --dataset laion-faces \
        --model models/sd15/sd --num-actors 8 --use-gpu --batch-size 64 --dtype float16

--model is a diffusers Stable Diffusion directory (vae/, text_encoder/, tokenizer/, unet/ configs;
only the VAE and the text encoder are loaded): a local folder, or a store path such as
models/sd15/sd, which every actor copies from the store (use a store path on a cluster). Images must
already have the model's size (make_shards --image-size): nothing is resized here.

Each input shard data/<dataset>/<split>/shard-NNNNNN.tar becomes a shard of the same name and
keys in data/<out-dataset>/<split>/: <key>.latent.npy (f * the VAE posterior mean, C x h x w,
--dtype), <key>.pooled.npy (D, float32), <key>.hidden.npy (L x D, float16), <key>.txt and
<key>.json (the input's JSON plus "caption"). The caption is <key>.txt, else "caption" in
<key>.json, else --caption-template filled from the JSON fields. manifest.json, written last, has a
"latent" section (scaling factor, shapes, dtypes, model digest, source dataset and manifest digest)
and the latents' size as image_size and channels. Input shards are checked against their manifest.

A rerun skips complete shards (each has a <shard>.provenance.json record: its sha256, the model
directory's digest, the settings' digest and the input shard's sha256) and re-encodes shards whose
input changed. Output made by another model or other settings (--dtype, --caption-template) exits 2
naming what changed: pick another --out-dataset, or --overwrite to delete the old latents first.
Bad input (a corrupt shard, a missing caption, another image size) exits 2 with the shard and key.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_s3_endpoint_arg, run_main

from pipeline.core.config import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--store", required=True, help="store root: a local folder or s3://bucket/prefix"
    )
    p.add_argument("--dataset", default="digits", help="image shards under data/<dataset>/")
    p.add_argument(
        "--model", required=True, help="Stable Diffusion directory: local or a store path"
    )
    p.add_argument(
        "--out-dataset", help="latent shards under data/<this> (default <dataset>-latents)"
    )
    p.add_argument("--splits", nargs="+", default=["train", "holdout"], metavar="SPLIT")
    p.add_argument(
        "--caption-template",
        help="caption of images without <key>.txt or a JSON 'caption', filled from the JSON "
        "fields, e.g. 'a handwritten {label}'",
    )
    p.add_argument("--num-actors", type=int, default=1, help="encoding actors (one GPU each)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="and torch threads on CPU")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward pass")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="of latents")
    p.add_argument(
        "--overwrite", action="store_true", help="delete data/<out-dataset> first, if it exists"
    )
    p.add_argument("--ray-cpus", type=int, help="CPUs of the local Ray (ignored under RAY_ADDRESS)")
    add_s3_endpoint_arg(p)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.ray_cpus is not None and args.ray_cpus < 1:
        raise ConfigError(f"--ray-cpus must be > 0, got {args.ray_cpus}")
    from pipeline.data.storage import open_store
    from pipeline.fanout.latents import encode_dataset

    store = open_store(args.store, args.s3_endpoint, create=False)
    # inputs, model and existing output are checked before Ray starts (under `ray job submit` it
    # joins the cluster through RAY_ADDRESS); a complete rerun starts no Ray at all
    out = encode_dataset(
        store, args.dataset, args.model, args.out_dataset, args.splits, args.caption_template,
        args.num_actors, args.use_gpu, args.batch_size, args.dtype, args.overwrite,
        args.s3_endpoint, args.cpus_per_actor, args.ray_cpus,
    )  # fmt: skip
    print(
        f"{out['images']} images in {out['shards']} shards under {out['manifest']} "
        f"({out['shards_encoded']} encoded, {out['shards_skipped']} already complete; "
        f"{out['images_per_s']:.1f} images/s)"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    run_main(main)

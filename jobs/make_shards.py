"""Turn an image source into train and holdout WebDataset shards (+ manifest.json) in a store.

python jobs/make_shards.py --store demo-out --source digits --num-train 64
python jobs/make_shards.py --store s3://bucket/prefix --source folder --path ./images --image-size 32
python jobs/make_shards.py --store out --source cifar10 --path ~/data/cifar10 [--download]
python jobs/make_shards.py --store out --source webdataset --path 'in/shard-{000000..000009}.tar'
python jobs/make_shards.py --store s3://bucket/prefix --dataset digits --verify

Shards go to data/<dataset>/{train,holdout}/shard-NNNNNN.tar, then data/<dataset>/manifest.json.
A rerun skips shards that are already complete (same sha256) and gives the same objects.
The S3 endpoint comes from --s3-endpoint or $AWS_ENDPOINT_URL; credentials from the AWS chain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_s3_endpoint_arg, run_main

from pipeline.core.config import ConfigError
from pipeline.data.datasets import (
    cifar10_source,
    digits_source,
    folder_source,
    split,
    webdataset_source,
)
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.shards import verify_dataset, write_dataset
from pipeline.data.storage import open_store

SOURCES = ("digits", "folder", "cifar10", "webdataset")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--source", choices=SOURCES, default="digits")
    p.add_argument(
        "--path",
        help="image folder (folder), CIFAR-10 root (cifar10), or shards: a path, s3:// URI, "
        "brace pattern or folder (webdataset)",
    )
    p.add_argument(
        "--download", action="store_true", help="let torchvision download CIFAR-10 (needs network)"
    )
    p.add_argument("--cifar-split", choices=["train", "test"], default="train")
    p.add_argument("--dataset", help="dataset name in the store (default: the source name)")
    p.add_argument(
        "--image-size",
        type=int,
        help="square size in pixels (default: 16 for digits and folder; the stored size for "
        "cifar10 and webdataset, which must then be the same for every image)",
    )
    p.add_argument("--num-train", type=int, default=64, help="training images; the rest held out")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/holdout split")
    p.add_argument(
        "--verify", action="store_true", help="only check an existing dataset against its manifest"
    )
    p.add_argument("--no-progress", action="store_true")
    add_s3_endpoint_arg(p)
    args = p.parse_args(argv)
    if args.image_size is not None and not 1 <= args.image_size <= 4096:
        raise ConfigError(f"--image-size must be in [1, 4096], got {args.image_size}")
    if args.shard_size <= 0:
        raise ConfigError(f"--shard-size must be > 0, got {args.shard_size}")
    if args.num_train <= 0:
        raise ConfigError(f"--num-train must be > 0, got {args.num_train}")
    if args.source in ("folder", "cifar10", "webdataset") and not args.path and not args.verify:
        raise ConfigError(f"--source {args.source} needs --path")
    return args


def load_source(args: argparse.Namespace) -> ImageSet:
    if args.source == "digits":
        return digits_source(args.image_size or 16)
    if args.source == "folder":
        return folder_source(args.path, args.image_size or 16)
    if args.source == "cifar10":
        images = cifar10_source(args.path, args.download, train=args.cifar_split == "train")
        if args.image_size not in (None, 32):
            raise ConfigError("CIFAR-10 images are 32x32: leave --image-size out or set it to 32")
        return images
    return webdataset_source(args.path, args.image_size, args.s3_endpoint)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = args.dataset or args.source
    store = open_store(args.store, args.s3_endpoint)  # a bad bucket or key fails before any work
    if args.verify:
        manifest = verify_dataset(store, data_folder(dataset))
        for name, s in manifest["splits"].items():
            print(f"{name}: {s['count']} images in {len(s['shards'])} shard(s), checksums OK")
        return
    train, holdout = split(load_source(args), args.num_train, args.seed)
    source = {"source": args.source, "path": args.path, "seed": args.seed}
    if args.source == "cifar10":
        source["cifar_split"] = args.cifar_split
    manifest = write_dataset(
        store, dataset, {"train": train, "holdout": holdout}, args.shard_size, source,
        progress=not args.no_progress,
    )  # fmt: skip
    for name, s in manifest["splits"].items():
        written = sum(w.startswith(f"{name}/") for w in manifest["written"])
        print(
            f"{name}: {s['count']} images in {len(s['shards'])} shard(s) "
            f"({written} written, {len(s['shards']) - written} already complete)"
        )
    print(f"manifest: {store.uri_of('data', dataset, 'manifest.json')}")


if __name__ == "__main__":
    run_main(main)

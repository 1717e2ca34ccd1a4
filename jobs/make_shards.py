"""Turn an image source into train and holdout WebDataset shards (+ manifest.json) in a store.

python jobs/make_shards.py --store demo-out --source digits --num-train 64
python jobs/make_shards.py --store s3://bucket/prefix --source folder --path ./images --image-size 32
python jobs/make_shards.py --store out --source cifar10 --path ~/data/cifar10 [--download]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_main

from pipeline.datasets import cifar10_source, digits_source, folder_source, split
from pipeline.stages import make_shards
from pipeline.storage import open_store


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--store", required=True, help="local folder or s3://bucket/prefix")
    p.add_argument("--source", choices=["digits", "folder", "cifar10"], default="digits")
    p.add_argument("--path", help="image folder (source=folder) or CIFAR-10 root (source=cifar10)")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download CIFAR-10 (needs network)"
    )
    p.add_argument("--dataset", help="dataset name in the store (default: the source name)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="seed of the train/holdout split")
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: $AWS_ENDPOINT_URL)")
    args = p.parse_args()
    if args.source == "digits":
        images = digits_source(args.image_size)
    elif args.source == "folder":
        if not args.path:
            raise ValueError("--source folder needs --path")
        images = folder_source(args.path, args.image_size)
    else:
        if not args.path:
            raise ValueError("--source cifar10 needs --path (the CIFAR-10 root)")
        images = cifar10_source(args.path, download=args.download)
    train, holdout = split(images, args.num_train, args.seed)
    store = open_store(args.store, args.s3_endpoint)
    manifest = make_shards(store, args.dataset or args.source, train, holdout, args.shard_size)
    for name, s in manifest["splits"].items():
        print(f"{name}: {s['count']} images in {len(s['shards'])} shard(s)")


if __name__ == "__main__":
    run_main(main)

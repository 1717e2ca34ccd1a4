"""Turn an image source into train and holdout WebDataset shards (+ manifest.json) in a store.

python jobs/make_shards.py --store demo-out --source digits --num-train 64
python jobs/make_shards.py --store out --source cifar10 --path ~/data/cifar10 [--download]
python jobs/make_shards.py --store s3://bucket/prefix --source folder --path s3://in/images --image-size 32
python jobs/make_shards.py --store out --source webdataset --path 'in/shard-{000000..000009}.tar'
python jobs/make_shards.py --store out --source synthetic --num-images 1000000 --image-size 32
python jobs/make_shards.py --store s3://bucket/prefix --dataset digits --verify
python jobs/make_shards.py --store out --source digits --num-train 1438 --duplicates 32:25

Shards go to data/<dataset>/{train,holdout}/shard-NNNNNN.tar, then data/<dataset>/manifest.json.
A rerun skips shards that are already complete (same sha256) and gives the same objects; a streamed
chunk whose completion record (data/<dataset>/.chunks/chunk-NNNNNN.json, put after its shards) matches
its inputs (paths, sizes and mtimes or ETags; index range; input tar) is skipped without reading them.
The S3 endpoint comes from --s3-endpoint or $AWS_ENDPOINT_URL; credentials from the AWS chain.

digits and cifar10 are small: read in memory, split by an exact seeded permutation (--num-train).
folder, webdataset and synthetic are streamed with one Ray task per chunk of --shard-size input
images (one per input tar for webdataset), which writes that chunk's train shard and holdout shard
(a folder is listed in pages of --page-size and planned as tasks free up, never held whole);
the split is a keyed hash of each key (--train-fraction, default 0.9; see
pipeline.data.sources.is_train_key). --num-train N there means a fraction N / (number of images)
(folder, synthetic), so about N training images; a WebDataset input refuses it. Ray: a private
local instance with --ray-cpus CPUs, or the cluster of $RAY_ADDRESS.

--duplicates K:M (digits, cifar10) adds M jittered near-duplicate copies of K training images to the
train split, after the split (held-out images are untouched), under new keys <key>-dupNNN: the
duplicated-data scenario of pipeline.data.duplicates. The manifest's source record keeps the truth
(copy key -> source key) under "duplicates". jobs/cluster_duplicates.py finds them again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_s3_endpoint_arg, run_main

from pipeline.core.config import ConfigError
from pipeline.data.datasets import cifar10_source, digits_source, split
from pipeline.data.duplicates import DuplicateSpec, add_near_duplicates
from pipeline.data.imageset import ImageSet
from pipeline.data.layout import data_folder
from pipeline.data.shards import verify_dataset, write_dataset
from pipeline.data.sources import (
    PAGE_SIZE,
    FolderSource,
    SyntheticSource,
    WebDatasetSource,
    write_sharded,
)
from pipeline.data.storage import open_store

SOURCES = ("digits", "folder", "cifar10", "webdataset", "synthetic")
STREAMED = ("folder", "webdataset", "synthetic")


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
        help="square size in pixels (default: 16 for digits and folder, 32 for synthetic; the "
        "stored size for cifar10 and webdataset, which must then be the same for every image)",
    )
    p.add_argument(
        "--num-train",
        type=int,
        help="training images, the rest held out (digits, cifar10: exactly, default 64; folder, "
        "synthetic: about, as the fraction N / number of images)",
    )
    p.add_argument(
        "--train-fraction",
        type=float,
        help="streamed sources: fraction of keys put in train by the keyed hash (default 0.9)",
    )
    p.add_argument("--num-images", type=int, help="synthetic: number of images to draw")
    p.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="images per shard (streamed sources: input images per chunk; each chunk gives one "
        "train and one holdout shard)",
    )
    p.add_argument(
        "--page-size",
        type=int,
        default=PAGE_SIZE,
        help="folder: input files listed per page; the driver holds about (chunks in flight + 1) x "
        "--shard-size + --page-size paths, never the whole listing",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the train/holdout split (and synthetic images)"
    )
    p.add_argument(
        "--duplicates",
        metavar="K:M",
        help="digits, cifar10: add M near-duplicate copies of each of K training images to the train "
        "split (the truth goes into the manifest)",
    )
    p.add_argument(
        "--duplicates-seed",
        type=int,
        help="seed of the duplicated images' pick and jitter (default: --seed)",
    )
    p.add_argument(
        "--ray-cpus",
        type=int,
        help="CPUs of the local Ray (default: all; ignored under RAY_ADDRESS)",
    )
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
    if args.page_size <= 0:
        raise ConfigError(f"--page-size must be > 0, got {args.page_size}")
    if args.num_train is not None and args.num_train <= 0:
        raise ConfigError(f"--num-train must be > 0, got {args.num_train}")
    if args.source in ("folder", "cifar10", "webdataset") and not args.path and not args.verify:
        raise ConfigError(f"--source {args.source} needs --path")
    if args.verify:
        if args.duplicates is not None:
            raise ConfigError("--duplicates writes a dataset: leave it out with --verify")
        return args
    if args.source == "synthetic":
        if args.num_images is None or args.num_images <= 0:
            raise ConfigError(f"--source synthetic needs --num-images > 0, got {args.num_images}")
    elif args.num_images is not None:
        raise ConfigError("--num-images is for --source synthetic only")
    if args.source in STREAMED:
        if args.num_train is not None and args.train_fraction is not None:
            raise ConfigError("give --num-train or --train-fraction, not both")
        if args.train_fraction is not None and not 0 < args.train_fraction < 1:
            raise ConfigError(f"--train-fraction must be in (0, 1), got {args.train_fraction}")
    elif args.train_fraction is not None:
        raise ConfigError(
            f"--train-fraction is for streamed sources {list(STREAMED)}; {args.source} splits "
            "exactly by --num-train"
        )
    if args.ray_cpus is not None and args.ray_cpus <= 0:
        raise ConfigError(f"--ray-cpus must be > 0, got {args.ray_cpus}")
    check_duplicates(args)
    return args


def check_duplicates(args: argparse.Namespace) -> None:
    """``args.duplicates`` parsed into a :class:`DuplicateSpec` (None without --duplicates)."""
    if args.duplicates is None:
        if args.duplicates_seed is not None:
            raise ConfigError("--duplicates-seed needs --duplicates K:M")
        return
    if args.source in STREAMED:
        raise ConfigError(
            f"--duplicates needs an in-memory source (digits, cifar10): --source {args.source} is "
            "streamed chunk by chunk, so no step sees the whole train split to copy images from"
        )
    args.duplicates = DuplicateSpec.parse(args.duplicates)


def load_source(args: argparse.Namespace) -> ImageSet:
    """An in-memory source: digits or cifar10."""
    if args.source == "digits":
        return digits_source(args.image_size or 16)
    images = cifar10_source(args.path, args.download, train=args.cifar_split == "train")
    if args.image_size not in (None, 32):
        raise ConfigError("CIFAR-10 images are 32x32: leave --image-size out or set it to 32")
    return images


def streamed_source(args: argparse.Namespace):
    """A streamed source: folder, webdataset or synthetic (checked before Ray starts)."""
    if args.source == "folder":
        return FolderSource(args.path, args.image_size or 16, args.s3_endpoint)
    if args.source == "webdataset":
        return WebDatasetSource(args.path, args.image_size, args.s3_endpoint)
    return SyntheticSource(args.num_images, args.image_size or 32, args.seed)


def write_streamed(args: argparse.Namespace, store, dataset: str, source) -> dict:
    from pipeline.fanout.ray_init import init_ray

    init_ray(num_cpus=args.ray_cpus)  # joins the cluster of `ray job submit` through RAY_ADDRESS
    fraction = (
        0.9 if args.train_fraction is None else args.train_fraction
    )  # unused with --num-train
    return write_sharded(
        store, dataset, source, shard_size=args.shard_size, train_fraction=fraction,
        seed=args.seed, num_train=args.num_train, progress=not args.no_progress,
        page_size=args.page_size,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dataset = args.dataset or args.source
    # a missing --path fails before the store folder is created
    streamed = streamed_source(args) if args.source in STREAMED and not args.verify else None
    store = open_store(args.store, args.s3_endpoint)  # a bad bucket or key fails before any work
    if args.verify:
        manifest = verify_dataset(store, data_folder(dataset))
        for name, s in manifest["splits"].items():
            print(f"{name}: {s['count']} images in {len(s['shards'])} shard(s), checksums OK")
        return
    if args.source in STREAMED:
        manifest = write_streamed(args, store, dataset, streamed)
    else:
        num_train = 64 if args.num_train is None else args.num_train
        train, holdout = split(load_source(args), num_train, args.seed)
        source = {"source": args.source, "path": args.path, "seed": args.seed}
        if args.source == "cifar10":
            source["cifar_split"] = args.cifar_split
        rule = {"rule": "permutation", "seed": args.seed, "num_train": len(train)}
        if args.duplicates is not None:  # after the split: the held-out images stay untouched
            seed = args.seed if args.duplicates_seed is None else args.duplicates_seed
            train, truth = add_near_duplicates(train, args.duplicates, seed)
            source["duplicates"] = {**args.duplicates.to_dict(), "seed": seed, "copies": truth}
        manifest = write_dataset(
            store, dataset, {"train": train, "holdout": holdout}, args.shard_size, source,
            progress=not args.no_progress, split=rule,
        )  # fmt: skip
    for name, s in manifest["splits"].items():
        written = sum(w.startswith(f"{name}/") for w in manifest["written"])
        print(
            f"{name}: {s['count']} images in {len(s['shards'])} shard(s) "
            f"({written} written, {len(s['shards']) - written} already complete)"
        )
    if "chunks" in manifest:
        c = manifest["chunks"]
        print(
            f"chunks: {c['total']} ({c['loaded']} written, {c['skipped']} already complete by "
            f"their records); at most {c['peak_items']} input items held by the driver"
        )
    print(f"split: {json.dumps(manifest['split'], sort_keys=True)}")
    print(f"manifest: {store.uri_of('data', dataset, 'manifest.json')}")


if __name__ == "__main__":
    run_main(main)

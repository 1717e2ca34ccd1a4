"""P4: input-pipeline throughput from the loopback S3 endpoint / from local disk, same shards.

One "epoch" is what a training worker's input does: ``ray.data.read_webdataset`` over the shards
(through :func:`pipeline.orchestration.stages.webdataset`, the store's filesystem), PNG decoding included, then
``iter_torch_batches`` to float tensors. The same WebDataset shards are written once to a local
store and once to an S3 bucket on a moto server (real HTTP on 127.0.0.1); epochs alternate between
the two (local, S3, local, S3, ...) and the ratio is the median S3 images/s over the median local
images/s. Goal >= 0.9.

    python bench/p4_s3_input.py [--images 4096] [--shard-size 1024] [--repeats 7]

Shards of 1024 images (about 5 MB) keep the per-request cost of the (Python) moto server from
dominating; with 256-image shards the ratio measured here was 0.77 under heavy contention.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(n: int, size: int):
    import numpy as np

    from pipeline.data.imageset import ImageSet

    rng = np.random.default_rng(0)
    # smooth random images (compressible like real photos, unlike white noise)
    base = rng.integers(0, 256, (n, size // 4, size // 4, 3), dtype=np.uint8)
    images = base.repeat(4, axis=1).repeat(4, axis=2)
    return ImageSet(keys=[f"img-{i:06d}" for i in range(n)], images=images)


def epoch(store, folder: str, batch_size: int) -> tuple[int, float]:
    """(images, seconds) of one pass: read + decode + ``iter_torch_batches``."""
    from pipeline.orchestration.stages import webdataset

    t0 = time.perf_counter()
    ds = webdataset(store, folder).select_columns(["png"])
    n = 0
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        x = batch["png"].float() / 127.5 - 1.0  # (B, H, W, C), what a training step consumes
        n += x.shape[0]
    return n, time.perf_counter() - t0


def run(images: int = 4096, shard_size: int = 1024, repeats: int = 7, size: int = 32) -> dict:
    import subprocess
    import urllib.request

    import boto3
    import ray

    from pipeline.data.shards import put_image_shards
    from pipeline.data.storage import open_store
    from pipeline.fanout.ray_init import init_ray

    env = {
        "AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
    }  # fmt: skip
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    port = _free_port()
    moto = Path(sys.executable).parent / "moto_server"  # its own process, like a real S3 service
    server = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(env)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="p4-bench")
        data = _images(images, size)
        with tempfile.TemporaryDirectory() as tmp:
            stores = {"local": open_store(tmp), "s3": open_store("s3://p4-bench/root")}
            for store in stores.values():
                put_image_shards(store, "shards", data, shard_size)
            init_ray(num_cpus=2)
            ray.data.DataContext.get_current().enable_progress_bars = False
            for name in stores:  # warm-up: imports, worker start, connection pools
                epoch(stores[name], "shards", 256)
            times: dict[str, list[float]] = {"local": [], "s3": []}
            for _ in range(repeats):
                for name in ("local", "s3"):
                    n, secs = epoch(stores[name], "shards", 256)
                    assert n == images, (name, n)
                    times[name].append(secs)
            ray.shutdown()
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    med = {k: statistics.median(v) for k, v in times.items()}
    tput = {k: images / med[k] for k in med}
    return {
        "ratio": round(tput["s3"] / tput["local"], 3),
        "goal": ">= 0.9",
        "images": images,
        "image_shape": [size, size, 3],
        "shards": -(-images // shard_size),
        "repeats": repeats,
        "local_images_per_s": round(tput["local"], 1),
        "s3_images_per_s": round(tput["s3"], 1),
        "local_epoch_s": [round(t, 3) for t in times["local"]],
        "s3_epoch_s": [round(t, 3) for t in times["s3"]],
        "note": "moto S3 server (own process) on 127.0.0.1; ratios measured side by side, "
        "interleaved, median of repeats",
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--shard-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(json.dumps({"P4": run(a.images, a.shard_size, a.repeats)}, indent=2))

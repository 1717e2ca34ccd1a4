"""Ray Data edge: feature moments for the Fréchet distance, from an actor pool.

``read_webdataset`` over a folder of sample shards (or a bounded in-memory image array) feeds an
actor pool; each actor builds its feature extractor once (``make_embed(device)``: for FID the
Inception of :mod:`pipeline.evaluation.fid`, passed in by the evaluation layer) and reduces every batch
of at most ``batch_size`` decoded images to its partial moments: the count ``n``, the mean ``mu`` (D,)
and the centred sum of outer products ``M2 = sum_i (x_i - mu)(x_i - mu)^T`` (D, D), all float64.
The driver receives one such partial per batch, never a feature row, and folds them
(:mod:`pipeline.evaluation.moments`). Memory: an actor holds one batch of images and its features; the
driver one partial (8 D^2 bytes: 32 MiB for Inception's 2048-d pool3) whatever the number of images.

With ``use_gpu`` every actor requests one GPU (so an autoscaler adds GPU nodes) and embeds on
``cuda``; a private local Ray without a GPU is refused before any work (:class:`GpuUnavailableError`). The
factory is put in the object store once, so weights it carries reach every node without a shared
file system.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.data.shards import verify_folder
from pipeline.data.storage import Store

Embedder = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, C) -> (N, D) features
MakeEmbedder = Callable[[str], Embedder]  # device ("cpu" / "cuda") -> an embedder, built once
PARTIAL_KEYS = ("count", "mean", "m2")
MAX_BATCH = 4096  # images per actor call: one batch (and its features) is what an actor holds


class GpuUnavailableError(ConfigError):
    """GPUs were asked for, but the Ray cluster has none."""


def block_moments(features: np.ndarray) -> dict[str, np.ndarray]:
    """One partial row ``{"count": (1,), "mean": (1, D), "m2": (1, D, D)}`` of feature rows (N, D):
    ``n``, ``mu = mean(x)`` and ``M2 = (x - mu)^T (x - mu)`` in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"an embedder must return (N, D) rows with N > 0, got shape {x.shape}")
    mu = x.mean(0)
    c = x - mu
    return {"count": np.asarray([len(x)], np.int64), "mean": mu[None], "m2": (c.T @ c)[None]}


def stack_decoded(images) -> np.ndarray:
    """Decoded PNG arrays (H, W) or (H, W, C) -> uint8 (N, H, W, C); grey promoted to RGB when the
    batch mixes both (as :func:`pipeline.data.tars.concat` does)."""
    arrays = [np.asarray(a) for a in images]
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    if len({a.shape[-1] for a in arrays}) > 1:
        arrays = [np.repeat(a, 3, -1) if a.shape[-1] == 1 else a for a in arrays]
    return np.stack(arrays).astype(np.uint8, copy=False)


class FeatureMoments:
    """Ray Data actor: builds the embedder once, then returns each batch's partial moments only."""

    def __init__(self, make_embed: Any, device: str = "cpu"):
        import ray

        if isinstance(make_embed, ray.ObjectRef):  # put once by the driver (it may carry weights)
            make_embed = ray.get(make_embed)
        self.embed = make_embed(device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        column = "png" if "png" in batch else "image"
        return block_moments(self.embed(stack_decoded(batch[column])))


def require_gpus(use_gpu: bool) -> None:
    """Refuse ``use_gpu`` on a private local Ray that has no GPU (a clear error, exit 2 in a job).
    On a cluster the actors' GPU requests make the autoscaler add GPU nodes, as for sampling."""
    if not use_gpu:
        return
    import ray

    from pipeline.data.parallel import gpus_never_come

    resources = ray.cluster_resources()
    if gpus_never_come():
        raise GpuUnavailableError(
            f"--use-gpu: the Ray cluster has no GPU (CPU {resources.get('CPU', 0):g}, GPU 0): "
            "add a GPU node (or a GPU worker group), or drop --use-gpu to embed on CPUs"
        )


def _pool_size(requested: int, use_gpu: bool) -> int:
    """Actors in the pool: on a private local Ray at most one per GPU, or on CPUs one CPU is left to
    the reads; on a cluster ``requested`` (the autoscaler adds the nodes)."""
    import ray

    from pipeline.data.parallel import parallelism, read_fed_pool

    if use_gpu:
        return parallelism(requested, int(ray.cluster_resources().get("GPU", 1)))
    return read_fed_pool(requested)


def _check_batch(batch_size: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(f"feature batch_size must be in [1, {MAX_BATCH}], got {batch_size}")


def _moment_stream(ds, make_embed: MakeEmbedder, batch_size: int, actors: int, use_gpu: bool):
    import ray

    factory = ray.put(make_embed)  # one copy in the object store for every actor of the pool
    reduced = ds.map_batches(
        FeatureMoments,
        fn_constructor_kwargs={"make_embed": factory, "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size, batch_format="numpy", num_cpus=1, num_gpus=1 if use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(size=_pool_size(actors, use_gpu)),
    )  # fmt: skip
    for row in reduced.iter_rows():  # one partial per actor call, folded by the caller
        yield {k: row[k] for k in PARTIAL_KEYS}


def shard_moments(
    store: Store,
    folder: str,
    make_embed: MakeEmbedder,
    batch_size: int = 256,
    actors: int = 1,
    use_gpu: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Partial moments (``{"count", "mean", "m2"}`` per batch of at most ``batch_size`` images) of the
    features of every image in the shards under ``folder``, from a pool of ``actors`` actors.

    A folder with a manifest is checked against it first (Ray Data cannot hash what it reads)."""
    import ray

    _check_batch(batch_size)
    require_gpus(use_gpu)
    verify_folder(store, folder)
    paths = [store.join(folder, n) for n in sorted(store.listdir(folder)) if n.endswith(".tar")]
    if not paths:
        raise ConfigError(f"no shards under {store.uri_of(folder)} to embed")
    ds = ray.data.read_webdataset(
        paths, filesystem=store.fs, decoder=_decode_png, override_num_blocks=len(paths)
    )
    yield from _moment_stream(ds.select_columns(["png"]), make_embed, batch_size, actors, use_gpu)


def array_moments(
    images: np.ndarray,
    make_embed: MakeEmbedder,
    batch_size: int = 256,
    actors: int = 1,
    use_gpu: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`shard_moments` of a bounded in-memory uint8 (N, H, W, C) array (a picked reference set),
    through the same actor pool."""
    import ray

    _check_batch(batch_size)
    require_gpus(use_gpu)
    if len(images) == 0:
        raise ConfigError("no images to embed")
    ds = ray.data.from_numpy(np.asarray(images, dtype=np.uint8)).rename_columns({"data": "image"})
    yield from _moment_stream(ds, make_embed, batch_size, actors, use_gpu)


def _decode_png(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode the ``.png`` member to a uint8 array (as :func:`pipeline.data.tars.read_tar` does)."""
    from PIL import Image

    out = dict(sample)
    if isinstance(sample.get("png"), bytes):
        out["png"] = np.asarray(Image.open(io.BytesIO(sample["png"])))
    return out

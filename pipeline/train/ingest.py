"""Streaming training input: WebDataset shards -> decoded uint8 rows (Ray Data) -> exact batches.

Driver side (Ray): :func:`training_dataset` reads a split's checked shards with
``ray.data.read_webdataset`` (the file order shuffled anew for each execution, that is each epoch)
and decodes the PNGs to ``uint8 (H, W, C)`` arrays in ``map_batches`` tasks, never in the training
loop; the members of a latent dataset (``<key>.latent.npy``, ``<key>.pooled.npy``) become
``float32`` arrays there. :func:`holdout_datasets` adds the classifier's held-out roles (:func:`pipeline.core.labels.
is_trained_holdout`, a keyed hash of the key: no global sort or count).

Worker side (Ray-free, so the loops stay unit-testable): a *row source* yields one epoch of a
worker's rows at a time, in an order seeded by ``(seed, epoch, rank)``, without replacement:

* :class:`MemoryRows` (``input: "cache"``/``"memory"``): rows held in memory (a shard read once when
  its decoded size is at most ``cache_max_bytes``, or tensors), a seeded permutation per epoch;
* :class:`StreamRows` (``input: "stream"``): each epoch is a fresh pass over the Ray Data shard
  through a bounded seeded shuffle buffer (``shuffle_buffer`` rows; Ray's own
  ``local_shuffle_buffer_size`` is not used: it emits short batches mid-stream, and DDP ranks that run
  different step counts hang, ray-project/ray#66085). A pass whose rows need no keys (the
  denoiser's) arrives on the device already: :func:`device_batches`, Ray Data's
  ``iter_torch_batches(device=..., prefetch_batches=2)``; the buffer then permutes device tensors.

:class:`EpochBatches` re-batches consecutive epochs of a source into batches of exactly the
per-worker size, so the step-driven loops run the same number of steps on every rank whatever its
shard size, and records the position (epoch, rows consumed in it) that a resume skips to.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pipeline.data.imageset import DataError

CLUSTER_VERIFY_GROUPS = 64  # shard-hash groups on a cluster (its head has no CPUs to size them by)
CHUNK = 256  # rows per Ray Data batch that a worker pulls from its shard
PREFETCH_BATCHES = 2  # Ray Data batches fetched, decoded and (on CUDA) copied ahead of the loop
TENSOR_COLUMNS = ("image", "latent", "pooled")  # what device_batches moves (never the str "key")
Rows = dict[str, Any]  # column -> array (numpy or torch), all with the same number of rows


# ------------------------------------------------------------------------------- driver side (Ray)
def shard_paths(
    store, folder: str, manifest: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Any] | None, str]:
    """(the shard paths under ``folder``, the dataset's manifest or None, the split name).

    With a manifest beside ``folder`` (``data/<dataset>/<split>``) the shards are checked before this
    returns, so before any training step or checkpoint: the names must be the manifest's and every
    object's sha256, streamed in 1 MiB chunks, must match it, in parallel Ray tasks (about four per
    cluster CPU, each hashing a group of shards of equal total size). The first mismatch cancels the
    rest and raises :class:`DataError` naming the shard's URI. Cost: one extra read of the split, no
    decoding. Without a manifest the shards are read unchecked, with a warning. ``manifest``: the
    dataset's, already read by the job (:class:`pipeline.data.handle.DatasetHandle`): not fetched again."""
    import ray

    from pipeline.data.parallel import parallelism
    from pipeline.data.shards import check_shards, dataset_manifest, shard_groups, verify_shards
    from pipeline.data.storage import StorageError

    names = shard_names(store, folder)
    manifest, split = dataset_manifest(store, folder, manifest)
    if manifest is not None:
        entries = check_shards(store, folder, manifest, split, None)
        local_cap = 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        groups = shard_groups(entries, parallelism(CLUSTER_VERIFY_GROUPS, local_cap))
        verify = ray.remote(num_cpus=1, max_retries=1)(verify_shards)
        pending = [verify.remote(store, folder, group) for group in groups]
        try:
            while pending:
                done, pending = ray.wait(pending)
                ray.get(done)
        except ray.exceptions.RayTaskError as exc:
            for ref in pending:
                ray.cancel(ref)
            raise exc.cause if isinstance(exc.cause, DataError | StorageError) else exc from None
    return [store.join(folder, n) for n in names], manifest, split


def shard_names(store, folder: str) -> list[str]:
    """The ``.tar`` shards directly under ``folder`` (no Ray needed); :class:`DataError` when none."""
    names = [n for n in store.listdir(folder) if n.endswith(".tar")]
    if not names:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    return names


def split_info(manifest: dict[str, Any] | None, split: str) -> dict[str, int] | None:
    """``{"rows", "row_bytes"}`` of a split from its manifest (decoded bytes per row: uint8 images,
    or a latent dataset's float32 latent plus pooled embedding); None without a manifest."""
    if manifest is None or split not in manifest.get("splits", {}):
        return None
    h, w = manifest.get("image_size", (0, 0))
    size = int(h) * int(w) * int(manifest.get("channels", 1))
    latent = manifest.get("latent")
    if isinstance(latent, dict):  # decoded to float32, whatever the stored dtype
        c, h, w = latent.get("latent_shape") or (manifest.get("channels", 1), h, w)
        size = 4 * (int(c) * int(h) * int(w) + int(latent.get("pooled_dim") or 0))
    return {"rows": int(manifest["splits"][split]["count"]), "row_bytes": size}


MEMBERS = ["*.png", "*.latent.npy", "*.pooled.npy"]  # what the readers take from a shard


def _npy(data) -> np.ndarray:
    return np.load(io.BytesIO(bytes(data)), allow_pickle=False).astype(np.float32, copy=False)


def decode_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch of raw WebDataset rows -> ``{"key": str (N,), "image": uint8 (N, H, W, C)}``, or for
    a latent dataset ``{"key", "latent": float32 (N, C, h, w)}`` plus ``"pooled": float32 (N, D)``
    where the shards hold pooled text embeddings."""
    keys = np.asarray([str(k) for k in batch["__key__"]], dtype=object)
    if "latent.npy" in batch:
        out = {"key": keys}
        for name, empty in (("latent", (0, 1, 1, 1)), ("pooled", (0, 1))):
            if f"{name}.npy" in batch:
                arrays = [_npy(d) for d in batch[f"{name}.npy"]]
                out[name] = np.stack(arrays) if arrays else np.zeros(empty, np.float32)
        return out
    from PIL import Image

    images = []
    for data in batch["png"]:
        a = np.asarray(Image.open(io.BytesIO(bytes(data))))
        images.append(a[..., None] if a.ndim == 2 else a)
    if not images:
        return {"key": keys, "image": np.zeros((0, 1, 1, 1), np.uint8)}
    return {"key": keys, "image": np.stack(images).astype(np.uint8, copy=False)}


def _read(store, paths: list[str], seed: int, keep=None):
    """The shards as decoded rows; ``keep`` (a ``map_batches`` function on raw rows, by
    ``__key__``) drops rows before they are decoded, so a role filter decodes only what it keeps."""
    import ray
    from ray.data import FileShuffleConfig

    # the file order is shuffled anew for each execution of the dataset (each epoch): Ray seeds it
    # with (seed, execution index)
    ds = ray.data.read_webdataset(
        paths, filesystem=store.fs, override_num_blocks=len(paths), decoder=None,
        fileselect=MEMBERS, shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True),
    )  # fmt: skip
    if keep is not None:
        ds = ds.map_batches(keep, batch_format="numpy", batch_size=CHUNK)
    return ds.map_batches(decode_rows, batch_format="numpy", batch_size=CHUNK)


def training_dataset(store, folder: str, seed: int = 0, manifest: dict[str, Any] | None = None):
    """The shards under ``folder`` (checked against the manifest, see :func:`shard_paths`) as a
    ``ray.data.Dataset`` of rows ``{"key": str, "image": uint8 (H, W, C)}`` (or ``"latent"``,
    ``"pooled"``: see :func:`decode_rows`), decoded in Ray Data
    ``map_batches`` tasks. Each execution (epoch) reads the files in another order seeded by
    ``seed``. A stable entry point: the input benchmark iterates its ``iter_batches``."""
    paths, _, _ = shard_paths(store, folder, manifest)
    return _read(store, paths, seed)


def device_batches(shard, device, batch_size: int = CHUNK):
    """One pass over a Ray Data shard (a ``DataIterator``) as ``{"image" | "latent" [, "pooled"]:
    tensor}`` batches already on ``device``: ``iter_torch_batches(device=device,
    prefetch_batches=PREFETCH_BATCHES)``, pinned and copied without blocking on Ray's own threads when
    ``device`` is CUDA. The ``"key"`` column (strings, which Ray moves to no device) is dropped: for
    loops that need no keys (the denoiser)."""
    import torch
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Tensors(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
            # a copy: Ray's arrays may be read-only views of the object store
            return {k: torch.from_numpy(np.array(batch[k])) for k in TENSOR_COLUMNS if k in batch}

    device = torch.device(device)
    return shard.iter_torch_batches(
        batch_size=batch_size, device=device, prefetch_batches=PREFETCH_BATCHES,
        collate_fn=Tensors(), pin_memory=device.type == "cuda",
    )  # fmt: skip


class _RoleFilter:
    """``map_batches`` function keeping the held-out rows of one role (trained on with their bits, or
    never seen), by :func:`pipeline.core.labels.is_trained_holdout`."""

    def __init__(self, label_seed: int, fraction: float, trained: bool):
        self.label_seed, self.fraction, self.trained = label_seed, fraction, trained

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipeline.core.labels import is_trained_holdout

        keys = batch["__key__"] if "__key__" in batch else batch["key"]  # raw or decoded rows
        keep = np.asarray(
            [
                is_trained_holdout(str(k), self.label_seed, self.fraction) == self.trained
                for k in keys
            ],
            dtype=bool,
        )
        return {name: col[keep] for name, col in batch.items()}


def holdout_datasets(
    store, folder: str, label_seed: int, holdout_images: int, never_limit: int, seed: int = 0,
    manifest: dict[str, Any] | None = None,
):  # fmt: skip
    """(bits, never, info) for the classifier's held-out split under ``folder`` (checked as in
    :func:`training_dataset`): ``bits`` the rows it trains on with their own random bits, ``never``
    at most ``never_limit`` never-seen rows (for fit metrics only), ``info`` ``{"rows", "row_bytes",
    "fraction", "bits"}``: the split's count from the manifest, the role fraction
    ``holdout_fraction(holdout_images, rows)`` and the expected number of bit rows. Shards without a
    manifest are counted in one extra pass (the fraction needs the count)."""
    from pipeline.core.labels import holdout_info

    paths, manifest, split = shard_paths(store, folder, manifest)
    info = holdout_info(split_info(manifest, split), holdout_images)
    if info is None:  # hand-made shards: one counting pass (no decoding)
        import ray

        count = ray.data.read_webdataset(paths, filesystem=store.fs, decoder=None).count()
        info = holdout_info({"rows": int(count), "row_bytes": None}, holdout_images)
    fraction = info["fraction"]
    # the role filter runs on the raw rows: only the kept images are decoded
    bits = _read(store, paths, seed, _RoleFilter(label_seed, fraction, True))
    never = _read(store, paths, seed, _RoleFilter(label_seed, fraction, False))
    return bits, never.limit(max(1, never_limit)), info


# ------------------------------------------------------------------------ worker side (Ray-free)
def num_rows(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def take(rows: Rows, idx) -> Rows:
    """Rows at ``idx`` (an index array or a slice); an index array for columns on a GPU is copied
    there without blocking the host (:func:`pipeline.train.device.to_device`)."""
    return {k: v[_index_for(v, idx)] for k, v in rows.items()}


def _index_for(column, idx):
    if isinstance(idx, np.ndarray) and getattr(column, "is_cuda", False):
        import torch

        from pipeline.train.device import to_device

        return to_device(torch.from_numpy(idx), column.device)
    return idx


def concat(parts: list[Rows]) -> Rows:
    """Rows of several parts, in order (numpy or torch columns)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        cols = [p[k] for p in parts]
        if isinstance(cols[0], np.ndarray):
            out[k] = np.concatenate(cols)
        else:
            import torch

            out[k] = torch.cat(cols)
    return out


def epoch_rng(seed: int, epoch: int, rank: int, stream: int = 0) -> np.random.Generator:
    """The generator of one epoch's order of one worker's rows of one source."""
    return np.random.default_rng([int(seed), int(epoch), int(rank), int(stream)])


class MemoryRows:
    """Rows held in memory; epoch ``e`` is the permutation ``epoch_rng(seed, e, rank, stream)``."""

    def __init__(
        self, rows: Rows, seed: int = 0, rank: int = 0, stream: int = 0, input: str = "memory"
    ):
        self.rows, self.seed, self.rank, self.stream, self.input = rows, seed, rank, stream, input
        self.size = num_rows(rows)
        self.rows_read = self.size  # read once

    def epoch(self, epoch: int) -> Iterator[Rows]:
        order = epoch_rng(self.seed, epoch, self.rank, self.stream).permutation(self.size)
        for s in range(0, self.size, CHUNK):
            yield take(self.rows, order[s : s + CHUNK])

    def sample(self, n: int) -> Rows:
        """The first ``n`` rows (by key when the rows were cached from a shard)."""
        return take(self.rows, slice(0, n))


def cache_rows(
    batches: Iterable[Rows], seed: int = 0, rank: int = 0, stream: int = 0
) -> MemoryRows:
    """A shard read once (``batches``: one pass), sorted by key so that the epochs' permutations do not
    depend on the order Ray Data delivered the rows in."""
    parts = [b for b in batches if num_rows(b)]
    if not parts:
        raise DataError("this worker's shard of the dataset is empty")
    rows = concat(parts)
    order = np.argsort(np.asarray(rows["key"], dtype=str), kind="stable")
    return MemoryRows(take(rows, order), seed, rank, stream, input="cache")


class StreamRows:
    """Each epoch a fresh pass ``open_epoch()`` over a shard (Ray Data batches of rows), through a
    bounded shuffle buffer seeded by ``(seed, epoch, rank, stream)``: when it holds more than
    ``buffer`` rows it is permuted and all but ``buffer`` rows are emitted; at the end of the pass the
    rest. Memory: at most ``buffer + CHUNK`` rows. ``keep``: the first ``keep`` distinct rows emitted
    are kept for :meth:`sample` (rank 0's fit metrics)."""

    input = "stream"

    def __init__(
        self,
        open_epoch: Callable[[], Iterable[Rows]],
        buffer: int = 1024,
        seed: int = 0,
        rank: int = 0,
        stream: int = 0,
        size: int | None = None,
        keep: int = 0,
    ):
        self.open_epoch, self.buffer = open_epoch, buffer
        self.seed, self.rank, self.stream, self.size = seed, rank, stream, size
        self.rows_read, self.keep = 0, keep
        self._kept: list[Rows] = []
        self._kept_keys: set[str] = set()

    def epoch(self, epoch: int) -> Iterator[Rows]:
        rng = epoch_rng(self.seed, epoch, self.rank, self.stream)
        pool: list[Rows] = []
        held = 0
        for batch in self.open_epoch():
            n = num_rows(batch)
            if not n:
                continue
            self.rows_read += n
            pool.append(batch)
            held += n
            if held > self.buffer:
                rows = take(concat(pool), rng.permutation(held))
                out, rest = (
                    take(rows, slice(0, held - self.buffer)),
                    take(rows, slice(held - self.buffer, None)),
                )
                pool, held = [rest], self.buffer
                yield self._note(out)
        if held:
            yield self._note(take(concat(pool), rng.permutation(held)))

    def _note(self, rows: Rows) -> Rows:
        if self.keep and len(self._kept_keys) < self.keep and "key" in rows:
            fresh = [i for i, k in enumerate(rows["key"]) if k not in self._kept_keys][
                : self.keep - len(self._kept_keys)
            ]
            if fresh:
                self._kept.append(take(rows, np.asarray(fresh)))
                self._kept_keys.update(str(rows["key"][i]) for i in fresh)
        return rows

    def sample(self, n: int) -> Rows | None:
        """Up to ``n`` of the first distinct rows this source emitted (None before any)."""
        if not self._kept:
            return None
        rows = concat(self._kept)
        return take(rows, slice(0, n))


class EpochBatches:
    """Batches of exactly ``size`` rows from consecutive epochs of ``source`` (a batch may span two
    epochs), starting at row ``offset`` of epoch ``epoch`` (a resume skips the rows consumed before).

    :meth:`state` is the position to resume from plus how the input was consumed: ``input``
    ("stream", "cache" or "memory"), ``epoch`` and ``offset`` (rows of it consumed), ``epochs``
    (epochs started by this process), ``rows`` (rows put into batches) and ``rows_read`` (rows the
    source read, skipped ones included)."""

    def __init__(self, source, size: int, epoch: int = 0, offset: int = 0):
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.source, self.size = source, size
        self.epoch, self.offset = int(epoch), int(offset)
        self.epochs = self.rows = 0
        self._it: Iterator[Rows] | None = None
        self._pending: list[Rows] = []

    def _start(self) -> None:
        self._it, self._pending, self._seen = iter(self.source.epoch(self.epoch)), [], 0
        self.epochs += 1
        skip = self.offset
        while skip > 0:
            chunk = next(self._it, None)
            if chunk is None:
                break
            n = num_rows(chunk)
            self._seen += n
            if n > skip:
                self._pending = [take(chunk, slice(skip, None))]
            skip -= n

    def next(self) -> Rows:
        """The next batch of exactly ``size`` rows."""
        if self._it is None:
            self._start()
        parts, need = [], self.size
        while need:
            if not self._pending:
                chunk = next(self._it, None)
                if chunk is None:
                    if not self._seen:
                        raise DataError("this worker's shard of the dataset has no rows")
                    self.epoch, self.offset = self.epoch + 1, 0
                    self._start()
                    continue
                self._seen += num_rows(chunk)
                self._pending = [chunk]
            chunk = self._pending.pop()
            n = num_rows(chunk)
            if n > need:
                self._pending = [take(chunk, slice(need, None))]
                chunk = take(chunk, slice(0, need))
                n = need
            parts.append(chunk)
            need -= n
            self.offset += n
        self.rows += self.size
        return concat(parts)

    def __iter__(self) -> Iterator[Rows]:
        while True:
            yield self.next()

    def state(self) -> dict[str, Any]:
        return {
            "input": self.source.input,
            "epoch": self.epoch,
            "offset": self.offset,
            "epochs": self.epochs,
            "rows": self.rows,
            "rows_read": int(self.source.rows_read),
        }


def expected_bytes(info: dict[str, Any] | None, world: int, rows: int | None = None) -> float:
    """Decoded bytes of one worker's share of a split (inf when unknown)."""
    if info is None or not info.get("row_bytes"):
        return math.inf
    n = info["rows"] if rows is None else rows
    return math.ceil(n / max(1, world)) * info["row_bytes"]

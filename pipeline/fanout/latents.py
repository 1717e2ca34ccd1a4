"""Ray Data edge: precompute VAE latents and text embeddings of an image dataset, once.

For every image ``x`` (in [-1, 1]) with caption ``c`` of ``data/<dataset>/<split>`` this stores

    z      = f * mean(q(z | x))           (C, h, w)  the scaled posterior mean (Rombach et al. 2022)
    hidden = text_encoder(c).last_hidden  (L, D)     the UNet's encoder_hidden_states
    pooled = text_encoder(c).pooled       (D,)       what a text-conditioned classifier reads

in ``data/<out_dataset>/<split>/``: one output shard per input shard, with its name and its keys (so
random bits and near-duplicate clusters, functions of the key, carry over). Members per key:
``<key>.latent.npy`` (float32 or float16), ``<key>.pooled.npy`` (float32), ``<key>.hidden.npy``
(float16), ``<key>.txt`` (the caption), ``<key>.json`` (the input's JSON plus ``"caption"``). Shards
are reproducible tars put atomically; ``manifest.json``, with a ``"latent"`` section, comes last.

Resume: ``<shard>.provenance.json``, written after its shard, records the shard's sha256 and what
made it (the model directory's digest, the settings' digest, the input shard's sha256). A rerun
skips a shard whose record matches and whose stored sha256 is the recorded one, and re-encodes one
whose input changed. Output of another model or other settings is never resumed: the run stops
before any work with :class:`StaleArtifactError` naming what changed (``overwrite`` deletes it).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.config import ConfigError
from pipeline.core.latent import encode_images, encode_prompts, load_parts
from pipeline.core.models import CheckpointError
from pipeline.data import shards as sh
from pipeline.data import tars as tarfmt
from pipeline.data.checkpoints import resolve_model_dir
from pipeline.data.handle import open_dataset
from pipeline.data.imageset import DataError
from pipeline.data.layout import data_folder
from pipeline.data.provenance import StaleArtifactError, changed_inputs, dir_digest, value_digest
from pipeline.data.storage import ObjectNotFound, StorageError, Store, open_store

FORMAT = 1  # bump when the bytes stored for the same inputs change
MEMBERS = ["latent.npy", "pooled.npy", "hidden.npy", "txt", "json"]
SIDECAR = ".provenance.json"
DTYPES = ("float32", "float16")
OWN_ERRORS = (DataError, StorageError, CheckpointError, StaleArtifactError, ConfigError)
log = logging.getLogger(__name__)
PLAN = ("split", "name", "sha256", "bytes")  # a row per input shard (sha256 "": no manifest)
SHARD = ("name", "count", "bytes", "sha256")  # a shard's manifest entry
EMPTY_ROW = dict(count=0, bytes=0, sha256="", written=False, skipped=False, error="", message="")


# ------------------------------------------------------------------------------- Ray-free helpers
@dataclass
class Encoders:
    """The parts of a Stable Diffusion directory that encoding needs (an encode_prompts model)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: no Stable Diffusion config here ({exc})") from None


def encoder_spec(directory: str | Path) -> dict[str, Any]:
    """Shapes of a Stable Diffusion directory from its configs alone (no weights are loaded):
    ``latent_shape`` (C, h, w) and ``image_shape`` (C, H, W) as :class:`LatentModel` derives them,
    ``text_shape`` (L, D): tokenizer length by text width, ``pooled_dim`` D, ``scaling_factor``."""
    root = Path(directory)
    vae, unet = _json(root / "vae/config.json"), _json(root / "unet/config.json")
    text = _json(root / "text_encoder/config.json")
    length = _json(root / "tokenizer/tokenizer_config.json").get("model_max_length")
    if not isinstance(length, int) or length > 100_000:  # transformers' "unset" is a huge int
        length = int(text.get("max_position_embeddings", 77))
    size, c = int(np.ravel(unet.get("sample_size", 64))[0]), int(vae.get("latent_channels", 4))
    if unet.get("in_channels", 4) != c:
        raise CheckpointError(f"{root}: the UNet takes {unet.get('in_channels')} channels, not {c}")
    full, d = size * 2 ** (len(vae.get("block_out_channels", (64,))) - 1), int(text["hidden_size"])
    image_shape = [int(vae.get("in_channels", 3)), full, full]
    return {"scaling_factor": float(vae.get("scaling_factor", 0.18215)),
            "latent_shape": [c, size, size], "image_shape": image_shape,
            "text_shape": [length, d], "pooled_dim": d}  # fmt: skip


def load_encoders(directory: str | Path, device: str = "cpu") -> Encoders:
    """The VAE, text encoder and tokenizer of a Stable Diffusion directory, from local files only
    (:func:`pipeline.core.latent.load_parts`, without the UNet), in eval mode."""
    parts = load_parts(directory, ("vae", "text_encoder", "tokenizer"), device)
    return Encoders(**parts)


def caption_of(parts: dict, meta: dict, key: str, where: str, template: str | None) -> str:
    """``<key>.txt``, else the JSON's ``"caption"``, else ``template`` filled from the JSON."""
    if "txt" in parts:
        try:
            return parts["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{where}: {key}.txt is not UTF-8 text") from None
    if isinstance(meta.get("caption"), str):
        return meta["caption"]
    if template is None:
        raise DataError(
            f"{where}: sample {key!r} has no caption (no {key}.txt, no 'caption' in {key}.json); "
            "give a caption template filled from the JSON fields, e.g. 'a handwritten {label}'"
        )
    try:
        return template.format(**meta)
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(
            f"{where}: caption template {template!r} cannot be filled for sample {key!r} "
            f"({type(exc).__name__}: {exc}); its JSON fields are {sorted(meta)}"
        ) from None


def pixels(parts: dict[str, bytes], key: str, where: str, image_shape: Sequence[int]) -> np.ndarray:
    """The image of ``key`` as float32 (C, H, W) in [-1, 1]. It must already have the model's size
    (nothing is resized), and be grayscale for a 1-channel model."""
    c, h, w = image_shape
    im = tarfmt._decode(parts, key, where)
    if im.size != (w, h):
        raise DataError(
            f"{where}: image {key!r} is {im.size[0]}x{im.size[1]} (width x height) but the model "
            f"takes {w}x{h} images; nothing is resized here: write the dataset at the model's size "
            "first (make_shards --image-size)"
        )
    if c == 1 and im.mode not in ("L", "1", "LA", "I", "I;16"):
        raise DataError(f"{where}: image {key!r} is {im.mode}, but the model takes grayscale")
    a = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.float32)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) / 127.5 - 1.0


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def members_tar(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, bytes)`` in name order, mtime 0: the same members give the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def encode_shard(
    enc: Encoders, spec: dict[str, Any], data: bytes, where: str, template: str | None = None,
    batch_size: int = 64, dtype: str = "float32", device: str = "cpu",
) -> tuple[bytes, int]:  # fmt: skip
    """One input WebDataset tar -> (the latent shard's tar, its number of keys). Every caption is
    resolved before any image is encoded (a missing one fails fast); then images and captions go
    through the VAE and the text encoder ``batch_size`` at a time, to the shapes of ``spec``."""
    groups = tarfmt._tar_members(data, where)
    keys = sorted(groups)
    metas = [tarfmt._meta(groups[k], k, where) for k in keys]
    captions = [caption_of(groups[k], m, k, where, template) for k, m in zip(keys, metas)]
    sf, members = float(enc.vae.config.scaling_factor), []
    for lo in range(0, len(keys), batch_size):
        chunk, texts = keys[lo : lo + batch_size], captions[lo : lo + batch_size]
        x = np.stack([pixels(groups[k], k, where, spec["image_shape"]) for k in chunk])
        z = encode_images(enc.vae, torch.from_numpy(x).to(device), sf)  # (B, C, h, w)
        z, (hidden, pooled) = z.float().cpu().numpy(), encode_prompts(enc, texts, device)
        hidden, pooled = hidden.cpu().numpy(), pooled.cpu().numpy()  # (B, L, D), (B, D)
        got = [list(z.shape[1:]), list(hidden.shape[1:])]
        if got != [spec["latent_shape"], spec["text_shape"]]:
            raise CheckpointError(f"the model made latents and texts of shapes {got}, not {spec}")
        for i, key in enumerate(chunk):
            meta = json.dumps({**metas[lo + i], "caption": texts[i]}, sort_keys=True)
            members += [
                (f"{key}.latent.npy", npy_bytes(z[i].astype(dtype))),
                (f"{key}.pooled.npy", npy_bytes(pooled[i].astype(np.float32))),
                (f"{key}.hidden.npy", npy_bytes(hidden[i].astype(np.float16))),
                (f"{key}.txt", texts[i].encode()), (f"{key}.json", meta.encode()),
            ]  # fmt: skip
    return members_tar(members), len(keys)


def out_name(name: str) -> str:
    """The output shard's name: the input's, as an uncompressed ``.tar``."""
    return re.sub(r"\.(tar\.gz|tgz)$", ".tar", name)


def read_sidecar(store: Store, folder: str, shard: str) -> dict[str, Any] | None:
    """``<shard>.provenance.json``: ``{name, count, bytes, sha256, provenance}``; None if absent."""
    try:
        record = json.loads(store.read_bytes(folder, shard + SIDECAR))
    except (ObjectNotFound, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------ Ray actor
@dataclass(frozen=True)
class EncodeJob:
    """What an actor needs: folders, the model and its digests, shapes and settings."""

    store: Store
    dataset: str
    out_dataset: str
    model: str
    provenance: dict[str, str]  # {"model": dir digest, "settings": settings digest}
    spec: dict[str, Any]
    settings: dict[str, Any]  # {"format", "dtype", "caption_template"}
    batch_size: int
    use_gpu: bool
    cpus: float  # per actor; a CPU actor runs int(cpus) torch threads


class ShardEncoder:
    """Ray Data actor: loads the VAE and text encoder once, then turns each input shard (a row) into
    one output shard. A bad input comes back as the row's ``error`` (its type's name) and
    ``message``, which the driver raises again (Ray Data would keep only its text)."""

    def __init__(self, job: EncodeJob):
        self.job, self.error = job, None
        self.device = "cuda" if job.use_gpu and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(job.cpus)))
        try:
            with tempfile.TemporaryDirectory(prefix="cpsample-sd-") as tmp:
                root = resolve_model_dir(job.store, job.model, tmp)
                if dir_digest(root) != job.provenance["model"]:
                    raise StaleArtifactError(f"the model {job.model} changed after the job started")
                self.enc = load_encoders(root, self.device)
        except OWN_ERRORS as exc:
            self.error = exc

    def encode(self, split: str, name: str, sha: str, size: int) -> dict[str, Any]:
        """Encode one shard, put it, then its record; its manifest entry plus ``written``."""
        job, store = self.job, self.job.store
        src, dst = data_folder(job.dataset, split), data_folder(job.out_dataset, split)
        out, data = out_name(name), store.read_bytes(src, name)
        if sha:  # the manifest's record: a cut or changed shard stops here, named
            sh.check_blobs(store, src, [{"name": name, "sha256": sha, "bytes": size}], {name: data})
        prov = {**job.provenance, "source": "sha256:" + hashlib.sha256(data).hexdigest()}
        template, dtype = job.settings["caption_template"], job.settings["dtype"]
        tar, count = encode_shard(self.enc, job.spec, data, store.uri_of(src, name), template,
                                  job.batch_size, dtype, self.device)  # fmt: skip
        entry = sh.put_shard(store, dst, out, tar, count)
        record = {**{k: entry[k] for k in SHARD}, "provenance": prov}
        store.write_bytes(json.dumps(record, indent=1, sort_keys=True).encode(), dst, out + SIDECAR)
        return {**{k: entry[k] for k in SHARD}, "written": entry["written"]}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = []
        for split, name, sha, size in zip(*(batch[k] for k in PLAN)):
            t0, row = time.time(), {**EMPTY_ROW, "split": str(split), "name": out_name(str(name))}
            try:
                if self.error is not None:
                    raise self.error
                row.update(self.encode(str(split), str(name), str(sha), int(size)))
            except OWN_ERRORS as exc:
                kind = next(e.__name__ for e in OWN_ERRORS if isinstance(exc, e))
                row.update(error=kind, message=str(exc))
            rows.append({**row, "seconds": time.time() - t0})
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


# ---------------------------------------------------------------------------------------- driver
def shard_plan(store: Store, dataset: str, split: str, manifest: dict | None) -> list[dict]:
    """Rows ``{split, name, sha256, bytes}`` of a split's input shards: the manifest's (which must
    match the listing), or without a manifest the listed ``shard-*`` tars (sha256 "": unchecked)."""
    folder = data_folder(dataset, split)
    if manifest is not None:
        entries = sh.check_shards(store, folder, manifest, split, None)
    else:
        tars = (".tar", ".tar.gz", ".tgz")
        names = [n for n in store.listdir(folder) if n.startswith("shard-") and n.endswith(tars)]
        entries = [{"name": n, "sha256": "", "bytes": -1} for n in names]
    if not entries:
        raise DataError(f"no shards under {store.uri_of(folder)}")
    return [{"split": split, **{k: e[k] for k in PLAN[1:]}} for e in entries]


def complete_shards(store: Store, dataset: str, out_dataset: str, plan: list, prov: dict) -> list:
    """Per row of ``plan``, its output shard's record if the shard is complete (the record names
    ``prov`` and the input's sha256; the stored shard has the recorded sha256), else None. Raises
    :class:`StaleArtifactError` if ``data/<out_dataset>`` is not a latent dataset, or its manifest
    or a shard's record names another model or other settings than ``prov``."""
    where = store.uri_of(data_folder(out_dataset))
    manifest = sh.read_manifest(store, data_folder(out_dataset))
    if manifest is not None:
        if not isinstance(manifest.get("latent"), dict):
            msg = "encode_latents did not make; choose another output dataset, or --overwrite it"
            raise StaleArtifactError(f"{where} holds a dataset that {msg}")
        _same(where, {k: manifest["latent"].get(f"{k}_digest") for k in prov}, prov)

    def one(row: dict[str, Any]) -> dict | None:
        folder, name = data_folder(out_dataset, row["split"]), out_name(row["name"])
        record = read_sidecar(store, folder, name)
        if record is None:
            return None
        recorded = record.get("provenance") or {}
        _same(store.uri_of(folder, name), {k: recorded.get(k) for k in prov}, prov)
        source = row["sha256"] or store.sha256(data_folder(dataset, row["split"]), row["name"])
        complete = store.sha256(folder, name) == record.get("sha256")
        return record if complete and recorded.get("source") == f"sha256:{source}" else None

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, plan))


def _same(what: str, recorded: dict[str, Any], current: dict[str, str]) -> None:
    if changed := changed_inputs(recorded, current):
        raise StaleArtifactError(
            f"{what} was encoded from other inputs (changed: {', '.join(changed)}); choose "
            "another output dataset, or pass --overwrite to discard the old latents"
        )


def encode_dataset(
    store: str | Store, dataset: str, model: str, out_dataset: str | None = None,
    splits: Sequence[str] = ("train", "holdout"), caption_template: str | None = None,
    num_actors: int = 1, use_gpu: bool = False, batch_size: int = 64, dtype: str = "float32",
    overwrite: bool = False, s3_endpoint: str | None = None, cpus_per_actor: float = 1.0,
    ray_cpus: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Encode ``data/<dataset>/<split>`` of each split into ``data/<out_dataset>`` (default
    ``<dataset>-latents``) with ``model`` (a Stable Diffusion directory, local or in the store): one
    Ray Data pass over the incomplete shards, a row each, on ``num_actors`` actors (a GPU each with
    ``use_gpu``) that hold one shard at a time. Inputs, model and existing output are checked first.
    Returns ``{out_dataset, manifest, images, images_encoded, shards, shards_encoded,
    shards_written, shards_skipped, splits: {split: {images, shards}}, seconds, encode_seconds,
    images_per_s}`` (``encode_seconds``: the Ray pass, actor start-up included). Ray starts only
    when a shard needs encoding (``ray_cpus``: CPUs of a private local Ray)."""
    t0, out_dataset = time.time(), out_dataset or f"{dataset}-latents"
    if not splits or len(set(splits)) != len(splits) or min(batch_size, num_actors) < 1:
        raise ConfigError(f"need distinct splits (got {list(splits)}), batch_size and num_actors "
                          f">= 1 (got {batch_size}, {num_actors})")  # fmt: skip
    if dtype not in DTYPES or cpus_per_actor <= 0:
        raise ConfigError(f"dtype must be in {DTYPES} (got {dtype!r}), cpus_per_actor > 0")
    if out_dataset == dataset:
        raise ConfigError(f"the output dataset must differ from the input {dataset!r}")
    store = open_store(store, s3_endpoint, create=False)
    src = open_dataset(store, dataset)  # the one read of its manifest.json
    if src.manifest is None:
        log.warning(
            "no %s in %s: its shards are read unchecked", sh.MANIFEST, store.uri_of(src.folder)
        )
    plan = [row for split in splits for row in shard_plan(store, dataset, split, src.manifest)]
    with tempfile.TemporaryDirectory(prefix="cpsample-sd-") as tmp:
        root = resolve_model_dir(store, model, tmp)
        spec, digest = encoder_spec(root), dir_digest(root)
    settings = {"format": FORMAT, "dtype": dtype, "caption_template": caption_template}
    prov = {"model": digest, "settings": value_digest(settings)}
    if overwrite:  # the old latents go before any work, so no record of them can mislead
        store.delete_dir(data_folder(out_dataset))
    done = complete_shards(store, dataset, out_dataset, plan, prov)
    todo = [row for row, record in zip(plan, done) if record is None]
    rows = [{**EMPTY_ROW, "split": row["split"], "skipped": True, **{k: rec[k] for k in SHARD}}
            for row, rec in zip(plan, done) if rec is not None]  # fmt: skip
    job = EncodeJob(store, dataset, out_dataset, model, prov, spec, settings, batch_size,
                    use_gpu, cpus_per_actor)  # fmt: skip
    t1 = time.time()
    if todo:  # a complete rerun starts no actor
        rows += _run_pool(job, todo, num_actors, ray_cpus)
    encode_s = time.time() - t1
    manifest = write_latent_manifest(job, splits, rows, src.digest)
    encoded = [r for r in rows if not r["skipped"]]
    n_encoded, uri = sum(r["count"] for r in encoded), store.uri_of(data_folder(out_dataset))
    return {
        "out_dataset": out_dataset, "manifest": f"{uri}/{sh.MANIFEST}",
        "images": sum(r["count"] for r in rows), "images_encoded": n_encoded, "shards": len(rows),
        "shards_encoded": len(encoded), "shards_skipped": len(rows) - len(encoded),
        "shards_written": sum(bool(r["written"]) for r in rows),
        "splits": {s: {"images": e["count"], "shards": len(e["shards"])}
                   for s, e in manifest["splits"].items()},
        "seconds": time.time() - t0, "encode_seconds": encode_s,
        "images_per_s": n_encoded / encode_s if encode_s > 0 else 0.0,
    }  # fmt: skip


def _run_pool(job: EncodeJob, plan: list[dict], num_actors: int, ray_cpus: int | None) -> list:
    """The Ray Data pass over ``plan`` (Ray started if need be, with ``ray_cpus`` when local): the
    encoded shards' rows; the first bad input raised."""
    import ray

    from pipeline.fanout.ray_init import init_ray
    from pipeline.fanout.sampling import _placement

    init_ray(num_cpus=ray_cpus)
    gpus, _ = _placement(1.0 if job.use_gpu else 0.0, num_actors, job.cpus, job.use_gpu)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        ShardEncoder, fn_constructor_kwargs={"job": job},
        batch_size=1,  # a shard per call: each actor holds one shard at a time
        compute=ray.data.ActorPoolStrategy(size=num_actors, max_tasks_in_flight_per_actor=1),
        num_cpus=job.cpus, num_gpus=gpus,
    )  # fmt: skip
    rows = []
    for row in ds.iter_rows():  # the first bad input stops the pass
        if row["error"]:
            raise {e.__name__: e for e in OWN_ERRORS}[str(row["error"])](str(row["message"]))
        rows.append({k: v.item() if hasattr(v, "item") else v for k, v in row.items()})
    return rows


def write_latent_manifest(job: EncodeJob, splits: Sequence[str], rows: list, source: str | None):
    """Remove stale shards and records of ``splits``, then write ``manifest.json`` (last): the
    latents' size as ``image_size``/``channels`` (so the shape checks of image datasets apply), the
    ``"latent"`` section, and each split's shards (``rows``: name, count, bytes, sha256)."""
    spec, store = job.spec, job.store
    manifest: dict[str, Any] = {
        "dataset": job.out_dataset, "format": "webdataset", "members": MEMBERS,
        "image_size": spec["latent_shape"][1:], "channels": spec["latent_shape"][0],
        "latent": {
            **spec, "dtype": job.settings["dtype"], "hidden_dtype": "float16",
            "pooled_dtype": "float32", "caption_template": job.settings["caption_template"],
            "model_digest": job.provenance["model"], "settings_digest": job.provenance["settings"],
            "source_dataset": job.dataset, "source_manifest_digest": source,
        },
        "splits": {},
    }  # fmt: skip
    for split in splits:
        shards = sorted((r for r in rows if r["split"] == split), key=lambda r: r["name"])
        folder, keep = data_folder(job.out_dataset, split), {r["name"] for r in shards}
        sh.remove_stale_shards(store, folder, keep)
        for name in store.listdir(folder):
            if name.endswith(SIDECAR) and name[: -len(SIDECAR)] not in keep:
                store.delete(folder, name)
        manifest["splits"][split] = sh.split_entry(shards)
    sh.write_manifest(store, job.out_dataset, manifest)
    return manifest

"""Ray Data edge: protected sampling and replica checks on actor pools that load their models once.

Sampling: one row per output shard; an actor generates the shard's samples (seeds derived from
(run seed, shard, index), so the images do not depend on the number of actors) and writes the
WebDataset tar atomically. A rerun skips shards that already exist.

Replica check: ``read_webdataset`` over sample (or held-out) shards; an actor embeds each batch and
searches a FAISS index of the training embeddings built once per actor.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ReplicaConfig, SamplerConfig, from_dict
from pipeline.datasets import build_tar, encode_png, images_from_tensor, read_tar, shard_name
from pipeline.guidance import cpsample_guidance
from pipeline.models import load_classifier, load_denoiser, load_schedule, unet_image_shape
from pipeline.replicas import build_index, l2_normalise, nearest
from pipeline.sampling import derive_seed, sample, unet_denoiser
from pipeline.storage import open_store


def shard_plan(num_samples: int, per_shard: int) -> list[dict[str, int]]:
    """Rows ``{"shard": i, "count": n}`` covering ``num_samples`` in shards of ``per_shard``."""
    return [
        {"shard": s, "count": min(per_shard, num_samples - start)}
        for s, start in enumerate(range(0, num_samples, per_shard))
    ]


def sample_seed(run_seed: int, shard: int, index: int) -> int:
    """The seed of sample ``index`` of ``shard``: shared by ``ddim`` and ``cpsample`` for comparisons."""
    return derive_seed("sample", run_seed, shard, index)


def resolve_model_dir(store, location: str, tmp: str | Path) -> Path:
    """A model location is a local folder, or a store-relative path (``models/<run>/denoiser``)."""
    if Path(location).is_dir():
        return Path(location)
    parts = tuple(p for p in location.split("/") if p)
    if not store.exists(*parts):
        raise FileNotFoundError(
            f"model {location!r} is neither a local folder nor under {store.uri}"
        )
    return store.get_dir(Path(tmp) / "/".join(parts), *parts)


def load_models(
    store, denoiser: str, classifier: str | None, cfg: SamplerConfig, device: str, tmp: str
):
    """(unet, schedule, image shape, guidance fn or None); checks the classifier fits the denoiser."""
    den_dir = resolve_model_dir(store, denoiser, tmp)
    unet = load_denoiser(den_dir, device)
    schedule = load_schedule(den_dir)
    shape = unet_image_shape(unet)
    guidance = None
    if cfg.sampler == "cpsample":
        if classifier is None:
            raise ValueError("sampler 'cpsample' needs a classifier checkpoint")
        clf = load_classifier(resolve_model_dir(store, classifier, tmp), shape, device)
        guidance = cpsample_guidance(clf, cfg.alpha, cfg.scale, cfg.input_mode, cfg.guidance_t_max)
    return unet, schedule, shape, guidance


def preflight_models(
    store_uri: str,
    denoiser: str,
    classifier: str | None,
    sampler: SamplerConfig,
    s3_endpoint: str | None = None,
) -> None:
    """Load the models once in the driver so that missing or mismatched checkpoints fail fast."""
    with tempfile.TemporaryDirectory() as tmp:
        load_models(
            open_store(store_uri, s3_endpoint, create=False),
            denoiser,
            classifier,
            sampler,
            "cpu",
            tmp,
        )


class ShardSampler:
    """Ray Data actor: loads the denoiser (and classifier) once, then writes one shard per input row."""

    def __init__(
        self,
        store_uri: str,
        denoiser: str,
        classifier: str | None,
        sampler: dict[str, Any],
        out_folder: str,
        threads: int = 1,
        s3_endpoint: str | None = None,
    ):
        if threads > 0:
            torch.set_num_threads(threads)
        self.cfg = from_dict(SamplerConfig, sampler)
        self.store = open_store(store_uri, s3_endpoint, create=False)
        self.out_folder = out_folder
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._tmp = tempfile.mkdtemp(prefix="cpsample-models-")
        self.unet, self.schedule, self.shape, self.guidance = load_models(
            self.store, denoiser, classifier, self.cfg, self.device, self._tmp
        )

    def _generate(self, shard: int, count: int) -> tuple[bytes, dict[str, float]]:
        cfg = self.cfg
        seeds = [sample_seed(cfg.seed, shard, i) for i in range(count)]
        records, fired_total = [], 0.0
        for lo in range(0, count, cfg.batch_size):
            out = sample(
                unet_denoiser(self.unet), self.schedule, seeds[lo : lo + cfg.batch_size], self.shape,
                cfg.steps, cfg.eta, self.guidance, cfg.clip_sample, self.device,
            )  # fmt: skip
            images = images_from_tensor(out.images)
            for j in range(len(images)):
                i = lo + j
                meta = {
                    "seed": seeds[i], "shard": shard, "index": i, "sampler": cfg.sampler,
                    "steps": cfg.steps, "eta": cfg.eta,
                    "guidance_steps_fired": int(out.fired_steps[j]),
                    "final_p": None if np.isnan(float(out.last_p[j])) else float(out.last_p[j]),
                }  # fmt: skip
                if cfg.sampler == "cpsample":
                    meta.update(
                        alpha=cfg.alpha,
                        scale=cfg.scale,
                        input_mode=cfg.input_mode,
                        guidance_t_max=cfg.guidance_t_max,
                    )
                records.append((f"{cfg.sampler}-{shard:06d}-{i:05d}", encode_png(images[j]), meta))
                fired_total += float(out.fired_fraction[j])
        return build_tar(records), {"fired_fraction_sum": fired_total}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"shard": [], "count": [], "skipped": [], "fired_fraction_sum": []}
        for shard, count in zip(batch["shard"].tolist(), batch["count"].tolist()):
            name = shard_name(shard)
            if self.store.exists(self.out_folder, name):
                # resume: the shard is complete (writes are atomic); reuse its stats
                existing = read_tar(self.store.read_bytes(self.out_folder, name), name)
                fired = sum(
                    m.get("guidance_steps_fired", 0) / max(m.get("steps", 1), 1)
                    for m in existing.meta
                )
                rows["skipped"].append(True)
            else:
                data, stats = self._generate(shard, count)
                self.store.write_bytes(data, self.out_folder, name)
                fired = stats["fired_fraction_sum"]
                rows["skipped"].append(False)
            rows["shard"].append(shard)
            rows["count"].append(count)
            rows["fired_fraction_sum"].append(fired)
        return {k: np.asarray(v) for k, v in rows.items()}


def run_sampling(
    store_uri: str,
    run: str,
    sampler: SamplerConfig,
    denoiser: str,
    classifier: str | None,
    concurrency: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = 0.0,
    s3_endpoint: str | None = None,
) -> dict[str, Any]:
    """Fan ``sampler.num_samples`` out over an actor pool; returns counts and the fired fraction.

    The models are loaded once in the driver first, so a missing or mismatched checkpoint fails before
    Ray starts. ``gpus_per_actor=None`` means 1 when the cluster has GPUs, else 0.
    """
    import dataclasses

    import ray

    from pipeline.ray_init import init_ray

    folder = f"samples/{run}/{sampler.sampler}"
    preflight_models(store_uri, denoiser, classifier, sampler, s3_endpoint)
    if gpus_per_actor is None:
        init_ray()
        gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    plan = shard_plan(sampler.num_samples, sampler.samples_per_shard)
    ds = ray.data.from_items(plan, override_num_blocks=len(plan)).map_batches(
        ShardSampler,
        fn_constructor_kwargs={
            "store_uri": store_uri, "denoiser": denoiser, "classifier": classifier,
            "sampler": dataclasses.asdict(sampler), "out_folder": folder,
            "threads": max(1, int(cpus_per_actor)), "s3_endpoint": s3_endpoint,
        },
        batch_size=1, compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor, num_gpus=gpus_per_actor,
    )  # fmt: skip
    rows = ds.take_all()
    n = sum(int(r["count"]) for r in rows)
    return {
        "folder": folder,
        "num_samples": n,
        "num_shards": len(rows),
        "skipped_shards": int(sum(bool(r["skipped"]) for r in rows)),
        "guidance_fired_fraction": float(
            sum(float(r["fired_fraction_sum"]) for r in rows) / max(n, 1)
        ),
    }


# ------------------------------------------------------------------------------------ replica check
@dataclass
class TrainIndexSpec:
    """What a scoring actor needs to rebuild the training index: embeddings and their keys."""

    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    keys: list[str]
    mean: np.ndarray | None  # (D_pixels,) mean image for the centred embedding, None for raw


class ReplicaScorer:
    """Ray Data actor: builds the FAISS index once, then scores batches of decoded WebDataset rows."""

    def __init__(self, spec: Any, replicas: dict[str, Any]):
        import ray

        spec = ray.get(spec) if isinstance(spec, ray.ObjectRef) else spec
        self.cfg = from_dict(ReplicaConfig, replicas)
        self.keys = spec.keys
        self.mean = spec.mean
        self.index = build_index(
            spec.embeddings, self.cfg.index, self.cfg.nlist, self.cfg.nprobe, self.cfg.use_gpu
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = np.stack([np.asarray(a) for a in batch["png"]]).reshape(len(batch["png"]), -1)
        flat = images.astype(np.float32) / 255.0
        emb = l2_normalise(flat - self.mean if self.mean is not None else flat)
        sims, idx = nearest(self.index, emb, k=1)
        return {
            "key": np.asarray([str(k) for k in batch["__key__"]]),
            "path": np.asarray([str(p) for p in batch["path"]]),
            "nn_key": np.asarray([self.keys[i] for i in idx[:, 0]]),
            "nn_similarity": sims[:, 0].astype(np.float32),
            "is_replicate": sims[:, 0] >= self.cfg.threshold,
        }


def score_shards(
    store_uri: str,
    folder: str,
    spec_ref: Any,
    replicas: ReplicaConfig,
    concurrency: int = 1,
    s3_endpoint: str | None = None,
) -> list[dict[str, Any]]:
    """Nearest training image of every sample in the shards under ``folder`` (Ray Data + FAISS)."""
    import dataclasses

    import ray

    store = open_store(store_uri, s3_endpoint, create=False)
    paths = [store.join(folder, n) for n in store.listdir(folder) if n.endswith(".tar")]
    ds = ray.data.read_webdataset(
        paths,
        filesystem=store.fs,
        include_paths=True,
        decoder=_decode_png_only,
        override_num_blocks=len(paths),
    )
    scored = ds.map_batches(
        ReplicaScorer,
        fn_constructor_kwargs={"spec": spec_ref, "replicas": dataclasses.asdict(replicas)},
        batch_size=512, compute=ray.data.ActorPoolStrategy(size=_scorer_pool(concurrency)), num_cpus=1,
    )  # fmt: skip
    return sorted(scored.take_all(), key=lambda r: r["key"])


def _scorer_pool(requested: int) -> int:
    """Scorers hold one CPU each: leave one CPU of the cluster for the read tasks that feed them."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(requested, cpus - 1))


def _decode_png_only(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode ``.png`` members to arrays; keep the rest as raw bytes (metadata is merged later)."""
    from PIL import Image

    out = dict(sample)
    for key, value in sample.items():
        if key.endswith("png") and isinstance(value, bytes):
            out[key] = np.asarray(Image.open(io.BytesIO(value)))
        elif key.endswith("json") and isinstance(value, bytes):
            out[key] = value.decode()
    return out


def annotate_shards(
    store_uri: str, folder: str, results: list[dict[str, Any]], s3_endpoint: str | None = None
) -> None:
    """Rewrite each sample shard with ``nn_key``/``nn_similarity`` in every ``<key>.json`` (atomic)."""
    store = open_store(store_uri, s3_endpoint, create=False)
    by_key = {r["key"]: r for r in results}
    for name in store.listdir(folder):
        if not name.endswith(".tar"):
            continue
        shard = read_tar(store.read_bytes(folder, name), name)
        records = []
        for key, image, meta in zip(shard.keys, shard.images, shard.meta):
            r = by_key.get(key)
            if r is not None:
                meta = {
                    **meta,
                    "nn_key": str(r["nn_key"]),
                    "nn_similarity": float(r["nn_similarity"]),
                }
            records.append((key, encode_png(image), meta))
        store.write_bytes(build_tar(records), folder, name)


def write_jsonl(store, rows: list[dict[str, Any]], *parts: str) -> str:
    """Rows as JSON lines, written atomically."""
    text = "\n".join(json.dumps({k: _plain(v) for k, v in r.items()}) for r in rows) + "\n"
    return store.write_bytes(text.encode(), *parts)


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v

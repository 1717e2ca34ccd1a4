"""Typed, validated configs, one dataclass per stage.

Every config rejects unknown keys and out-of-range values with a message naming the field and the
allowed range, round-trips through plain dicts (YAML/JSON), and is saved inside every checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config_base import (
    ConfigError,
    _check,
    _positive,
    from_dict,
    load_yaml,
    to_dict,
)
from pipeline.core.config_eval import CompareConfig, EvalConfig, SweepConfig

__all__ = [
    "CompareConfig",
    "ConfigError",
    "EvalConfig",
    "SweepConfig",
    "from_dict",
    "load_yaml",
    "to_dict",
]

# the least fit on its own bits at t < 100 (model card "fit.accuracy") a CPSample classifier needs;
# below it CPSample is plain DDIM at a cost (DESIGN.md section 10): SamplerConfig.min_fit's default
MIN_FIT = 0.9


@dataclass
class UNetConfig:
    """Architecture of the diffusers ``UNet2DModel`` denoiser (eps-prediction)."""

    sample_size: int = 16
    channels: int = 1
    # 0.82M parameters: memorises 64 digits in as many epochs as (32, 64, 64) did, at 0.7x its step time
    block_out_channels: tuple[int, ...] = (24, 48, 64)
    layers_per_block: int = 1
    attention_levels: tuple[int, ...] = ()
    norm_num_groups: int = 8

    def __post_init__(self) -> None:
        _check(self.sample_size >= 4, f"sample_size must be >= 4, got {self.sample_size}")
        _check(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        _check(len(self.block_out_channels) >= 1, "block_out_channels must not be empty")
        _positive("norm_num_groups", self.norm_num_groups)
        for ch in self.block_out_channels:
            _check(
                ch % self.norm_num_groups == 0,
                f"block_out_channels {ch} must be divisible by norm_num_groups {self.norm_num_groups}",
            )
        n = len(self.block_out_channels)
        for lvl in self.attention_levels:
            _check(0 <= lvl < n, f"attention_levels entries must be in [0, {n}), got {lvl}")
        _check(
            self.sample_size % 2 ** (n - 1) == 0,
            f"sample_size {self.sample_size} must be divisible by 2**(levels-1) = {2 ** (n - 1)}",
        )


def _check_input(cfg) -> None:
    """The streaming-input fields shared by the train configs."""
    _check(
        cfg.cache_max_bytes >= 0,
        f"cache_max_bytes must be >= 0 (0: always stream), got {cfg.cache_max_bytes}",
    )
    _positive("shuffle_buffer", cfg.shuffle_buffer)


@dataclass
class DenoiserTrainConfig:
    """Training of the denoiser: eps-prediction MSE at uniform t (Ho et al. 2020, eq. 14), with EMA."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 400
    num_to_keep: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1: no limit
    lr_schedule: str = "constant"  # after the warm-up: "constant" or "cosine" (to 0 at `steps`)
    mixed_precision: bool = True  # bf16 autocast when the worker's device is CUDA; ignored on CPU
    # input: a worker whose share of the decoded images (uint8) is at most this many bytes reads it
    # once and keeps it in memory; a larger one streams every epoch (0: always stream)
    cache_max_bytes: int = 256 * 2**20
    shuffle_buffer: int = 1024  # rows in a streaming worker's seeded shuffle buffer

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "num_workers", "checkpoint_every", "num_to_keep"):
            _positive(name, getattr(self, name))
        _check_input(self)
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(self.max_failures >= -1, f"max_failures must be >= -1, got {self.max_failures}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.lr_schedule in ("constant", "cosine"),
            f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}",
        )


@dataclass
class ClassifierArchConfig:
    """The noise-conditioned random-label classifier ``c_phi(x_t, t)`` (one logit); on latents,
    ``channels`` are the VAE's latent channels and ``cond_dim > 0`` adds a pooled text embedding."""

    sample_size: int = 16
    channels: int = 1  # 1 or 3 for images, 4 for Stable Diffusion latents (at most 16)
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 2)
    time_embed_dim: int = 64
    num_groups: int = 8
    cond_dim: int = 0  # 0: c_phi(x_t, t); > 0: c_phi(x_t, t, pooled) with pooled of this size

    def __post_init__(self) -> None:
        _positive("base_channels", self.base_channels)
        _positive("num_groups", self.num_groups)
        _check(
            self.time_embed_dim >= 2 and self.time_embed_dim % 2 == 0,
            f"time_embed_dim must be an even number >= 2, got {self.time_embed_dim}",
        )
        _check(
            self.base_channels % self.num_groups == 0,
            f"base_channels {self.base_channels} must be divisible by num_groups {self.num_groups}",
        )
        _check(1 <= self.channels <= 16, f"channels must be in [1, 16], got {self.channels}")
        _check(self.cond_dim >= 0, f"cond_dim must be >= 0 (0: unconditioned), got {self.cond_dim}")
        _check(len(self.channel_mults) >= 1, "channel_mults must not be empty")
        down = 2 ** (len(self.channel_mults) - 1)
        _check(
            self.sample_size % down == 0,
            f"sample_size {self.sample_size} must be divisible by {down} for {self.channel_mults}",
        )
        for m in self.channel_mults:
            _check(
                (self.base_channels * m) % self.num_groups == 0,
                f"base_channels*mult = {self.base_channels * m} must divide by num_groups {self.num_groups}",
            )


@dataclass
class ClassifierTrainConfig:
    """Training of the classifier on random bits: BCE on x_t at uniform t (CPSample, Algorithm 1)."""

    # 1,600: calibrated at the demo's ~1,000 bits; jobs/train_classifier.py sizes steps and width
    # from N (pipeline.core.classifier_sizing) and records that N here (sized_for; 0: by hand)
    steps: int = 1600
    sized_for: int = 0
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    label_seed: int = 1234
    holdout_images: int = 1000
    t_max: int = 600
    mixup: float = 0.0
    train_fraction: float = 0.5
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    checkpoint_every: int = 400
    num_to_keep: int = 2
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1: no limit
    # the learning rate: linear warm-up over `warmup_steps`, then "cosine" (to 0 at `steps`) or "constant"
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    mixed_precision: bool = True  # bf16 autocast when the worker's device is CUDA; ignored on CPU
    # input, as in DenoiserTrainConfig: cache a worker's decoded share up to this many bytes (0:
    # always stream); the rows of a streaming worker's seeded shuffle buffer
    cache_max_bytes: int = 256 * 2**20
    shuffle_buffer: int = 1024
    # fit metrics (rank 0, at checkpoints): on at most this many training and never-seen images,
    # in forward passes of at most metrics_batch images
    metrics_samples: int = 2048
    metrics_batch: int = 256
    # the random bits' source: "key" (the paper: a bit per training key), "cluster" (a bit per
    # near-duplicate cluster of clusters/<dataset>/<clusters_embedding>, made by
    # jobs/cluster_duplicates.py: every copy of a picture carries the same bit) or "auto" (cluster
    # bits wherever those clusters exist, else key bits); the choice is recorded in the model
    labels: str = "auto"
    clusters_embedding: str = "centred"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lr", "num_workers", "checkpoint_every", "num_to_keep"):
            _positive(name, getattr(self, name))
        _check_input(self)
        _check(
            self.labels in ("auto", "key", "cluster"),
            f"labels must be 'auto', 'key' or 'cluster', got {self.labels!r}",
        )
        _check(
            self.clusters_embedding in ("centred", "raw"),
            f"clusters_embedding must be 'centred' or 'raw', got {self.clusters_embedding!r}",
        )
        _positive("metrics_samples", self.metrics_samples)
        _positive("metrics_batch", self.metrics_batch)
        _check(self.max_failures >= -1, f"max_failures must be >= -1, got {self.max_failures}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.lr_schedule in ("constant", "cosine"),
            f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.sized_for >= 0, f"sized_for must be >= 0 (0: not sized), got {self.sized_for}")
        _check(self.holdout_images >= 0, f"holdout_images must be >= 0, got {self.holdout_images}")
        _check(1 <= self.t_max <= 1000, f"t_max must be in [1, 1000], got {self.t_max}")
        _check(0.0 <= self.mixup <= 1.0, f"mixup must be in [0, 1], got {self.mixup}")
        _check(
            0.0 <= self.train_fraction < 1.0,
            f"train_fraction must be in [0, 1) (0 = sample the union uniformly), got {self.train_fraction}",
        )


@dataclass
class SamplerConfig:
    """DDIM sampling, plain (``ddim``) or protected (``cpsample``; ``amg``: the baseline, pipeline.core.amg)."""

    sampler: str = "cpsample"
    num_samples: int = 512
    steps: int = 50
    eta: float = 0.0
    alpha: float = 0.5
    scale: float = 5.0
    input_mode: str = "x_t"
    guidance_t_max: int = 600
    batch_size: int = 128
    samples_per_shard: int = 128
    seed: int = 0
    clip_sample: bool = True
    # guard mode: a sample whose nearest training image has similarity >= guard (under
    # guard_embedding, exact search) is discarded and regenerated with a fresh derived seed;
    # guard_budget is the number of regenerations allowed per output shard. None = off.
    guard: float | None = None
    guard_budget: int = 128
    guard_embedding: str = "centred"
    # amg: dissimilarity guidance where the predicted x0's nearest training image (guard_embedding,
    # the stored index) is at or above amg_threshold, the replica rule's own 0.97; amg_scale is its s
    amg_threshold: float = 0.97
    amg_scale: float = 300.0
    # cpsample refuses a classifier whose model card (config.json "fit") is below min_fit unless
    # allow_unfit; neither changes a sample, so neither is in the samples' fingerprint
    min_fit: float = MIN_FIT
    allow_unfit: bool = False

    def __post_init__(self) -> None:
        _check(self.sampler in ("ddim", "cpsample", "amg"), f"sampler must be 'ddim' or 'cpsample' (or 'amg', the baseline), got {self.sampler!r}")  # fmt: skip
        _check(0.0 < self.alpha <= 0.5, f"alpha must be in (0, 0.5], got {self.alpha}")
        _check(self.scale >= 0, f"scale must be >= 0, got {self.scale}")
        _check(self.eta >= 0, f"eta must be >= 0, got {self.eta}")
        _check(1 <= self.steps <= 1000, f"steps must be in [1, 1000], got {self.steps}")
        _check(self.input_mode in ("x_t", "x0"), f"input_mode must be 'x_t' or 'x0', got {self.input_mode!r}")  # fmt: skip
        _check(1 <= self.guidance_t_max <= 1000, f"guidance_t_max must be in [1, 1000], got {self.guidance_t_max}")  # fmt: skip
        for name in ("num_samples", "batch_size", "samples_per_shard"):
            _positive(name, getattr(self, name))
        _check(
            self.guard is None or -1.0 <= self.guard <= 1.0,
            f"guard must be a cosine similarity in [-1, 1] (or unset), got {self.guard}",
        )
        _check(self.guard_budget >= 0, f"guard_budget must be >= 0, got {self.guard_budget}")
        _check(
            self.guard_embedding in ("centred", "raw"),
            f"guard_embedding must be 'centred' or 'raw', got {self.guard_embedding!r}",
        )
        _check(-1.0 <= self.amg_threshold <= 1.0, f"amg_threshold must be a cosine similarity in [-1, 1], got {self.amg_threshold}")  # fmt: skip
        _check(self.amg_scale >= 0, f"amg_scale must be >= 0 (the dissimilarity guidance scale), got {self.amg_scale}")  # fmt: skip
        _check(0.5 < self.min_fit <= 1.0, f"min_fit must be in (0.5, 1] (an accuracy on random bits; 0.5 is chance), got {self.min_fit}")  # fmt: skip


@dataclass
class ReplicaConfig:
    """Replica check: embedding, FAISS index and the copy threshold. ``embedding``: "centred", "raw"
    or "module:<path>", a local TorchScript file mapping (N, C, H, W) floats to (N, D), e.g. SSCD
    (weights CC-BY-NC: bring your own; :mod:`pipeline.fanout.embedders`). ``threshold``: 0.97 is for
    centred pixels only; on SSCD features a copy is cosine > 0.5 (Somepalli et al. 2023)."""

    embedding: str = "centred"
    threshold: float = 0.97
    embedding_size: int = 0  # module: resize to this square size first (0: as stored)
    embedding_norm: str = "imagenet"  # module: "imagenet" mean/std of [0, 1] RGB, or "none"
    embedding_channels: int = 3  # module: its input channels (grey replicated, RGB made grey)
    embedding_batch: int = 64  # module: images per forward pass
    # the stored index (fanout.replica_index): "auto" = exact IndexFlatIP up to exact_max_images
    # training images, else PCA + IVF re-ranked exactly; "flat" / "ivf" force a kind
    index: str = "auto"
    exact_max_images: int = 50_000
    nlist: int = 0  # IVF lists; 0: about 4 * sqrt(N) (at most N / 39)
    nprobe: int = 256  # IVF lists probed per query (a search setting: changing it rebuilds nothing)
    pca_dims: int = 256  # IVF: PCA to this many dims first (none when the embedding is smaller)
    ivf_codec: str = "sq8"  # IVF list codes: "sq8" (8-bit scalar quantiser) or "flat" (float32)
    rerank_k: int = 32  # IVF: candidates re-ranked by the exact full-dimensional similarity
    train_samples: int = 0  # IVF: training rows (k-means, PCA); 0: min(N, max(39 * nlist, 20000))
    rows_per_task: int = 20_000  # build: training rows per Ray task (bounds each task's memory)
    measure_queries: int = 512  # build: queries (perturbed training + held-out) for recall@1
    use_gpu: bool = False
    recall_queries: int = 1000  # samples whose IVF neighbour is checked against exact search
    pairs_k: int = 16  # the k closest sample/training pairs drawn in the report

    def __post_init__(self) -> None:
        emb, path = self.embedding, self.embedding.removeprefix("module:")
        msg = f"embedding must be 'centred', 'raw' or 'module:<path to a TorchScript file>', got {emb!r}"
        _check(emb in ("centred", "raw") or (emb != path and bool(path)), msg)
        missing = f"embedding module file not found: {path} (a local file; nothing is downloaded)"
        _check(emb == path or Path(path).expanduser().is_file(), missing)
        _check(self.embedding_norm in ("imagenet", "none"), f"bad embedding_norm {self.embedding_norm!r}: use 'imagenet' or 'none'")  # fmt: skip
        _check(self.embedding_channels in (1, 3), f"embedding_channels must be 1 or 3, got {self.embedding_channels}")  # fmt: skip
        _check(-1.0 <= self.threshold <= 1.0, f"threshold must be in [-1, 1], got {self.threshold}")
        _check(
            self.index in ("auto", "flat", "ivf"),
            f"index must be 'flat' or 'ivf' (or 'auto', the default), got {self.index!r}",
        )
        codecs = ("flat", "sq8")
        _check(self.ivf_codec in codecs, f"ivf_codec must be in {codecs}, got {self.ivf_codec!r}")
        for name in ("nlist", "train_samples", "embedding_size"):  # 0: automatic / as stored
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("exact_max_images", "nprobe", "pca_dims", "rerank_k", "rows_per_task",
                     "measure_queries", "recall_queries", "pairs_k", "embedding_batch"):  # fmt: skip
            _positive(name, getattr(self, name))


@dataclass
class DuplicatesConfig:
    """The duplicated-data scenario (``jobs/demo.py --scenario duplicates``): ``k`` training images
    each get ``m`` near-duplicate copies under new keys (:mod:`pipeline.data.duplicates`), and the
    near-duplicate clusters (:mod:`pipeline.fanout.clusters`) are found at ``cluster_threshold``."""

    k: int = 16
    m: int = 100
    shift: int = 0  # pixels; 1 px on the 16x16 digits already drops the copies' similarity to ~0.72
    brightness: float = 0.06
    contrast: float = 0.1
    noise: float = 0.02
    cluster_threshold: float = 0.97
    cluster_k: int = 32  # neighbours per image searched when the index is IVF

    def __post_init__(self) -> None:
        _positive("k", self.k)
        _positive("m", self.m)
        _positive("cluster_k", self.cluster_k)
        _check(self.shift >= 0, f"shift must be >= 0, got {self.shift}")
        for name in ("brightness", "contrast", "noise"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(
            0.0 < self.cluster_threshold <= 1.0,
            f"cluster_threshold must be in (0, 1], got {self.cluster_threshold}",
        )


@dataclass
class DemoConfig:
    """Every stage of the demo; defaults are the documented, calibrated ones (see README)."""

    dataset: str = "digits"
    num_train: int = 64
    num_holdout: int | None = None  # cap on the held-out images (None: all the rest)
    split_seed: int = 0
    seed: int = 0
    ray_cpus: int = 2
    unet: UNetConfig = field(default_factory=UNetConfig)
    denoiser: DenoiserTrainConfig = field(default_factory=DenoiserTrainConfig)
    classifier_arch: ClassifierArchConfig = field(default_factory=ClassifierArchConfig)
    classifier: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    sample_concurrency: int = 2
    quality_epochs: int = 30
    # the privacy block: a small (alpha, s) sweep with Ray Tune and membership-inference attack 1
    # (128 samples a point and no DDIM point: the main DDIM run is the reference; keeps the demo short)
    sweep: SweepConfig = field(
        default_factory=lambda: SweepConfig(num_samples=128, include_ddim=False)
    )
    mia_members: int = 64
    mia_nonmembers: int = 256
    compare: CompareConfig = field(default_factory=CompareConfig)  # the side-by-side sampler table
    # the duplicated-data scenario (None: the plain demo); see DuplicatesConfig
    duplicates: DuplicatesConfig | None = None

    def __post_init__(self) -> None:
        _check(self.num_train >= 2, f"num_train must be >= 2, got {self.num_train}")
        _check(
            self.num_holdout is None or self.num_holdout >= 2,
            f"num_holdout must be >= 2 (or unset), got {self.num_holdout}",
        )
        _positive("mia_members", self.mia_members)
        _positive("mia_nonmembers", self.mia_nonmembers)
        _positive("ray_cpus", self.ray_cpus)
        _positive("sample_concurrency", self.sample_concurrency)
        _positive("quality_epochs", self.quality_epochs)

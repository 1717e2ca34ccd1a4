"""Pluggable replica-check embeddings: pixels (centred, raw) or a local TorchScript module.

``ReplicaConfig.embedding = "module:<path>"`` names a local TorchScript file (``torch.jit.load``
only: a pickled file is refused before anything in it is read, never unpickled, and nothing is ever
downloaded) mapping a float batch (N, C, H, W) to (N, D) vectors, e.g. the SSCD copy-detection
descriptor (Pizzi et al. 2022) that Somepalli et al. (2023) use on photographs; its weights are
CC-BY-NC, so the file is the user's own. Images are resized to ``embedding_size`` (0: as stored),
scaled to [0, 1], matched to ``embedding_channels`` (grey replicated to RGB, RGB averaged to grey
by luma) and normalised by ``embedding_norm``; the vectors are L2-normalised (inner product = cosine).

The file's sha256 enters the stored index's build parameters (:func:`module_params`), so changed
weights make a stored index stale: it is rebuilt, never used; loading a build checks the digest
again (:func:`row_embedder`). Threshold: the default 0.97 is calibrated for centred pixels only; on
SSCD features the literature calls a pair a copy at cosine > 0.5 (Somepalli et al. 2023 use 0.5;
Pizzi et al. calibrate around 0.5-0.6 on DISC21).

Ray-free: used inside the index's build and search tasks and by the scoring actors.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError, ReplicaConfig
from pipeline.data.provenance import StaleArtifactError

PREFIX = "module:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601: RGB -> grey for a one-channel module


class EmbeddingError(ConfigError):
    """An embedding module that cannot be used: not TorchScript, or the wrong input/output."""


def is_module(embedding: str) -> bool:
    return embedding.startswith(PREFIX)


def module_path(embedding: str) -> Path:
    """The local file of a ``module:<path>`` embedding (absolute)."""
    path = Path(embedding.removeprefix(PREFIX)).expanduser()
    if not embedding.startswith(PREFIX) or not str(embedding.removeprefix(PREFIX)):
        raise ConfigError(f"not a module embedding: {embedding!r} (use 'module:<path>')")
    if not path.is_file():
        raise ConfigError(f"embedding module file not found: {path} (nothing is downloaded)")
    return path.resolve()


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file, streamed; cached per (path, size, mtime, inode)."""
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def embedding_id(cfg: ReplicaConfig) -> str:
    """A folder-safe id of the embedding for ``index_folder``: ``centred``, ``raw`` or
    ``module-<first 12 hex digits of the weights file's sha256>``."""
    if not is_module(cfg.embedding):
        return cfg.embedding
    return f"module-{file_digest(module_path(cfg.embedding))[:12]}"


def module_options(cfg: ReplicaConfig) -> dict[str, Any]:
    """The preprocessing settings of a module embedding (what its vectors depend on, besides the
    weights)."""
    return {"size": cfg.embedding_size, "norm": cfg.embedding_norm,
            "channels": cfg.embedding_channels}  # fmt: skip


def module_params(cfg: ReplicaConfig) -> dict[str, Any] | None:
    """What a stored index built with a module embedding is a function of: the weights' sha256 and
    the preprocessing (None for the pixel embeddings). Part of the build parameters."""
    if not is_module(cfg.embedding):
        return None
    return {"sha256": file_digest(module_path(cfg.embedding)), **module_options(cfg)}


def module_spec(cfg: ReplicaConfig) -> dict[str, Any] | None:
    """:func:`module_params` plus where to load it from and the batch size (for the sidecar)."""
    params = module_params(cfg)
    if params is None:
        return None
    return {**params, "path": str(module_path(cfg.embedding)), "batch": cfg.embedding_batch}


# ------------------------------------------------------------------------------------- loading
def check_torchscript(path: Path) -> None:
    """Refuse anything that is not a TorchScript archive before torch reads it: a TorchScript file is
    a zip holding ``<name>/code/``; ``torch.save`` files (pickles) have none and are not opened."""
    if not zipfile.is_zipfile(path):
        raise EmbeddingError(
            f"{path} is not a TorchScript file (not a zip archive; a pickle?): export the model "
            "with torch.jit.script(model).save(path) or torch.jit.trace(model, x).save(path)"
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if not any("/code/" in n for n in names) or not any(n.endswith("constants.pkl") for n in names):
        raise EmbeddingError(
            f"{path} is not a TorchScript file (a torch.save archive, e.g. a state dict, holds no "
            "code/): export the model with torch.jit.script(model).save(path) or "
            "torch.jit.trace(model, x).save(path); pickled files are never loaded"
        )


def _device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModuleEmbedding:
    """A TorchScript embedding, loaded once: ``__call__(uint8 images (N, H, W, C) or (N, H, W))`` ->
    (N, D) float32 L2-normalised rows, ``batch`` images at a time under ``torch.no_grad()``."""

    def __init__(
        self,
        path: str | Path,
        size: int = 0,
        norm: str = "imagenet",
        channels: int = 3,
        batch: int = 64,
        device: str | None = None,
    ):
        import torch

        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"embedding module file not found: {self.path}")
        if norm not in ("imagenet", "none") or channels not in (1, 3) or size < 0 or batch < 1:
            raise ConfigError(f"bad module options: {size=}, {norm=}, {channels=}, {batch=}")
        check_torchscript(self.path)
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript (still loads)
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(str(self.path), map_location="cpu")
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EmbeddingError(
                f"{self.path}: not a loadable TorchScript module: {first}"
            ) from None
        self.device = _device(device)
        self.module = self.module.to(self.device).eval()
        self.size, self.norm, self.channels, self.batch = size, norm, channels, batch
        self.sha256 = file_digest(self.path)

    def _prepare(self, images: np.ndarray):
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).to(self.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0  # (n, C, H, W) in [0, 1]
        if x.shape[1] == 4:  # RGBA: drop alpha
            x = x[:, :3]
        if x.shape[1] != self.channels:
            if self.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif self.channels == 1 and x.shape[1] == 3:
                x = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            else:
                raise EmbeddingError(f"cannot give {x.shape[1]}-channel images to {self.path}")
        if self.size and tuple(x.shape[2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        if self.norm == "imagenet":
            c = self.channels
            mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            if c == 1:
                mean, std = mean.mean(1, keepdim=True), std.mean(1, keepdim=True)
            x = (x - mean) / std
        return x.contiguous()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"expected images (N, H, W, C), got shape {images.shape}")
        out = []
        with torch.no_grad():
            for lo in range(0, len(images), self.batch):
                x = self._prepare(images[lo : lo + self.batch])
                try:
                    y = self.module(x)
                except Exception as exc:  # a TorchScript error: wrong input shape or channels
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
                    raise EmbeddingError(
                        f"{self.path} failed on a batch of shape {tuple(x.shape)}: {first} "
                        "(check embedding_size, embedding_channels, embedding_norm)"
                    ) from None
                if not isinstance(y, torch.Tensor) or y.ndim != 2 or len(y) != len(x):
                    shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                    raise EmbeddingError(
                        f"{self.path} must map (N, C, H, W) to (N, D) vectors, gave {shape}"
                    )
                out.append(y.float().cpu().numpy())
        if not out:
            return np.empty((0, 0), np.float32)
        emb = np.concatenate(out).astype(np.float32)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


_LOADED: dict[tuple, ModuleEmbedding] = {}


def load_module(spec: dict[str, Any], device: str | None = None) -> ModuleEmbedding:
    """The module a spec (:func:`module_spec`, a sidecar's ``module``) names, loaded once per
    process; a file whose sha256 is not the spec's raises :class:`StaleArtifactError`."""
    path = Path(spec["path"])
    if not path.is_file():
        raise ConfigError(f"embedding module file not found: {path} (needed on every node)")
    digest = file_digest(path)
    if digest != spec["sha256"]:
        raise StaleArtifactError(
            f"the embedding module {path} changed since the index was built (sha256 "
            f"{digest[:12]}, built with {spec['sha256'][:12]}): rebuild it (jobs/build_index.py)"
        )
    key = (str(path), digest, spec["size"], spec["norm"], spec["channels"], spec["batch"], device)
    if key not in _LOADED:
        _LOADED[key] = ModuleEmbedding(
            path, spec["size"], spec["norm"], spec["channels"], spec["batch"], device
        )
    return _LOADED[key]


def module_dims(spec: dict[str, Any], shape: tuple[int, ...] | list[int]) -> int:
    """D of the module's vectors for images of ``shape`` (H, W, C): one probe image."""
    return int(load_module(spec)(np.zeros((1, *shape), np.uint8)).shape[1])


def _pixels(rows: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    flat = np.asarray(rows).reshape(len(rows), -1).astype(np.float32) / 255.0
    flat = flat - mean if mean is not None else flat
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


class RowEmbedder:
    """Picklable embedding of uint8 image rows (any shape (n, ...), reshaped to ``shape``): the
    pixels (minus ``mean`` when centred), or the module ``spec`` names (loaded once per process,
    its digest checked)."""

    def __init__(self, shape, mean: np.ndarray | None = None, spec: dict[str, Any] | None = None):
        self.shape, self.mean, self.spec = tuple(shape), mean, spec

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.spec is None:
            return _pixels(rows, self.mean)
        return load_module(self.spec)(np.asarray(rows).reshape(len(rows), *self.shape))


def row_embedder(sidecar: dict[str, Any], mean: np.ndarray | None = None) -> RowEmbedder:
    """The embedding a stored build was made with (its sidecar), for its rows and its queries."""
    return RowEmbedder(sidecar["image_shape"], mean, sidecar.get("module"))


def make_module_embedding(embedding: str, **options):
    """``module:<path>`` as an in-memory embedding (options: size, norm, channels, batch)."""
    path = module_path(embedding)
    spec = {"path": str(path), "sha256": file_digest(path), "size": 0, "norm": "imagenet",
            "channels": 3, "batch": 64, **options}  # fmt: skip
    return load_module(spec)

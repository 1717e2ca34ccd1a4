"""FID (Heusel et al. 2017) with the standard Inception weights, read from a local file only.

The standard FID network is the TensorFlow Inception of 2015-12-05, as ported to PyTorch by
pytorch-fid (``pt_inception-2015-12-05-6726825d.pth``: a plain state dict of torchvision's
``Inception3`` layout with 1008 classes). Its blocks differ slightly from torchvision's ImageNet
Inception v3 (average pooling without the padded zeros, a max-pooled branch in the last block); the
``_Fid*`` classes below reproduce those differences on top of torchvision's blocks. torchvision's own
ImageNet weights (``inception_v3_google-0cc3c7bd.pth``, 1000 classes) are accepted too; the metric is
then named ``FID-torchvision`` because its values are not comparable with published FIDs.

Nothing is downloaded: the file is read with ``torch.load(weights_only=True)`` or safetensors.
Features are the 2048-d pool3 activations of images resized to 299x299 (bilinear) in [-1, 1].
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
WEIGHTS_HELP = (
    f"provide the FID Inception weights as a local file: {FID_WEIGHTS_NAME} (a PyTorch state dict, "
    f"the standard FID network of pytorch-fid; fetch it elsewhere from {FID_WEIGHTS_URL}), or the "
    "same tensors saved as .safetensors; torchvision's inception_v3_google-0cc3c7bd.pth is accepted "
    "as a non-standard alternative. Nothing is downloaded at run time"
)


class InceptionWeightsError(ValueError):
    """The Inception weights file is missing, unreadable or of the wrong network."""


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF's average pooling ignores the padded zeros
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _fid_blocks():
    from torchvision.models import inception as tv

    class FidA(tv.InceptionA):
        def forward(self, x):
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)

    class FidC(tv.InceptionC):
        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                          self.branch7x7dbl_4, self.branch7x7dbl_5):  # fmt: skip
                d = layer(d)
            return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)

    class FidE(tv.InceptionE):
        def __init__(self, in_channels: int, pool: str):
            super().__init__(in_channels)
            self.pool = pool

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            # the last block of the TF graph max-pools
            pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
            return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)

    return FidA, FidC, FidE


def build_inception(variant: str = "fid", random_init: bool = False) -> nn.Module:
    """An Inception3 (``fid``: 1008 classes and the TF blocks; ``torchvision``: 1000) to load weights
    into; ``random_init`` draws variance-preserving (He) weights, for tests without a weights file."""
    from torchvision.models.inception import Inception3

    if variant == "torchvision":
        net = Inception3(num_classes=1000, aux_logits=True, init_weights=False)
        return _he_init(net) if random_init else net
    if variant != "fid":
        raise ValueError(f"unknown Inception variant {variant!r}: use 'fid' or 'torchvision'")
    net = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    FidA, FidC, FidE = _fid_blocks()
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FidA(192, 32), FidA(256, 64), FidA(288, 64)
    net.Mixed_6b = FidC(768, 128)
    net.Mixed_6c, net.Mixed_6d = FidC(768, 160), FidC(768, 160)
    net.Mixed_6e = FidC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FidE(1280, "avg"), FidE(2048, "max")
    return _he_init(net) if random_init else net


def _he_init(net: nn.Module) -> nn.Module:
    # BatchNorm in eval mode is the identity at init, so He-normal weights keep activations O(1)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def _read_state_dict(path: Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the file ``path``, or in ``data`` (that file's bytes, read elsewhere)."""
    if data is None and not path.is_file():
        raise InceptionWeightsError(
            f"Inception weights file {str(path)!r} does not exist: {WEIGHTS_HELP}"
        )
    source = str(path) if data is None else io.BytesIO(data)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load, load_file

            state = load_file(source) if data is None else load(data)
        else:
            state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a tensor archive...
        raise InceptionWeightsError(
            f"{path}: not a readable weights file ({type(exc).__name__}: {exc}); {WEIGHTS_HELP}"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise InceptionWeightsError(
            f"{path}: not an Inception v3 state dict (no 'fc.weight'); {WEIGHTS_HELP}"
        )
    return state


def load_inception(path: str | Path, data: bytes | None = None) -> tuple[nn.Module, str]:
    """(network in eval mode, metric name) from a local weights file (or ``data``, its bytes, on a
    node that does not have the file); the variant is read off the classifier's size (1008 classes =
    the FID network, 1000 = torchvision's ImageNet weights)."""
    path = Path(path)
    state = _read_state_dict(path, data)
    classes = int(state["fc.weight"].shape[0])
    variant = {1008: "fid", 1000: "torchvision"}.get(classes)
    if variant is None:
        raise InceptionWeightsError(
            f"{path}: fc layer has {classes} classes, expected 1008 (FID) or 1000; {WEIGHTS_HELP}"
        )
    net = build_inception(variant)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InceptionWeightsError(f"{path}: tensors do not fit Inception v3: {exc}") from exc
    return net.eval(), "FID" if variant == "fid" else "FID-torchvision"


@dataclass
class InceptionFeatures:
    """Pool3 features (2048-d) of an Inception network; ``name`` is the metric's name."""

    net: nn.Module
    name: str
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.net = self.net.to(self.device)

    @classmethod
    def from_file(
        cls, path: str | Path, batch_size: int = 32, device: str = "cpu", data: bytes | None = None
    ) -> InceptionFeatures:
        net, name = load_inception(path, data)
        return cls(net, name, batch_size, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) images in [-1, 1], C in {1, 3} -> (N, 2048) float64, ``batch_size`` images
        at a time on ``device``."""
        out = []
        for xb in images.split(self.batch_size):
            xb = xb.to(self.device, torch.float32)
            if xb.shape[1] == 1:
                xb = xb.expand(-1, 3, -1, -1)
            xb = F.interpolate(xb, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self._pool3(xb).double().cpu())
        return torch.cat(out).numpy()

    def of_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) images -> (N, 2048) float64 (scaled to [-1, 1] as the models use)."""
        from pipeline.data.imageset import images_to_tensor

        return self(images_to_tensor(np.ascontiguousarray(images)))

    def _pool3(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1",
                     "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
                     "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):  # fmt: skip
            x = getattr(n, name)(x)
        return x.flatten(1)


def inception_embedder(
    path: str | Path, batch_size: int = 32, device: str = "cpu", data: bytes | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (N, H, W, C) -> pool3 features (N, 2048), the network loaded once from ``path`` (or
    ``data``, the file's bytes shipped with the factory to nodes without the file), on ``device``:
    what each feature actor builds (:mod:`pipeline.fanout.features`, ``make_embed``)."""
    return InceptionFeatures.from_file(path, batch_size, device, data).of_uint8


def frechet_distance_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})`` (Heusel et al. 2017, eq. 6) from
    feature rows (N1, D) and (N2, D).

    ``Tr (S1 S2)^{1/2}`` is the sum of square roots of the eigenvalues of ``S1 S2``, which are those of
    the small symmetric PSD matrix ``X1 X2^T X2 X1^T / ((N1-1)(N2-1))`` (X = centred rows): exact, and
    an (N1, N1) eigenproblem instead of a (D, D) matrix square root when N < D.
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    if len(f1) < 2 or len(f2) < 2:
        raise ValueError(f"need at least 2 feature rows per set, got {len(f1)} and {len(f2)}")
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    c1, c2 = len(f1) - 1.0, len(f2) - 1.0
    if len(f1) > len(f2):  # the smaller eigenproblem; the trace term is symmetric
        x1, x2, c1, c2 = x2, x1, c2, c1
    cross = x1 @ x2.T  # (N1, N2)
    eig = np.linalg.eigvalsh(cross @ cross.T / (c1 * c2))
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = f1.mean(0) - f2.mean(0)
    tr1 = (x1 * x1).sum() / c1
    tr2 = (x2 * x2).sum() / c2
    return float(max(diff @ diff + tr1 + tr2 - 2.0 * tr_sqrt, 0.0))


def fid(features: InceptionFeatures, images: torch.Tensor, reference: torch.Tensor) -> float:
    """FID between two image sets (N, C, H, W) in [-1, 1] in the given Inception's pool3 space."""
    return frechet_distance_features(features(images), features(reference))

"""The random-label classifier as a diffusers model: ``save_pretrained`` / ``from_pretrained``.

:class:`CPSampleClassifier` is a ``ModelMixin`` + ``ConfigMixin`` around the project's
:class:`pipeline.core.models.NoiseClassifier` (``c_phi(x_t, t)``, or ``c_phi(x_t, t, pooled)`` for
text-conditioned latent classifiers). ``from_pretrained`` reads either layout:

- what ``jobs/train_classifier.py`` writes (``model.safetensors`` with the architecture in its
  metadata, ``config.json`` with the training record and fit card, ``provenance.json``), from a
  local folder or ``s3://bucket/prefix/models/<run>/classifier``;
- what ``save_pretrained`` writes (diffusers' ``config.json`` and
  ``diffusion_pytorch_model.safetensors``).

Either way the classifier carries its record (``cpsample``: the schedule it was trained on, its
``t_max``, its fit card and the provenance of the run), so a pipeline can refuse a classifier
trained for another noise schedule, and a saved copy keeps the record.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from pipeline.core.config import ClassifierArchConfig, to_dict
from pipeline.core.models import (
    CLASSIFIER_WEIGHTS,
    CheckpointError,
    NoiseClassifier,
    betas_digest,
    load_classifier,
    load_classifier_config,
    schedule_from_config,
)
from pipeline.data.provenance import read_provenance


class CPSampleClassifier(ModelMixin, ConfigMixin):
    """``c_phi(x_t, t[, cond])``: the logit of a noisy image's (or latent's) random bit.

    Arguments are :class:`pipeline.core.config.ClassifierArchConfig`'s fields, plus ``cpsample``:
    the training record (``train``, ``schedule``, ``fit``, ``provenance``) that
    ``train_classifier`` wrote, kept in ``config.json`` by ``save_pretrained``.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        channels: int = 1,
        base_channels: int = 16,
        channel_mults: tuple[int, ...] = (1, 2, 2),
        time_embed_dim: int = 64,
        num_groups: int = 8,
        cond_dim: int = 0,
        cpsample: dict[str, Any] | None = None,
    ):
        super().__init__()
        arch = ClassifierArchConfig(
            sample_size=sample_size,
            channels=channels,
            base_channels=base_channels,
            channel_mults=tuple(channel_mults),
            time_embed_dim=time_embed_dim,
            num_groups=num_groups,
            cond_dim=cond_dim,
        )
        self.net = NoiseClassifier(arch)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, C, H, W), t (B,) -> (B,) logits; ``cond`` (B, cond_dim) iff text-conditioned."""
        return self.net(x, t, cond)

    @property
    def record(self) -> dict[str, Any]:
        """The training record: ``train`` (with ``t_max``), ``schedule``, ``fit``, ``provenance``."""
        return dict(self.config.cpsample or {})

    @property
    def t_max(self) -> int | None:
        """Guidance acts at ``t < t_max``: the classifier was trained there and nowhere else."""
        t_max = (self.record.get("train") or {}).get("t_max")
        return int(t_max) if isinstance(t_max, int | float) else None

    def check_scheduler(self, scheduler: Any) -> None:
        """Refuse a scheduler whose noise levels are not the ones this classifier was trained on.

        The classifier learned ``p(bit | x_t)`` at the abar of its training schedule; another
        schedule's ``x_t`` at the same t is noised differently. T and every beta (their float32
        digest) are compared; the prediction type and timestep spacing are the sampler's business
        (any scheduler may read the same model). A record without a digest is taken as it is.
        """
        rec = self.record.get("schedule")
        if not isinstance(rec, dict) or "betas_digest" not in rec:
            return
        ours = schedule_from_config(dict(scheduler.config), f"{type(scheduler).__name__} config")
        if (rec.get("num_train_timesteps"), rec["betas_digest"]) != (
            ours.num_train_timesteps,
            betas_digest(ours),
        ):
            raise CheckpointError(
                f"the classifier was trained on a schedule with T={rec.get('num_train_timesteps')}, "
                f"betas {rec.get('beta_first')}..{rec.get('beta_last')} "
                f"({str(rec['betas_digest'])[:19]}), but the pipeline's {type(scheduler).__name__} "
                f"has T={ours.num_train_timesteps}, betas {float(ours.betas[0]):.6g}.."
                f"{float(ours.betas[-1]):.6g} ({betas_digest(ours)[:19]}): train the classifier "
                "against this model (jobs/train_classifier.py --denoiser <model>)"
            )

    @classmethod
    def from_checkpoint(cls, directory: str | Path) -> CPSampleClassifier:
        """Load the layout ``train_classifier`` writes (``model.safetensors`` + ``config.json``)."""
        net = load_classifier(directory)
        record = {k: v for k, v in load_classifier_config(directory).items() if k != "arch"}
        provenance = read_provenance(directory)
        if provenance is not None:
            record["provenance"] = provenance
        arch = to_dict(net.config)
        model = cls(**{**arch, "channel_mults": tuple(arch["channel_mults"])}, cpsample=record)
        model.net.load_state_dict(net.state_dict())
        return model.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, s3_endpoint: str | None = None, **kwargs
    ) -> CPSampleClassifier:
        """A classifier from a local folder, an ``s3://`` folder, or the hub-style id diffusers
        accepts (the layout is detected: ``train_classifier``'s or ``save_pretrained``'s).

        ``s3_endpoint`` (or ``AWS_ENDPOINT_URL``) serves S3-compatible stores; credentials come from
        the environment. The model is returned in eval mode with its parameters frozen.
        """
        location = str(pretrained_model_name_or_path)
        if location.startswith("s3://"):
            from pipeline.data.storage import ObjectNotFound, open_store

            # a store's models/ folders are versioned (put_dir): resolve from the store's root
            root, models, rest = location.rstrip("/").rpartition("/models/")
            if models:
                parts = ("models", *rest.split("/"))
            else:
                root, _, name = location.rstrip("/").rpartition("/")
                parts = (name,)
            store = open_store(root, s3_endpoint, create=False)
            with tempfile.TemporaryDirectory(prefix="cpsample-classifier-") as tmp:
                try:
                    local = store.get_dir(Path(tmp) / "classifier", *parts)
                except ObjectNotFound as exc:
                    raise CheckpointError(f"{location}: no classifier there ({exc})") from exc
                return cls.from_pretrained(local, **kwargs)
        if (Path(location) / CLASSIFIER_WEIGHTS).exists():
            return cls.from_checkpoint(location)
        looks_local = location.startswith((".", "/", "~")) or location.count("/") > 1
        if looks_local and not Path(location).expanduser().is_dir():
            raise CheckpointError(f"{location}: no such classifier folder")
        model = super().from_pretrained(location, **kwargs)
        return model.eval().requires_grad_(False)

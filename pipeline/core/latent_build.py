"""Build small latent text-to-image models from the real classes, with nothing downloaded.

Used by the latent demo (which trains the VAE and the UNet on the digits) and by the tests (a tiny
randomly initialised pipeline saved with ``save_pretrained``). The tokenizer is CLIP's byte-level BPE
with a vocabulary written here: the 256 byte symbols, each also as a word end, and no merges, so
every prompt tokenizes to its characters. The text encoder stays frozen and random: captions only
need distinct embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.core.config_base import _check, _positive
from pipeline.core.latent import LatentModel

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass
class LatentArchConfig:
    """A small Stable-Diffusion-shaped model: VAE, conditional UNet, CLIP text encoder."""

    image_size: int = 16
    image_channels: int = 1
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)  # one 2x downsampling per block after the first
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    text_dim: int = 32
    text_layers: int = 2
    max_tokens: int = 24
    beta_start: float = 0.00085  # Stable Diffusion's scaled_linear schedule
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        for name in ("image_size", "latent_channels", "text_dim", "text_layers", "max_tokens"):
            _positive(name, getattr(self, name))
        _check(
            self.image_channels in (1, 3),
            f"image_channels must be 1 or 3, got {self.image_channels}",
        )
        down = 2 ** (len(self.vae_channels) - 1)
        _check(
            self.image_size % down == 0,
            f"image_size {self.image_size} must be divisible by {down} for vae_channels {self.vae_channels}",
        )
        for c in (*self.vae_channels, *self.unet_channels):
            _check(
                c % self.norm_num_groups == 0,
                f"channels {c} not divisible by {self.norm_num_groups}",
            )
        _check(
            self.text_dim % 4 == 0, f"text_dim must be divisible by 4 heads, got {self.text_dim}"
        )

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channels) - 1)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable unicode symbols."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for _, c in sorted(zip(printable, codes, strict=True))]


def clip_tokenizer(max_tokens: int = 24):
    """A CLIP tokenizer over single bytes (vocabulary 514, no merges), built locally."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)


def build_latent_model(cfg: LatentArchConfig, seed: int = 0) -> LatentModel:
    """Randomly initialised (seeded) VAE, conditional UNet and text encoder, and a DDIM schedule
    like Stable Diffusion's (scaled_linear, ``set_alpha_to_one=False``, ``steps_offset=1``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.core.models import schedule_from_config

    tokenizer = clip_tokenizer(cfg.max_tokens)
    torch.manual_seed(seed)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
            num_hidden_layers=cfg.text_layers, num_attention_heads=4,
            max_position_embeddings=cfg.max_tokens, projection_dim=cfg.text_dim,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.latent_size, in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cfg.text_dim, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim,
    )  # fmt: skip
    m = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=cfg.image_channels, out_channels=cfg.image_channels,
        block_out_channels=tuple(cfg.vae_channels), down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m, latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups, sample_size=cfg.image_size,
    )  # fmt: skip
    sched = DDIMScheduler(
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    schedule = schedule_from_config(dict(sched.config), "DDIMScheduler")
    model = LatentModel(unet, vae, text, tokenizer, schedule)
    model.scheduler_config = dict(sched.config)  # type: ignore[attr-defined]
    for part in (unet, vae, text):
        part.eval()
    return model


def save_latent_model(model: LatentModel, directory: str | Path) -> Path:
    """Write the model in the diffusers Stable Diffusion layout (``model_index.json``, ``unet/``,
    ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``) with ``StableDiffusionPipeline``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched_cfg: dict[str, Any] = getattr(model, "scheduler_config", None) or {
        "beta_start": float(model.schedule.betas[0]), "beta_end": float(model.schedule.betas[-1]),
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1,
    }  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
        unet=model.unet, scheduler=DDIMScheduler.from_config(sched_cfg), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)

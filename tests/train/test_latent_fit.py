"""The latent model's training loops (VAE, conditional UNet) on a tiny model and a few digits."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.core.latent import encode_images, encode_prompts
from pipeline.core.latent_build import LatentArchConfig, build_latent_model
from pipeline.data.datasets import digits_source
from pipeline.train.latent_fit import fit_latent_unet, fit_vae, vae_reconstruction


@pytest.fixture(scope="module")
def tiny():
    """A tiny latent model, 32 digits in [-1, 1] with their captions, and the captions' embeddings."""
    cfg = LatentArchConfig(
        image_size=16,
        image_channels=1,
        vae_channels=(8, 16),
        unet_channels=(16, 32),
        norm_num_groups=8,
    )
    model = build_latent_model(cfg, seed=0)
    digits = digits_source(16).subset(range(32))
    captions = [f"a handwritten {label}" for label in digits.labels]
    hidden, _ = encode_prompts(model, captions)
    empty, _ = encode_prompts(model, [""])
    model.captions = captions  # type: ignore[attr-defined]
    return model, digits.to_tensor(), hidden, empty


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _latents(model, images: torch.Tensor) -> torch.Tensor:
    return encode_images(model.vae, images, model.scaling_factor)


def test_fit_vae_lowers_the_loss_and_sets_the_scaling_factor(tiny):
    model, x, _, _ = tiny
    vae = copy.deepcopy(model.vae)
    before = _params(vae)
    recon_before = vae_reconstruction(vae, x)
    m = fit_vae(vae, x, steps=40, batch_size=16, lr=3e-3, kl_weight=1e-3, seed=0, progress=False)
    assert not torch.equal(before, _params(vae))
    assert m["loss_last"] < 0.5 * m["loss_first"]
    assert m["recon"]["mse"] < 0.5 * recon_before["mse"]
    assert m["recon"]["psnr"] > recon_before["psnr"]
    assert -1.0 <= m["recon"]["min_cosine"] <= m["recon"]["mean_cosine"] <= 1.0
    # unit-variance latents: f = 1 / std of the posterior means over the training images
    z = encode_images(vae, x, float(vae.config.scaling_factor))
    assert m["scaling_factor"] == pytest.approx(float(vae.config.scaling_factor))
    assert float(z.std()) == pytest.approx(1.0, rel=1e-3)
    assert not vae.training


def test_fit_vae_is_seeded(tiny):
    model, x, _, _ = tiny
    runs = []
    for _ in range(2):
        vae = copy.deepcopy(model.vae)
        fit_vae(vae, x, steps=3, batch_size=8, lr=1e-3, kl_weight=0.0, seed=4, progress=False)
        runs.append(_params(vae))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    ("images", "kwargs", "match"),
    [
        (torch.zeros(4, 3, 16, 16), {}, r"\(N, 1, H, W\)"),
        (torch.zeros(1, 16, 16), {}, r"\(N, 1, H, W\)"),
        (torch.full((4, 1, 16, 16), 255.0), {}, r"\[-1, 1\]"),
        (torch.zeros(4, 1, 16, 16), {"kl_weight": -1.0}, "kl_weight"),
        (torch.zeros(4, 1, 16, 16), {"steps": 0}, "steps"),
        (torch.zeros(4, 1, 16, 16), {"batch_size": 0}, "batch_size"),
    ],
)
def test_fit_vae_rejects_bad_inputs(tiny, images, kwargs, match):
    args = {"steps": 1, "batch_size": 2, "lr": 1e-3, "kl_weight": 1e-3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_vae(copy.deepcopy(tiny[0].vae), images, progress=False, **args)


def _fit_unet(model, latents, hidden, empty, steps=40, dropout=0.1, **kw):
    unet = copy.deepcopy(model.unet)
    m = fit_latent_unet(
        unet, model.schedule, latents, hidden, steps=steps, batch_size=16, lr=2e-3,
        cond_dropout=dropout, seed=0, progress=False, empty_hidden=empty, warmup_steps=5, **kw,
    )  # fmt: skip
    return unet, m


def test_fit_latent_unet_lowers_the_loss_and_leaves_the_text_encoder_alone(tiny):
    model, x, hidden, empty = tiny
    text_before = copy.deepcopy(model.text_encoder.state_dict())
    before = _params(model.unet)
    unet, m = _fit_unet(model, _latents(model, x), hidden, empty, steps=40)
    assert not torch.equal(before, _params(unet))
    assert torch.equal(before, _params(model.unet))  # the copy trained, not the original
    assert m["loss_last"] < 0.8 * m["loss_first"]
    assert 0.0 < m["dropped_fraction"] < 0.3
    assert not unet.training
    for name, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, text_before[name]), name
    assert torch.equal(encode_prompts(model, model.captions)[0], hidden)


def test_cond_dropout_one_ignores_the_captions_and_zero_uses_them(tiny):
    model, x, hidden, empty = tiny
    z = _latents(model, x)
    other = hidden.flip(0)  # the same captions on other images
    uncond = [_fit_unet(model, z, h, empty, steps=2, dropout=1.0) for h in (hidden, other)]
    assert uncond[0][1]["dropped_fraction"] == 1.0
    assert torch.equal(_params(uncond[0][0]), _params(uncond[1][0]))
    cond = [_fit_unet(model, z, h, empty, steps=2, dropout=0.0) for h in (hidden, other)]
    assert cond[0][1]["dropped_fraction"] == 0.0
    assert not torch.equal(_params(cond[0][0]), _params(cond[1][0]))


def test_fit_latent_unet_ema_is_copied_in(tiny):
    model, x, hidden, empty = tiny
    z = _latents(model, x)
    plain, _ = _fit_unet(model, z, hidden, empty, steps=3)
    averaged, m = _fit_unet(model, z, hidden, empty, steps=3, ema_decay=0.9)
    assert m["ema_decay"] == 0.9
    assert not torch.equal(_params(plain), _params(averaged))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"latents": torch.zeros(32, 3, 8, 8)}, r"latents must be \(N, 4, h, w\)"),
        ({"latents": torch.zeros(32, 4, 8)}, r"latents must be \(N, 4, h, w\)"),
        ({"text_hidden": torch.zeros(31, 24, 32)}, "one caption per latent"),
        ({"text_hidden": torch.zeros(32, 24, 16)}, r"text_hidden must be \(N=32, L, 32\)"),
        ({"empty_hidden": torch.zeros(1, 7, 32)}, "empty_hidden must be"),
        ({"empty_hidden": None}, "needs empty_hidden"),
        ({"cond_dropout": 1.5}, "cond_dropout"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_fit_latent_unet_rejects_bad_inputs(tiny, change, match):
    model, _, hidden, empty = tiny
    args = {
        "latents": torch.zeros(32, 4, 8, 8), "text_hidden": hidden, "empty_hidden": empty,
        "steps": 1, "batch_size": 4, "lr": 1e-3, "cond_dropout": 0.1, "seed": 0, **change,
    }  # fmt: skip
    with pytest.raises(ValueError, match=match):
        fit_latent_unet(copy.deepcopy(model.unet), model.schedule, progress=False, **args)

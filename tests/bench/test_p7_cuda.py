"""The GPU benchmark (bench/p7_cuda.py) on the CPU at a tiny size: the CIFAR-size UNet and classifier
build, both samplers and both training loops run through the same code the CUDA run uses, and the
result has its fields. This machine has no GPU, so the CUDA numbers themselves come from a session
that is lent one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.core.diffusion import ddim_timesteps

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import p7_cuda


def test_p7_runs_on_cpu_with_the_cifar_unet():
    out = p7_cuda.run(device="cpu", batch=2, steps=4, repeats=1, train_steps=2)
    assert out["device"] == "cpu" and out["batch"] == 2 and out["steps"] == 4
    assert 35_000_000 < out["unet_params"] < 36_500_000  # google/ddpm-cifar10-32 has 35.7M
    assert out["ddim_images_per_s"] > 0 and out["cpsample_images_per_s"] > 0
    # at alpha 0.5 every sample fires at every step with t < guidance_t_max (600), and at no other
    steps = ddim_timesteps(4)
    assert out["guidance_fired_fraction"] == pytest.approx(float((steps < 600).float().mean()))
    assert "faiss_gpu_queries_per_s" not in out  # faiss-gpu is measured only on a CUDA device
    # the training loops' device path (prefetched batches, device draws, device loss sums) ran
    assert out["train_denoiser_images_per_s"] > 0 and out["train_classifier_images_per_s"] > 0
    assert (out["train_batch"], out["train_steps"]) == (2, 2)
    assert "train_denoiser_host_sync_free" not in out  # checked only on CUDA
    assert "stage_train_denoiser_gpu_s" not in out and "ray_input_images_per_s" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_p7_without_cuda_says_why():
    assert p7_cuda.run() == {"skipped": "no CUDA device on this machine", "goal": "recorded"}

"""The classifier's fit on a group's bits (pipeline.evaluation.bitfit)."""

from __future__ import annotations

import torch

from pipeline.core.diffusion import linear_schedule
from pipeline.evaluation.bitfit import bit_fit, group_bits


class _Sign(torch.nn.Module):
    """A classifier whose logit is +-``scale`` from the sign of the image's mean."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.scale * torch.sign(x.flatten(1).mean(1)) + 0 * self.w


def _images():
    x = torch.full((20, 1, 8, 8), -0.9)
    x[10:] = 0.9
    bits = torch.cat([torch.zeros(10), torch.ones(10)])
    return x, bits


def test_a_confident_right_classifier_scores_one():
    x, bits = _images()
    fit = bit_fit(_Sign(20.0), linear_schedule(), x, bits, alpha=0.1, draws=3)
    assert fit["accuracy"] == 1.0 and fit["confident"] == 1.0 and fit["consistency"] == 1.0
    assert fit["mean_margin"] > 0.49 and fit["num_images"] == 20


def test_contradictory_bits_halve_accuracy_and_an_unsure_classifier_never_fires():
    x, bits = _images()
    flipped = bits.clone()
    flipped[::2] = 1 - flipped[::2]  # half of each group carries the other bit
    fit = bit_fit(_Sign(20.0), linear_schedule(), x, flipped, alpha=0.1)
    assert fit["accuracy"] == 0.5
    unsure = bit_fit(_Sign(0.01), linear_schedule(), x, bits, alpha=0.1)
    assert unsure["confident"] == 0.0 and unsure["mean_margin"] < 0.01


def test_group_bits_follow_the_clusters():
    keys = ["a", "a-dup0", "a-dup1", "b"]
    bits = group_bits(keys, {"a-dup0": "a", "a-dup1": "a", "a": "a"}, 3)
    assert bits[0] == bits[1] == bits[2]
    assert group_bits(["a"], None, 3)[0] == bits[0]

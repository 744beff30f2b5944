"""A tiny SuperPoint + LightGlue matcher saved to a folder, which tests load with ``from_pretrained``.

With the library's own random initialisation the model matches nothing, for two reasons:

- SuperPoint: every convolution starts at N(0, 0.02) with zero bias, so after four conv blocks the keypoint
  logits are all but zero and the softmax over the 65 cell positions is flat to float precision. Every pixel
  scores the same, non-maximum suppression cannot break the ties, and all ~15,000 pixels of a 128-pixel
  image become keypoints with near-identical descriptors.
- LightGlue: with small random weights the final projection makes every similarity about 0, so the dual
  softmax gives each pair a matching score of about 1 / N^2, far below any threshold; identical images get
  no matches.

:func:`make_sensible` fixes both while keeping the architecture, and the result is deterministic (seeded):

- SuperPoint's convolutions get variance-preserving (He) random weights, so the keypoint heatmap has
  image-driven peaks: about 200 keypoints on a 128-pixel texture, at least 6 pixels apart.
- LightGlue becomes mutual nearest neighbours on the SuperPoint descriptors with a confidence: the output
  layer of every attention block's MLP is zero (each layer passes descriptors on unchanged), the final
  projection is a scaled identity (similarity = :data:`SIMILARITY_SCALE` x cosine) and matchability is a
  constant near 1. Identical descriptors then always match each other, with a score near 1 when no other
  descriptor is close, and a pair's score falls as its descriptors move apart.

On 128-pixel crops of scikit-image's brick texture this gives about 220 keypoints per crop and match
ratios of 1.0 for an identical copy, 0.95-1.0 for a copy shifted by up to 1 pixel, rotated by up to 1 degree,
jittered and noisy (a random SuperPoint is not trained to follow motion, so this costs it more than a
trained one), 0.6-0.93 with a painted disc over 3% of the crop, 0.33-0.51 against another crop and about
0.3 against the crop with its 16-pixel tiles shuffled. A pair takes about 0.05 s on one CPU thread, most
of it in SuperPoint's non-maximum suppression.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

SIMILARITY_SCALE = 2000.0
"""Similarity of two unit descriptors = this x their cosine (a softmax temperature of 1 / 2000)."""

MATCHABILITY_LOGIT = 8.0
"""Every keypoint's matchability logit: sigmoid(8) = 0.9997."""


def tiny_config(descriptor_dim: int = 64):
    """A LightGlue config on a small SuperPoint (encoder widths 16, 16, 32, 32; ``descriptor_dim``-d)."""
    from transformers import LightGlueConfig, SuperPointConfig

    detector = SuperPointConfig(
        encoder_hidden_sizes=[16, 16, 32, 32],
        decoder_hidden_size=64,
        descriptor_decoder_dim=descriptor_dim,
        keypoint_threshold=0.02,
        nms_radius=6,
    )
    return LightGlueConfig(
        keypoint_detector_config=detector.to_dict(),
        descriptor_dim=descriptor_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
    )


@torch.no_grad()
def make_sensible(model: nn.Module, seed: int = 0) -> nn.Module:
    """Set ``model``'s (a LightGlueForKeypointMatching) weights as the module docstring says; returns it."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.keypoint_detector.modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            weight = torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
            module.weight.copy_(weight)
            module.bias.zero_()
    for layer in model.transformer_layers:
        for mlp in (layer.self_mlp, layer.cross_mlp):
            mlp.fc2.weight.zero_()
            mlp.fc2.bias.zero_()
    dim = model.config.descriptor_dim
    for assignment in model.match_assignment_layers:
        # the layer divides projected descriptors by dim ** 0.25 before their dot product
        gain = math.sqrt(SIMILARITY_SCALE * math.sqrt(dim))
        assignment.final_projection.weight.copy_(torch.eye(dim) * gain)
        assignment.final_projection.bias.zero_()
        assignment.matchability.weight.zero_()
        assignment.matchability.bias.fill_(MATCHABILITY_LOGIT)
    return model


def build_lightglue(config=None, seed: int = 0) -> nn.Module:
    """A LightGlueForKeypointMatching of ``config`` (default :func:`tiny_config`) with sensible weights."""
    from transformers import LightGlueForKeypointMatching

    torch.manual_seed(seed)
    model = LightGlueForKeypointMatching(config if config is not None else tiny_config())
    return make_sensible(model, seed).eval()


def save_tiny_lightglue(folder: Path) -> Path:
    """Save the tiny matcher and its image processor (no resizing) into ``folder``; returns ``folder``."""
    from transformers import LightGlueImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_lightglue().save_pretrained(str(folder))
    LightGlueImageProcessorPil(do_resize=False).save_pretrained(str(folder))
    return folder

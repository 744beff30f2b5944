"""LGST: the local-global student-teacher of CSAD, with AeCSAD's attention-enhanced global student.

CSAD (Hsieh and Lai, "CSAD: Unsupervised Component Segmentation for Logical Anomaly Detection", BMVC 2024)
builds on EfficientAD (Batzner et al., WACV 2024); AeCSAD (Amjad, MSc thesis, Ontario Tech University,
2025) adds self-attention to the global student. With F = ``feature_dim`` and an image of side H (the
thesis: F = 512, H = 256, so F x 64 x 64):

- **Teacher** (frozen): WRN-50-2 layers 2 and 3, bilinearly resized to H/4, concatenated, 3 x 3 average
  pooled, then a fixed (never trained) 1 x 1 projection to F channels, normalised per channel by the
  training normals' mean and standard deviation.
- **Local student**: a shallow CNN (EfficientAD's PDN shape) whose outputs see 33 x 33 pixels. Two 1 x 1
  heads: one imitates the teacher, the other imitates the global student.
- **Global student**: a convolutional autoencoder. With ``attention=True`` (AeCSAD) its encoder keeps an
  H/32 spatial code (no global pooling) and single-head self-attention blocks sit at H/16 and H/32 in the
  encoder (16 x 16 and 8 x 8 at 256 px) and at H/16 and H/8 in the decoder. ``attention=False`` is CSAD's
  version: a bottleneck convolution squeezes the code to 1 x 1, and no attention.
- **Losses**: local = mean of the largest ``1 - hard_quantile`` share of ``(T - S_local)^2`` (EfficientAD's
  hard feature loss); global = mean ``(T - G)^2``; fusion = mean ``(G - S_fuse)^2``; weighted sum.
- **Maps** (channel means, at H/4): A_local = ``(T - S_local)^2``, A_global = ``(T - G)^2`` and
  A_global-local = ``(G - S_fuse)^2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

TEACHER_LAYERS = ("layer2", "layer3")


class TeacherProjection(nn.Module):
    """Layers 2+3 features -> (B, F, H/4, W/4) normalised teacher features. Nothing here is trained."""

    def __init__(self, channels: int, feature_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, feature_dim, 1)
        self.proj.requires_grad_(False)
        self.register_buffer("mean", torch.zeros(1, feature_dim, 1, 1))
        self.register_buffer("std", torch.ones(1, feature_dim, 1, 1))

    def raw(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        resized = [
            F.interpolate(features[n], size=size, mode="bilinear", align_corners=False)
            for n in TEACHER_LAYERS
        ]
        pooled = F.avg_pool2d(torch.cat(resized, dim=1), 3, stride=1, padding=1, count_include_pad=False)
        return self.proj(pooled)

    def forward(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return (self.raw(features, size) - self.mean) / self.std

    @torch.no_grad()
    def set_normalisation(self, raw: torch.Tensor) -> None:
        """Per-channel mean and std of (N, F, h, w) unnormalised teacher features."""
        self.mean.copy_(raw.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(raw.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))


class LocalStudent(nn.Module):
    """PDN-shaped CNN with a 33 x 33 receptive field; (B, 3, H, W) -> two (B, F, H/4, W/4) heads.

    conv 4x4 (pad 3) -> avgpool 2 (pad 1) -> conv 4x4 (pad 3) -> avgpool 2 (pad 1) -> conv 3x3 (pad 1) ->
    conv 4x4 -> two 1x1 heads; for H a multiple of 4 the output is exactly H/4.
    """

    def __init__(self, width: int, feature_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 4, padding=3),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, stride=2, padding=1),
            nn.Conv2d(width, 2 * width, 4, padding=3),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2, stride=2, padding=1),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * width, feature_dim, 4),
            nn.ReLU(inplace=True),
        )
        self.head_teacher = nn.Conv2d(feature_dim, feature_dim, 1)
        self.head_global = nn.Conv2d(feature_dim, feature_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)  # (B, F, H/4, W/4)
        return self.head_teacher(h), self.head_global(h)


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the positions of a (B, C, h, w) map, with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, hw, C) each
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, hw, C)
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


def _down(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 4, stride=2, padding=1), nn.ReLU(inplace=True))


class GlobalStudent(nn.Module):
    """Convolutional autoencoder (B, 3, H, W) -> (B, F, H/4, W/4); see the module docstring.

    Args:
        width: channels of the code (the first two encoder stages have half).
        feature_dim: output channels F.
        image_size: side H it is built for (a multiple of 32); CSAD's bottleneck kernel is H/32.
        attention: AeCSAD's self-attention blocks and spatial code (True) or CSAD's 1 x 1 code (False).
    """

    def __init__(
        self, width: int, feature_dim: int, image_size: int, attention: bool = True, dropout: float = 0.2
    ):
        super().__init__()
        half = max(1, width // 2)
        self.attention = attention
        self.image_size = image_size
        self.encoder = nn.ModuleList(
            [_down(3, half), _down(half, half), _down(half, width), _down(width, width), _down(width, width)]
        )
        if attention:
            self.encoder_attention = nn.ModuleDict({"3": SelfAttention2d(width), "4": SelfAttention2d(width)})
            self.bottleneck = nn.Identity()
            self.strides = (16, 8, 4)  # decoder stages, as image_size / stride
            self.decoder_attention = nn.ModuleDict({"0": SelfAttention2d(width), "1": SelfAttention2d(width)})
        else:
            self.encoder_attention = nn.ModuleDict()
            self.bottleneck = nn.Conv2d(width, width, image_size // 32)  # H/32 -> 1 x 1
            self.strides = (32, 16, 8, 4)
            self.decoder_attention = nn.ModuleDict()
        self.decoder = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True), nn.Dropout(dropout)
                )
                for _ in self.strides
            ]
        )
        self.out = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, feature_dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[2:]
        for index, stage in enumerate(self.encoder):
            x = stage(x)  # strides 2, 4, 8, 16, 32
            if str(index) in self.encoder_attention:
                x = self.encoder_attention[str(index)](x)
        x = self.bottleneck(x)
        for index, (stride, stage) in enumerate(zip(self.strides, self.decoder, strict=True)):
            size = (math.ceil(height / stride), math.ceil(width / stride))
            x = stage(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
            if str(index) in self.decoder_attention:
                x = self.decoder_attention[str(index)](x)
        return self.out(x)  # (B, F, H/4, W/4)


# ------------------------------------------------------------------------------------------------ losses
def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean of the ``ceil((1 - quantile) * n)`` largest squared differences (at least one) of two tensors."""
    distances = (teacher - student).pow(2).flatten()
    count = max(1, math.ceil((1.0 - quantile) * distances.numel()))
    return distances.topk(count, sorted=False).values.mean()


def lgst_losses(
    teacher: torch.Tensor,
    local: torch.Tensor,
    fuse: torch.Tensor,
    global_: torch.Tensor,
    weights: tuple[float, float, float],
    quantile: float,
    teacher_global: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Local, global and fusion terms and their weighted sum ``total`` (weights: local, global, fusion).

    ``teacher_global`` is the teacher on the global branch's (augmented) images; by default ``teacher``.
    """
    target = teacher if teacher_global is None else teacher_global
    terms = {
        "local": hard_feature_loss(teacher, local, quantile),
        "global": (target - global_).pow(2).mean(),
        "fusion": (global_ - fuse).pow(2).mean(),
    }
    terms["total"] = weights[0] * terms["local"] + weights[1] * terms["global"] + weights[2] * terms["fusion"]
    return terms


def lgst_maps(
    teacher: torch.Tensor, local: torch.Tensor, fuse: torch.Tensor, global_: torch.Tensor
) -> torch.Tensor:
    """(B, 3, h, w): A_local, A_global and A_global-local, each the channel mean of a squared difference."""
    return torch.stack(
        [
            (teacher - local).pow(2).mean(dim=1),
            (teacher - global_).pow(2).mean(dim=1),
            (global_ - fuse).pow(2).mean(dim=1),
        ],
        dim=1,
    )

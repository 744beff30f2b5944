"""DRAEM's two sub-networks as plain ``nn.Module``s.

Implements the architecture of Zavrtanik, Kristan and Skočaj, "DRAEM - A discriminatively trained
reconstruction embedding for surface anomaly detection" (ICCV 2021):

- the reconstructive sub-network is an encoder-decoder without skip connections that learns to turn an
  image with a synthetic anomaly back into the clean image (so it cannot copy the anomaly through);
- the discriminative sub-network is a U-Net that sees the input and its reconstruction side by side
  (6 channels) and segments the anomaly into two classes (normal, anomalous).

Every level of both networks is a block of two 3x3 convolutions with batch norm and ReLU; widths double per
level up to eight times the base width. The paper uses base width 128 (reconstructive, four poolings) and
64 (discriminative, five poolings). Input sides must be multiples of :attr:`DraemModel.stride`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _widths(base: int, depth: int) -> list[int]:
    """Channels per level: base, 2 base, 4 base, then 8 base for every deeper level."""
    return [base * min(2**level, 8) for level in range(depth + 1)]


class ConvBlock(nn.Sequential):
    """(B, C_in, H, W) -> (B, C_out, H, W): two 3x3 convolutions, each followed by batch norm and ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip


class UpConv(nn.Sequential):
    """(B, C_in, H, W) -> (B, C_out, 2H, 2W): bilinear upsampling, a 3x3 convolution, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )  # fmt: skip


class ReconstructiveSubNetwork(nn.Module):
    """(B, 3, H, W) -> (B, 3, H, W): an encoder-decoder with ``depth`` poolings and no skip connections.

    H and W must be multiples of ``2**depth``. The output is linear (images live in [0, 1]; the losses
    pull it there).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 128, depth: int = 4):
        super().__init__()
        widths = _widths(width, depth)
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])]
            + [ConvBlock(widths[level - 1], widths[level]) for level in range(1, depth + 1)]
        )
        self.up = nn.ModuleList([UpConv(widths[level], widths[level]) for level in range(depth, 0, -1)])
        self.decoder = nn.ModuleList(
            [ConvBlock(widths[level], widths[level - 1]) for level in range(depth, 0, -1)]
        )
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder[0](x)  # (B, w, H, W)
        for block in self.encoder[1:]:
            h = block(F.max_pool2d(h, 2))  # (B, w_l, H / 2**l, W / 2**l)
        for up, block in zip(self.up, self.decoder, strict=True):
            h = block(up(h))  # (B, w_(l-1), H / 2**(l-1), W / 2**(l-1))
        return self.head(h)  # (B, 3, H, W)


class DiscriminativeSubNetwork(nn.Module):
    """(B, 6, H, W) -> (B, 2, H, W) logits: a U-Net with ``depth`` poolings and skip connections.

    H and W must be multiples of ``2**depth``. Channel 1 of the softmax is the anomaly probability.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 2, width: int = 64, depth: int = 5):
        super().__init__()
        widths = _widths(width, depth)
        self.encoder = nn.ModuleList(
            [ConvBlock(in_channels, widths[0])]
            + [ConvBlock(widths[level - 1], widths[level]) for level in range(1, depth + 1)]
        )
        self.up = nn.ModuleList([UpConv(widths[level], widths[level - 1]) for level in range(depth, 0, -1)])
        self.decoder = nn.ModuleList(
            [ConvBlock(2 * widths[level - 1], widths[level - 1]) for level in range(depth, 0, -1)]
        )
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.encoder[0](x)]  # [(B, w, H, W)]
        for block in self.encoder[1:]:
            skips.append(block(F.max_pool2d(skips[-1], 2)))  # (B, w_l, H / 2**l, W / 2**l)
        h = skips.pop()  # (B, w_depth, H / 2**depth, W / 2**depth)
        for up, block in zip(self.up, self.decoder, strict=True):
            skip = skips.pop()  # (B, w_(l-1), H / 2**(l-1), W / 2**(l-1))
            h = block(torch.cat([up(h), skip], dim=1))  # (B, w_(l-1), H / 2**(l-1), W / 2**(l-1))
        return self.head(h)  # (B, 2, H, W)


class DraemModel(nn.Module):
    """(B, 3, H, W) in [0, 1] -> reconstruction (B, 3, H, W) and segmentation logits (B, 2, H, W).

    The discriminative sub-network sees the reconstruction and the input concatenated along channels.
    """

    def __init__(
        self, recon_width: int = 128, disc_width: int = 64, recon_depth: int = 4, disc_depth: int = 5
    ):
        super().__init__()
        self.reconstructive = ReconstructiveSubNetwork(3, 3, recon_width, recon_depth)
        self.discriminative = DiscriminativeSubNetwork(6, 2, disc_width, disc_depth)
        self.stride = 2 ** max(recon_depth, disc_depth)
        """Input sides must be multiples of this."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % self.stride or x.shape[3] % self.stride:
            raise ValueError(
                f"DraemModel expects (B, 3, H, W), H and W multiples of {self.stride}, got {tuple(x.shape)}"
            )
        reconstruction = self.reconstructive(x)  # (B, 3, H, W)
        logits = self.discriminative(torch.cat([reconstruction, x], dim=1))  # (B, 2, H, W)
        return reconstruction, logits

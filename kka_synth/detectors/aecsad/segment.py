"""The component segmentation network: a DeepLabV3+ decoder on frozen WRN-50-2 layers 1-3, its losses and LSA.

AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) trains CSAD's component segmentation (Hsieh and
Lai, "CSAD: Unsupervised Component Segmentation for Logical Anomaly Detection", BMVC 2024) semi-supervised
on the pseudo-labels:

- on reliable images (D_L), cross-entropy + Dice + focal loss against the pseudo-label map, with LSA
  augmentation: components are cut out of a D_L image with their masks and pasted onto the training image
  at a random rotation and place, their label with them;
- on unreliable images (D_U), from a later epoch, a histogram-matching loss (the predicted class shares
  should match the mean class shares of D_L) and an entropy loss (predictions should be confident).

The decoder follows DeepLabV3+ (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for
Semantic Image Segmentation", ECCV 2018): an ASPP on the deep features (layer 2 pooled to layer 3's stride
and concatenated with it), upsampled to the stride-4 level, concatenated with reduced layer-1 features, two
3 x 3 convolutions and a 1 x 1 classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

SEG_LAYERS = ("layer1", "layer2", "layer3")


def _conv_bn(inputs: int, outputs: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, kernel, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1 x 1 branch, one dilated 3 x 3 branch per rate, image pooling."""

    def __init__(self, inputs: int, outputs: int, rates: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn(inputs, outputs, 1)] + [_conv_bn(inputs, outputs, 3, r) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(inputs, outputs, 1, bias=False), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(_conv_bn(outputs * (len(rates) + 2), outputs, 1), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, *x.shape[2:])  # (B, outputs, h, w)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class SegmentationHead(nn.Module):
    """DeepLabV3+ decoder: features of layers 1-3 -> (B, num_classes, H, W) logits at the image size."""

    def __init__(self, channels: Sequence[int], num_classes: int, width: int, rates: Sequence[int]):
        super().__init__()
        c1, c2, c3 = channels
        low = max(8, width * 3 // 16)
        self.aspp = ASPP(c2 + c3, width, rates)
        self.reduce = _conv_bn(c1, low, 1)
        self.decoder = nn.Sequential(_conv_bn(width + low, width, 3), _conv_bn(width, width, 3))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        l1, l2, l3 = (features[name] for name in SEG_LAYERS)  # strides 4, 8, 16
        deep = self.aspp(
            torch.cat([F.adaptive_avg_pool2d(l2, l3.shape[2:]), l3], dim=1)
        )  # (B, width, H/16, W/16)
        deep = F.interpolate(deep, size=l1.shape[2:], mode="bilinear", align_corners=False)
        x = self.decoder(torch.cat([deep, self.reduce(l1)], dim=1))  # (B, width, H/4, W/4)
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------ losses
def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """``1 - mean_k (2 sum p_k y_k + eps) / (sum p_k + sum y_k + eps)`` over all K classes of (B, K, H, W)
    logits against (B, H, W) class indices; sums run over the batch and the pixels."""
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    dice = (2 * (probs * onehot).sum(dims) + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1.0 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Multi-class focal loss (Lin et al., 2017): ``mean(-(1 - p_t)^gamma log p_t)`` over pixels."""
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.long()[:, None]).squeeze(1)  # (B, H, W)
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()


def histogram_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Histogram matching: ``mean_b sum_k |mean_pixels p_bk - target_k|`` for (B, K, H, W) logits and the
    (K,) target class shares (D_L's mean)."""
    shares = logits.softmax(dim=1).mean(dim=(2, 3))  # (B, K)
    return (shares - target[None]).abs().sum(dim=1).mean()


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of the prediction's entropy ``-sum_k p_k log p_k`` (nats)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1).mean()


def labeled_loss(
    logits: torch.Tensor, target: torch.Tensor, weights: tuple[float, float, float], gamma: float
) -> dict[str, torch.Tensor]:
    """The D_L terms and their weighted sum ``total``: weights of (cross-entropy, Dice, focal)."""
    ce = F.cross_entropy(logits, target.long())
    dice = dice_loss(logits, target)
    focal = focal_loss(logits, target, gamma)
    return {
        "ce": ce,
        "dice": dice,
        "focal": focal,
        "total": weights[0] * ce + weights[1] * dice + weights[2] * focal,
    }


# ---------------------------------------------------------------------------------------------------- LSA
def lsa_augment(
    image: np.ndarray,
    label: np.ndarray,
    donors: Sequence[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    max_components: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1..``max_components`` components from ``donors`` (image (H, W, 3) uint8, label (H, W) uint8
    pairs) onto a copy of ``image`` and ``label``, each rotated by a random angle about its centre and moved
    so that its centre lands on a random pixel. A donor without foreground pastes nothing."""
    out_image, out_label = image.copy(), label.copy()
    height, width = label.shape
    for _ in range(int(rng.integers(1, max_components + 1))):
        donor_image, donor_label = donors[int(rng.integers(len(donors)))]
        classes = np.unique(donor_label)
        classes = classes[classes > 0]
        if not len(classes):
            continue
        cls = int(classes[rng.integers(len(classes))])
        count, parts = cv2.connectedComponents((donor_label == cls).astype(np.uint8), connectivity=8)
        mask = parts == int(rng.integers(1, count))
        ys, xs = np.nonzero(mask)
        centre = (float(xs.mean()), float(ys.mean()))
        matrix = cv2.getRotationMatrix2D(centre, float(rng.uniform(0.0, 360.0)), 1.0)
        matrix[:, 2] += (
            float(rng.uniform(0, width - 1)) - centre[0],
            float(rng.uniform(0, height - 1)) - centre[1],
        )
        moved = cv2.warpAffine(mask.astype(np.uint8), matrix, (width, height), flags=cv2.INTER_NEAREST) > 0
        pixels = cv2.warpAffine(donor_image, matrix, (width, height), flags=cv2.INTER_LINEAR)
        out_image[moved] = pixels[moved]
        out_label[moved] = cls
    return out_image, out_label

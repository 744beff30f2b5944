"""Wide ResNet-50-2 as an in-project module, with torchvision's parameter names.

The network is Zagoruyko and Komodakis's wide residual network ("Wide Residual Networks", BMVC 2016) in the
bottleneck form of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016) that torchvision
ships as ``wide_resnet50_2``: bottleneck blocks whose inner 3x3 convolution is twice as wide as ResNet-50's,
stride on the 3x3 convolution, a 1x1 projection (``downsample``) on the first block of each stage. Every
parameter and buffer carries torchvision's name, so its ImageNet state dict loads with ``strict=True`` and
no renaming; torchvision itself is never imported.

AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) and CSAD (Hsieh and Lai, "CSAD: Unsupervised
Component Segmentation for Logical Anomaly Detection", BMVC 2024) use this network frozen, three times:
layer 4 embeds component crops for the pseudo-labels, layers 1-3 feed the segmentation decoder, and layers
2+3 are the student-teacher's teacher.

``base`` and ``blocks`` shrink the network for tests; the defaults are the full size (68.9 M parameters).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kka_synth.utils.hub import ModelLoadError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The per-channel statistics torchvision's ImageNet weights expect, for RGB in [0, 1]."""

LAYERS = ("layer1", "layer2", "layer3", "layer4")
EXPANSION = 4
"""A bottleneck's output has ``EXPANSION`` times its stage's planes."""


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, ``widen`` times wider), 1x1 expand, plus the (projected) identity."""

    def __init__(self, inplanes: int, planes: int, stride: int, widen: int, downsample: nn.Module | None):
        super().__init__()
        width = planes * widen
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class WideResNet(nn.Module):
    """Wide ResNet with torchvision's names; ``WideResNet()`` is ``wide_resnet50_2``.

    Args:
        base: planes of the first stage (64 in torchvision); the later stages double it each time.
        blocks: bottleneck blocks per stage ((3, 4, 6, 3) for the 50-layer network).
        widen: width factor of the inner 3x3 convolutions (2 for the wide network).
        num_classes: outputs of ``fc`` (1000 for ImageNet weights; never used for features).
    """

    def __init__(
        self,
        base: int = 64,
        blocks: tuple[int, int, int, int] = (3, 4, 6, 3),
        widen: int = 2,
        num_classes: int = 1000,
    ):
        super().__init__()
        if base < 1 or widen < 1 or len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"bad WideResNet shape: base {base}, blocks {blocks}, widen {widen}")
        self.base, self.blocks, self.widen = base, tuple(blocks), widen
        self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base
        for index, count in enumerate(blocks):
            planes = base * 2**index
            stride = 1 if index == 0 else 2
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )
            layer = [Bottleneck(inplanes, planes, stride, widen, downsample)]
            inplanes = planes * EXPANSION
            layer += [Bottleneck(inplanes, planes, 1, widen, None) for _ in range(count - 1)]
            setattr(self, LAYERS[index], nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def channels(self, layer: str) -> int:
        """Output channels of ``layer`` ("layer1" ... "layer4")."""
        return self.base * 2 ** LAYERS.index(layer) * EXPANSION

    def features(self, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) RGB in [0, 1] -> the named stages' outputs, computing no stage past the last asked.

        Strides: layer1 H/4, layer2 H/8, layer3 H/16, layer4 H/32. The input is ImageNet-normalised here.
        """
        unknown = [name for name in layers if name not in LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be a non-empty subset of {LAYERS}, got {layers}")
        x = (x - self.pixel_mean) / self.pixel_std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, base, H/4, W/4)
        last = max(LAYERS.index(name) for name in layers)
        out: dict[str, torch.Tensor] = {}
        for name in LAYERS[: last + 1]:
            x = getattr(self, name)(x)
            if name in layers:
                out[name] = x
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, num_classes); the detector only uses :meth:`features`."""
        pooled = self.avgpool(self.features(x, ("layer4",))["layer4"]).flatten(1)
        return self.fc(pooled)


def load_torchvision_weights(model: WideResNet, path_or_url: str) -> None:
    """Strict-load torchvision's ``wide_resnet50_2`` ImageNet state dict into ``model``.

    ``path_or_url`` is a local ``.pth`` (a plain state dict, as torchvision publishes it) or
    ``.safetensors`` file, or an http(s) URL fetched through ``torch.hub``'s cache. Any failure (missing
    file, no network, wrong shapes because ``model`` is not full size) raises one-line ModelLoadError.
    """
    field = "aecsad.teacher_weights"
    if not path_or_url:
        raise ModelLoadError(f"{field} is empty: give a local file or URL of torchvision's wide_resnet50_2")
    try:
        if path_or_url.startswith(("http://", "https://")):
            state = torch.hub.load_state_dict_from_url(
                path_or_url, map_location="cpu", progress=False, weights_only=True
            )
        else:
            path = Path(path_or_url).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"expected a state dict, got {type(state).__name__}")
        model.load_state_dict(state, strict=True)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"cannot load wide_resnet50_2 weights from {path_or_url!r} ({first[:160]}); set {field} to a "
            "local torchvision .pth file, or leave it empty for random weights"
        ) from None
    logger.info("aecsad: loaded wide_resnet50_2 ImageNet weights from %s", path_or_url)

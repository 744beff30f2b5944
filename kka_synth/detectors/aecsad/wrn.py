"""Wide ResNet-50-2 as an in-project module, with torchvision's parameter names.

The network is Zagoruyko and Komodakis's wide residual network ("Wide Residual Networks", BMVC 2016) in the
bottleneck form of He et al. ("Deep Residual Learning for Image Recognition", CVPR 2016) that torchvision
ships as ``wide_resnet50_2``: bottleneck blocks whose inner 3x3 convolution is twice as wide as ResNet-50's,
stride on the 3x3 convolution, a 1x1 projection (``downsample``) on the first block of each stage. Every
parameter and buffer carries torchvision's name; torchvision itself is never imported.

Weights are safetensors only. torchvision's ImageNet weights are on the Hugging Face Hub as
``model.safetensors`` in timm's repos (``timm/wide_resnet50_2.tv2_in1k`` holds IMAGENET1K_V2, the teacher
CSAD loads; ``.tv_in1k`` holds V1), and timm's ResNet keeps torchvision's key names, so they load with no
renaming (timm's ``wide_resnet50_2`` state dict has the same 320 keys and shapes as this module's). A local
``.safetensors`` file or a folder holding ``model.safetensors`` works too; URLs and pickle checkpoints are
refused unread, because unpickling can run code.

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
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from kka_synth.detectors.aecsad.config import WRN50_2_WEIGHTS, refused_weights
from kka_synth.utils.hub import ModelLoadError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""The per-channel statistics torchvision's ImageNet weights expect, for RGB in [0, 1]."""

LAYERS = ("layer1", "layer2", "layer3", "layer4")
EXPANSION = 4
"""A bottleneck's output has ``EXPANSION`` times its stage's planes."""


FIELD = "aecsad.teacher_weights"
WEIGHTS_FILE = "model.safetensors"
"""The weights file read from a Hub repo or a local folder."""
_INSTEAD = (
    f"give a Hub id such as {WRN50_2_WEIGHTS!r}, a local .safetensors file or a folder holding {WEIGHTS_FILE}"
)


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


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def _some(keys: list[str]) -> str:
    """Up to three of ``keys`` and how many there are, for an error line."""
    if not keys:
        return "none"
    return ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3 else "")


def resolve_weights(source: str) -> Path:
    """The local ``model.safetensors`` that ``source`` names: the file itself, the one in a folder, or a Hub
    repo's, fetched with ``huggingface_hub.hf_hub_download`` (which honours ``HF_HUB_OFFLINE`` and the HF
    cache). Raises one-line ModelLoadError naming ``aecsad.teacher_weights`` when there is none."""
    refused = refused_weights(source)
    if refused is not None:
        raise ModelLoadError(f"{FIELD} {refused}")
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / WEIGHTS_FILE).is_file():
            raise ModelLoadError(f"{FIELD} {source!r} is a folder without {WEIGHTS_FILE}; {_INSTEAD}")
        return local / WEIGHTS_FILE
    if local.is_file():
        if local.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"{FIELD} {source!r} is not a .safetensors file; {_INSTEAD}")
        return local
    if source.count("/") != 1 or source.startswith((".", "/", "~")) or source.endswith(".safetensors"):
        raise ModelLoadError(f"{FIELD}: no file or folder {source!r}, and it is no Hub id (org/name)")
    from huggingface_hub import constants, hf_hub_download

    try:
        return Path(hf_hub_download(source, WEIGHTS_FILE))
    except (OSError, ValueError) as error:
        logger.debug("fetching %s of %s failed", WEIGHTS_FILE, source, exc_info=True)
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub did not give it"
        raise ModelLoadError(
            f"cannot get the WRN-50-2 teacher weights ({WEIGHTS_FILE}) of Hub id {source!r}: it is not in "
            f"the HF cache and {why} ({type(error).__name__}); set {FIELD} to a local .safetensors file or "
            "its folder, or run with --profile offline"
        ) from None


def load_torchvision_weights(model: WideResNet, source: str) -> None:
    """Load torchvision's ``wide_resnet50_2`` ImageNet weights, stored as safetensors, into ``model``.

    Args:
        model: the full-size teacher (``WideResNet()``); a smaller one fails the shape check.
        source: a Hub repo id (:data:`.config.WRN50_2_WEIGHTS`), a local ``.safetensors`` file, or a folder
            holding ``model.safetensors``. URLs and pickle checkpoints (``.pth``, ``.pt``, ``.bin``) are
            refused unread.

    Every key of the network but the ``fc`` classifier must be in the file, with its shape, and the file may
    hold nothing else but ``fc`` keys; batch-norm ``num_batches_tracked`` counters may be absent. The
    classifier is loaded only when its shapes fit (features never use it).

    Raises:
        ModelLoadError: one line naming ``aecsad.teacher_weights``: no such file, the weights are not on
            this machine and the Hub cannot be reached, or the file holds other keys or shapes.
    """
    if not source:
        raise ModelLoadError(f"{FIELD} is empty: {_INSTEAD}")
    path = resolve_weights(source)
    try:
        state = load_file(str(path))
    except (OSError, ValueError, SafetensorError) as error:
        raise ModelLoadError(f"cannot read {FIELD} {source!r} ({_first_line(error)}); {_INSTEAD}") from None
    expected = model.state_dict()
    backbone = {key for key in expected if not key.startswith("fc.")}
    optional = {key for key in backbone if key.endswith("num_batches_tracked")}
    missing = sorted(backbone - optional - set(state))
    unexpected = sorted(key for key in set(state) - set(expected) if not key.startswith("fc."))
    if missing or unexpected:
        raise ModelLoadError(
            f"{FIELD} {source!r} does not hold wide_resnet50_2 weights under torchvision's names (missing "
            f"{_some(missing)}; unexpected {_some(unexpected)}); {_INSTEAD}"
        )
    wrong = [
        key for key in expected if key in backbone & set(state) and state[key].shape != expected[key].shape
    ]
    if wrong:
        key = wrong[0]
        raise ModelLoadError(
            f"{FIELD} {source!r}: {key} has shape {tuple(state[key].shape)}, the teacher wants "
            f"{tuple(expected[key].shape)} ({len(wrong)} keys differ; the teacher must be full size)"
        )
    classifier = {key: value for key, value in state.items() if key.startswith("fc.")}
    if set(classifier) != {"fc.weight", "fc.bias"} or any(
        value.shape != expected[key].shape for key, value in classifier.items()
    ):
        classifier = {}
    model.load_state_dict({key: state[key] for key in backbone & set(state)} | classifier, strict=False)
    logger.info("aecsad: loaded wide_resnet50_2 ImageNet weights from %s (%s)", source, path)

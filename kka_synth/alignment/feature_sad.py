"""Deep SAD head on frozen DINOv2 features: the hub profile's confusion evaluator (``deepsad-dinov2``).

Implements Deep SAD from Ruff et al., "Deep Semi-Supervised Anomaly Detection" (ICLR 2020), on image
embeddings of a frozen DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision",
TMLR 2024), loaded through ``transformers`` by :func:`kka_synth.detectors.vfm.model.load_dinov2`.

Features. Each image is resized to ``config.feature_size`` x ``config.feature_size`` (224 by default,
DINOv2's training resolution; a multiple of the patch size 14; ``evaluator.size`` is the CNN evaluator's
and does not apply here), scaled to [0, 1] and normalised with the ImageNet mean and std; its feature is
the final-layer-normed CLS token (the model's pooled output) concatenated with the mean of its normed patch
tokens, a (2 x hidden,) vector. The backbone runs without gradients in batches of ``config.batch_size`` on
``config.device`` in ``config.dtype``: ``auto`` is bfloat16 on a CUDA GPU that supports it and float32
everywhere else; bfloat16 is allowed on the CPU, float16 is not. The features are returned as float32
whatever the backbone's dtype, and the head always trains and scores on the CPU in float32.

Cache. A feature depends only on the backbone, its input size and dtype, and the image, and the loop refits
the evaluator on the same normal images in every fold of every iteration. :func:`dinov2_features` therefore
keeps one :class:`Dinov2Features` per (model, size, device, dtype) for the whole process, holding the loaded
backbone and a bounded cache of features keyed by a hash of each image's bytes and shape: an image is
encoded once, and a feature computed in bfloat16 is never handed out for a float32 request.

Head. A bias-free MLP ``2D -> 256 -> 64`` with LeakyReLU between its layers (the paper forbids bias terms:
with them the network can map every input onto the centre). Its input is the features standardised with the
training normals' per-dimension mean and std (fixed statistics, not learned). Training follows the paper:

1. Autoencoder pretraining on the normals' features (``config.pretrain_epochs``; a mirrored bias-free
   decoder, feature MSE), as Ruff et al. initialise the network; 0 epochs keeps the random initialisation.
2. The centre ``c`` is the mean head output of the normals; any coordinate closer to zero than ``eps`` is
   moved to ``+-eps``.
3. Deep SAD: per sample, a normal contributes ``||phi(x) - c||^2`` and a labelled anomaly
   ``eta * (||phi(x) - c||^2 + eps)^-1``, averaged over the batch (the paper's image-level objective).

An image's anomaly score is ``||phi(x) - c||^2``. The hardness rule on top of it is the same as for the
patch evaluator (:mod:`kka_synth.alignment.hardness`).

Masks. The feature is global, so masks select nothing here: an anomaly's mask is only checked against its
image's shape, and an *empty* mask (the render changed no pixel, as the patch evaluator reads it too) leaves
that anomaly out of training rather than pushing an unchanged image away from the normals.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import nn

from kka_synth.alignment.sad_core import (
    LOSS_EPS,
    autoencoder_loss,
    check_fit_inputs,
    check_images,
    check_mask,
    check_normals,
    module_state,
    module_tensors,
    nudge_center,
    read_evaluator,
    run_epochs,
    save_evaluator,
    squared_distance,
)
from kka_synth.config import EvaluatorConfig

if TYPE_CHECKING:
    from kka_synth.detectors.vfm.model import Backbone

logger = logging.getLogger(__name__)

CACHE_LIMIT = 20_000
"""Features kept per :class:`Dinov2Features`; the least recently used go first beyond this."""

METADATA_KEY = "feature_deepsad"
"""Metadata key of the settings in a saved evaluator file."""

_SHARED: dict[tuple[str, int, str, str], Dinov2Features] = {}
"""Process-level backbones and their feature caches, by (model, size, device, dtype); filled on first use."""


def image_key(image: np.ndarray) -> str:
    """Hash of an image's shape and bytes: the key of its cached feature."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def backbone_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype ``evaluator.dtype`` ``name`` means for a backbone on ``device``.

    ``auto`` is bfloat16 on a CUDA device that supports it natively and float32 otherwise (the CPU included);
    an explicit float16 on the CPU is refused with a one-line ValueError naming ``evaluator.dtype``.
    """
    from kka_synth.utils.devices import resolve_dtype

    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):  # the device asked for, not the current one
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native else torch.float32
    try:
        return resolve_dtype(name, device)
    except ValueError as error:
        raise ValueError(f"evaluator.{error}") from None


class Dinov2Features:
    """A frozen DINOv2 and its feature cache: RGB uint8 images -> (N, 2 x hidden) float32 CPU features.

    Built from a :class:`~kka_synth.detectors.vfm.model.Backbone` (frozen, with the ImageNet normalisation),
    whose model runs in ``dtype`` on ``device``; images are normalised in float32 before the cast.
    ``encoded`` counts the images that went through the backbone (cache misses).
    """

    def __init__(
        self,
        backbone: Backbone,
        size: int,
        device: torch.device,
        batch_size: int,
        dtype: torch.dtype = torch.float32,
    ):
        if size % backbone.patch_size != 0:
            raise ValueError(f"size {size} must be a multiple of the DINOv2 patch size {backbone.patch_size}")
        self.backbone = backbone.to(device).eval()
        self.backbone.model.to(dtype=dtype)  # the normalisation buffers stay float32
        self.size, self.device, self.batch_size, self.dtype = size, device, batch_size, dtype
        self.dim = 2 * backbone.hidden_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0

    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of (H, W, 3) uint8 -> (B, 3, S, S) float32 in [0, 1]."""
        resized = []
        for image in images:
            shrink = image.shape[0] > self.size or image.shape[1] > self.size
            interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            resized.append(cv2.resize(image, (self.size, self.size), interpolation=interpolation))
        array = np.stack(resized).astype(np.float32) / 255.0  # (B, S, S, 3)
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    @torch.inference_mode()
    def _forward(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 2D) features of a batch: [pooled CLS token, mean of the patch tokens]."""
        x = self._pixels(images).to(self.device)  # (B, 3, S, S) float32
        x = ((x - self.backbone.mean) / self.backbone.std).to(self.dtype)
        tokens = self.backbone.model(pixel_values=x).last_hidden_state  # (B, T, D), final layer norm applied
        cls = tokens[:, 0]  # (B, D): the pooled output of Dinov2Model
        patches = tokens[:, self.backbone.prefix_tokens :].mean(dim=1)  # (B, D)
        return torch.cat([cls, patches], dim=1).float().cpu()  # (B, 2D) float32 whatever the dtype

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 2D) float32 features of ``images``, encoding only those not cached yet."""
        keys = [image_key(image) for image in images]
        missing: dict[str, np.ndarray] = {}
        for key, image in zip(keys, images, strict=True):
            if key not in self.cache:
                missing.setdefault(key, image)
        todo = list(missing.items())
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            for (key, _), feature in zip(chunk, self._forward([image for _, image in chunk]), strict=True):
                self.cache[key] = feature.clone()
            self.encoded += len(chunk)
        out = torch.zeros((len(images), self.dim), dtype=torch.float32)
        for index, key in enumerate(keys):
            self.cache.move_to_end(key)
            out[index] = self.cache[key]
        while len(self.cache) > CACHE_LIMIT:
            self.cache.popitem(last=False)
        if todo:
            logger.debug(
                "encoded %d of %d images with DINOv2 (%d cached)", len(todo), len(keys), len(self.cache)
            )
        return out


def dinov2_features(config: EvaluatorConfig, size: int | None = None) -> Dinov2Features:
    """The process-wide :class:`Dinov2Features` of ``config.model`` on ``config.device`` in ``config.dtype``.

    Images are resized to ``size`` (``config.feature_size`` when None). Loads the backbone on first use;
    missing weights raise one-line ``ModelLoadError`` naming ``evaluator.model`` and ``--profile offline``,
    and float16 on the CPU a one-line ValueError naming ``evaluator.dtype`` before anything is loaded.
    """
    from kka_synth.detectors.vfm.model import Backbone, load_dinov2
    from kka_synth.utils.devices import resolve_device
    from kka_synth.utils.hub import load_pretrained

    size = config.feature_size if size is None else size
    device = resolve_device(config.device)
    dtype = backbone_dtype(config.dtype, device)
    key = (config.model, size, str(device), str(dtype).removeprefix("torch."))
    if key not in _SHARED:
        what = "the DINOv2 backbone of the confusion evaluator"
        model = load_pretrained(load_dinov2, config.model, what, "evaluator.model")
        _SHARED[key] = Dinov2Features(Backbone(model), size, device, config.batch_size, dtype)
        logger.info(
            "loaded DINOv2 %s for the confusion evaluator (%s, %s, %d px)", config.model, device, key[3], size
        )
    features = _SHARED[key]
    features.batch_size = config.batch_size
    return features


def clear_feature_cache() -> None:
    """Drop every shared backbone and cached feature of this process."""
    _SHARED.clear()


def _linear(cin: int, cout: int) -> nn.Linear:
    return nn.Linear(cin, cout, bias=False)


class FeatureHead(nn.Module):
    """(B, F) standardised features -> (B, widths[-1]) embedding: a bias-free MLP with LeakyReLU."""

    def __init__(self, in_dim: int, widths: Sequence[int]):
        super().__init__()
        dims = [in_dim, *widths]
        layers: list[nn.Module] = []
        for cin, cout in zip(dims[:-1], dims[1:], strict=True):
            layers += [_linear(cin, cout), nn.LeakyReLU(0.1)]
        self.layers = nn.Sequential(*layers[:-1])  # no activation after the last layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FeatureDecoder(nn.Module):
    """(B, widths[-1]) -> (B, F): mirrors :class:`FeatureHead` for autoencoder pretraining."""

    def __init__(self, in_dim: int, widths: Sequence[int]):
        super().__init__()
        dims = [in_dim, *widths][::-1]
        layers: list[nn.Module] = []
        for cin, cout in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.LeakyReLU(0.1), _linear(cin, cout)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)


class FeatureDeepSADEvaluator:
    """Deep SAD head on frozen DINOv2 features: ``fit(normal, anomalies)``, then ``score(images)``.

    Same call shape as :class:`~kka_synth.alignment.deepsad.DeepSADEvaluator` (``pretrain``, ``fit``,
    ``score``, ``clone``, ``save``, ``load``). Images are lists of RGB uint8 (H, W, 3) arrays of any size.
    The backbone is loaded on first use, not in the constructor; ``features`` hands over a
    :class:`Dinov2Features` instead of the shared one. ``size`` overrides ``config.feature_size`` (for a
    backbone whose patch is not 14 pixels); None keeps it. Training is deterministic for a given ``seed`` (a
    private torch generator initialises the head and a numpy generator orders the batches).
    """

    def __init__(
        self,
        config: EvaluatorConfig | None = None,
        *,
        seed: int = 0,
        size: int | None = None,
        widths: Sequence[int] = (256, 64),
        batch_size: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        features: Dinov2Features | None = None,
    ):
        self.config = config or EvaluatorConfig(name="deepsad-dinov2")
        size = self.config.feature_size if size is None else size
        if size < 14:
            raise ValueError(f"size must be at least 14 pixels, got {size}")
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive layer widths, got {list(widths)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seed, self.size, self.widths = seed, size, tuple(int(w) for w in widths)
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        self._features = features
        self.head: FeatureHead | None = None
        self.decoder: FeatureDecoder | None = None
        self.center: torch.Tensor | None = None  # (E,)
        self.mean: torch.Tensor | None = None  # (F,) per-dimension mean of the normals' features
        self.std: torch.Tensor | None = None  # (F,)
        self.pretrained = False
        self.history: dict[str, list[float]] = {"pretrain_loss": [], "train_loss": []}
        self._rng = np.random.default_rng(seed)

    @property
    def features(self) -> Dinov2Features:
        """The frozen backbone and its cache (loaded on first access)."""
        if self._features is None:
            self._features = dinov2_features(self.config, self.size)
        return self._features

    def _build(self, dim: int) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        self.head, self.decoder = FeatureHead(dim, self.widths), FeatureDecoder(dim, self.widths)
        _init_weights(self.head, generator)
        _init_weights(self.decoder, generator)

    def _standardised(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, F) features standardised with the normals' statistics."""
        raw = self.features(images)  # (N, F)
        if self.mean is not None and raw.shape[1] != self.mean.shape[0]:
            raise ValueError(
                f"evaluator.model {self.config.model!r} gives {raw.shape[1]} features, but the head was "
                f"trained on {self.mean.shape[0]}"
            )
        return (raw - self.mean) / self.std

    def _epoch_settings(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of :func:`~kka_synth.alignment.sad_core.run_epochs` for ``stage``."""
        return {
            "rng": self._rng,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "history": self.history[f"{stage}_loss"],
            "label": f"feature deep sad {stage}",
        }

    # ------------------------------------------------------------------------------------------- training
    def pretrain(self, normal: Sequence[np.ndarray]) -> FeatureDeepSADEvaluator:
        """Encode ``normal``, set the standardisation, and pretrain the head as an autoencoder."""
        check_normals(normal)
        raw = self.features(normal)  # (N, F)
        self.mean, self.std = raw.mean(dim=0), raw.std(dim=0).clamp_min(1e-6)
        self._build(raw.shape[1])
        assert self.head is not None and self.decoder is not None
        x_all = (raw - self.mean) / self.std
        params = [*self.head.parameters(), *self.decoder.parameters()]
        batch_loss = autoencoder_loss(self.head, self.decoder, x_all)  # batches of (B, F)
        epochs = self.config.pretrain_epochs
        run_epochs(params, len(x_all), batch_loss, epochs=epochs, **self._epoch_settings("pretrain"))
        self.pretrained = True
        return self

    @torch.no_grad()
    def _init_center(self, x_normal: torch.Tensor) -> torch.Tensor:
        """(E,) mean head output of the normals, with near-zero coordinates moved to +-CENTER_EPS."""
        assert self.head is not None
        return nudge_center(self.head(x_normal).mean(dim=0))

    def _trained_anomalies(
        self, anomalies: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
    ) -> list[np.ndarray]:
        """The anomalies that take part in training: all but those whose mask is empty (nothing changed)."""
        kept = []
        for index, (image, mask) in enumerate(zip(anomalies, masks, strict=True)):
            mask = check_mask(index, image, mask)
            if mask is None or mask.any():
                kept.append(image)
        return kept

    def fit(
        self,
        normal: Sequence[np.ndarray],
        anomalies: Sequence[np.ndarray] | None = None,
        anomaly_masks: Sequence[np.ndarray | None] | None = None,
    ) -> FeatureDeepSADEvaluator:
        """Train the head on ``normal`` images and labelled ``anomalies`` (masks: see the module docstring).

        Pretrains first unless :meth:`pretrain` already ran. Returns ``self``.
        """
        anomalies, anomaly_masks = check_fit_inputs(normal, anomalies, anomaly_masks)
        trained = self._trained_anomalies(anomalies, anomaly_masks)
        if not self.pretrained:
            self.pretrain(normal)
        assert self.head is not None
        x_normal = self._standardised(normal)  # (N, F)
        self.center = self._init_center(x_normal)
        x_all = torch.cat([x_normal, self._standardised(trained)]) if trained else x_normal  # (N + M, F)
        is_anomaly = torch.zeros(len(x_all), dtype=torch.bool)
        is_anomaly[len(x_normal) :] = True
        head, center, eta = self.head, self.center, self.config.eta

        def batch_loss(batch: np.ndarray) -> torch.Tensor:
            index = torch.from_numpy(batch)
            dist = squared_distance(head(x_all[index]), center)  # (B,)
            return torch.where(is_anomaly[index], eta / (dist + LOSS_EPS), dist).mean()

        epochs = self.config.epochs
        run_epochs(head.parameters(), len(x_all), batch_loss, epochs=epochs, **self._epoch_settings("train"))
        return self

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) float64 anomaly score ``||phi(x) - c||^2`` (higher = more anomalous)."""
        if self.center is None or self.head is None:
            raise RuntimeError("FeatureDeepSADEvaluator.score called before fit")
        check_images(images, "images")
        if len(images) == 0:
            return np.zeros(0, dtype=np.float64)
        dist = squared_distance(self.head(self._standardised(images)), self.center)  # (N,)
        return dist.numpy().astype(np.float64)

    def clone(self) -> FeatureDeepSADEvaluator:
        """An independent copy of the head, centre, statistics, history and random state; the frozen
        backbone and its feature cache are shared, not copied."""
        features, self._features = self._features, None
        try:
            twin = copy.deepcopy(self)
        finally:
            self._features = features
        twin._features = features
        return twin

    # ---------------------------------------------------------------------------------------- save/load
    def _settings(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "size": self.size,
            "widths": list(self.widths),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "config": dataclasses.asdict(self.config),
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted head, centre and feature statistics to one safetensors file (not the backbone:
        :meth:`load` reloads it from ``config.model``)."""
        if self.center is None or self.head is None or self.mean is None or self.std is None:
            raise RuntimeError("FeatureDeepSADEvaluator.save called before fit")
        tensors = {**module_tensors("head", self.head), "center": self.center, "mean": self.mean}
        return save_evaluator(path, {**tensors, "std": self.std}, METADATA_KEY, self._settings())

    @classmethod
    def load(cls, path: str | Path) -> FeatureDeepSADEvaluator:
        """Read a file written by :meth:`save`; with the same backbone it scores as the saved one did."""
        settings, config, tensors = read_evaluator(path, METADATA_KEY, "DINOv2 Deep SAD evaluator")
        evaluator = cls(config, **settings)  # type: ignore[arg-type]
        evaluator.mean, evaluator.std = tensors["mean"], tensors["std"]
        evaluator._build(evaluator.mean.shape[0])
        assert evaluator.head is not None
        evaluator.head.load_state_dict(module_state("head", tensors))
        evaluator.center = tensors["center"]
        evaluator.pretrained = True
        return evaluator

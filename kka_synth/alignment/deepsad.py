"""Patch-level Deep SAD: the offline confusion evaluator.

Implements Deep SAD from Ruff et al., "Deep Semi-Supervised Anomaly Detection" (ICLR 2020), on a small
fully convolutional CNN trained from scratch. The encoder maps an image to a grid of patch embeddings and
has no bias terms (a bias lets the network map everything onto the centre, the trivial solution the paper
rules out). Training follows the paper:

1. Autoencoder pretraining on normal images; the decoder mirrors the encoder, the loss is pixel MSE.
2. The centre ``c`` is the mean patch embedding of the normal images under the pretrained encoder; any
   coordinate closer to zero than ``eps`` is pushed to ``+-eps`` (the paper's fix against a trivial ``c``).
3. Deep SAD training: normal patches minimise ``||phi(x) - c||^2``; labelled-anomaly patches minimise
   ``eta * (||phi(x) - c||^2 + eps)^-1``, which pushes them away from ``c``. An anomaly's labelled patches are
   the grid cells its mask covers (the ring of cells around them is ignored, since their receptive field
   sees the defect); an anomaly without a mask labels its ``top_k`` farthest patches, and one with an empty
   mask takes no part in training.

Two departures from the image-level paper, both because a defect covers a few cells of the grid:

- the pull and push terms are averaged separately (each over its own patches) and summed, where the paper
  averages over all samples; with one mean over patches, a defect's push weighs its tiny share of them
  and the model learned to tell none of its labelled anomalies from normals;
- training runs on random aligned crops (``crop``) of the full-resolution images, each anomaly crop holding
  one of its labelled cells. Downsampling to save time blurred thin and faint defects away; crops keep the
  resolution at the cost of the smaller image, and the fully convolutional encoder still scores whole images.

An image's anomaly score is the mean of its ``top_k`` largest per-patch squared distances to ``c``. Scoring
patches rather than whole images keeps the model from memorising the few training normals, so a subtle
local defect is not drowned by the rest of the image.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from kka_synth.alignment.sad_core import (
    CENTER_EPS,
    LOSS_EPS,
    EvaluatorInputError,
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

__all__ = ["CENTER_EPS", "LOSS_EPS", "DeepSADEvaluator", "EvaluatorInputError", "check_images"]

logger = logging.getLogger(__name__)

_NORMAL, _ANOMALY, _IGNORE, _UNMASKED = 0, 1, -1, 2
"""Patch labels: pull to ``c``, push away, leave out, and "anomaly without a mask" (top-k chosen per step)."""


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-4, affine=False)  # no affine: no bias terms anywhere


class PatchEncoder(nn.Module):
    """(B, 3, S, S) -> (B, D, S/4, S/4): one bias-free embedding per 4x4 cell (receptive field 21 px)."""

    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        c1, c2, dim = channels
        self.layers = nn.Sequential(
            _conv(3, c1, 5, stride=2), _norm(c1), nn.LeakyReLU(0.1),  # (B, c1, S/2, S/2)
            _conv(c1, c2, 5, stride=2), _norm(c2), nn.LeakyReLU(0.1),  # (B, c2, S/4, S/4)
            _conv(c2, dim, 3),  # (B, D, S/4, S/4)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class PatchDecoder(nn.Module):
    """(B, D, S/4, S/4) -> (B, 3, S, S): mirrors :class:`PatchEncoder` for autoencoder pretraining."""

    def __init__(self, channels: tuple[int, int, int]):
        super().__init__()
        c1, c2, dim = channels
        self.layers = nn.Sequential(
            nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(dim, c2, 4, stride=2, padding=1, bias=False), _norm(c2), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1, bias=False), _norm(c1), nn.LeakyReLU(0.1),
            _conv(c1, 3, 3),  # (B, 3, S, S)
        )  # fmt: skip

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z)


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)


class DeepSADEvaluator:
    """Deep SAD on a patch grid: ``fit(normal, anomalies)``, then ``score(images)`` (higher = more anomalous).

    Images are lists of RGB uint8 (H, W, 3) arrays of any size; they are resized to ``size`` x ``size``.
    Training is deterministic for a given ``seed`` on CPU (a private torch generator initialises the
    weights and a numpy generator orders batches and draws flips; no global random state is touched).
    """

    def __init__(
        self,
        config: EvaluatorConfig | None = None,
        *,
        seed: int = 0,
        size: int | None = None,
        crop: int | None = -1,
        channels: tuple[int, int, int] = (16, 32, 32),
        top_k: int = 4,
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
    ):
        self.config = config or EvaluatorConfig()
        size = self.config.size if size is None else size
        crop = self.config.crop if crop == -1 else crop  # -1: take it from the config; None: no crops
        if size % 4 != 0 or size < 16:
            raise ValueError(f"size must be a multiple of 4 and >= 16, got {size}")
        if not 1 <= top_k <= (size // 4) ** 2:
            raise ValueError(f"top_k must be in [1, {(size // 4) ** 2}] for size {size}, got {top_k}")
        if crop is not None and (crop % 4 != 0 or not 16 <= crop <= size):
            raise ValueError(f"crop must be a multiple of 4 in [16, size], got {crop}")
        self.seed, self.size, self.channels, self.top_k = seed, size, tuple(channels), top_k
        self.crop = crop
        self.batch_size, self.lr, self.weight_decay = batch_size, lr, weight_decay
        generator = torch.Generator().manual_seed(seed)
        self.encoder = PatchEncoder(self.channels)
        self.decoder = PatchDecoder(self.channels)
        _init_weights(self.encoder, generator)
        _init_weights(self.decoder, generator)
        self.center: torch.Tensor | None = None  # (D,)
        self.mean = torch.zeros(3)  # (3,) per-channel mean of the normals, in [0, 1] units
        self.std = torch.ones(3)  # (3,)
        self.pretrained = False
        self.history: dict[str, list[float]] = {"pretrain_loss": [], "train_loss": []}
        self._rng = np.random.default_rng(seed)

    @property
    def grid(self) -> int:
        """Side of the patch grid."""
        return self.size // 4

    # ----------------------------------------------------------------------------------------------- data
    def _pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """List of (H, W, 3) uint8 -> (N, 3, S, S) float32 in [0, 1]."""
        resized = [
            cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA) for image in images
        ]
        array = np.stack(resized).astype(np.float32) / 255.0  # (N, S, S, 3)
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    def _inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, 3, S, S) standardised with the normals' channel statistics."""
        return (self._pixels(images) - self.mean[:, None, None]) / self.std[:, None, None]

    def _patch_labels(
        self, anomalies: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]
    ) -> np.ndarray:
        """(M, G, G) int8 labels of the anomalies' patches from their masks."""
        labels = np.full((len(anomalies), self.grid, self.grid), _UNMASKED, dtype=np.int8)
        ring = np.ones((3, 3), np.uint8)
        for index, (image, mask) in enumerate(zip(anomalies, masks, strict=True)):
            mask = check_mask(index, image, mask)
            if mask is None:
                continue
            coverage = cv2.resize(
                (mask != 0).astype(np.float32), (self.grid, self.grid), interpolation=cv2.INTER_AREA
            )  # (G, G) share of each cell covered
            covered = (coverage > 0).astype(np.uint8)
            if not covered.any():
                labels[index] = _IGNORE  # an empty mask marks no defect: nothing to push, nothing to pull
                continue
            near = cv2.dilate(covered, ring).astype(bool)
            labels[index] = np.where(covered.astype(bool), _ANOMALY, np.where(near, _IGNORE, _NORMAL))
        return labels

    def _flip(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random horizontal and vertical flips per sample of x (B, 3, S, S) and labels (B, G, G)."""
        flips = torch.from_numpy(self._rng.random((2, x.shape[0])) < 0.5)  # (2, B)
        for dim, flip in zip((-1, -2), flips, strict=True):
            x = torch.where(flip[:, None, None, None], x.flip(dim), x)
            if labels is not None:
                labels = torch.where(flip[:, None, None], labels.flip(dim), labels)
        return x, labels

    def _crop(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Random aligned crops of ``crop`` pixels from x (B, 3, S, S) and labels (B, G, G).

        Training on crops keeps the model at the images' full resolution at a fraction of the cost; the
        encoder is fully convolutional, so scoring still sees whole images. A crop of an image with
        labelled-anomaly cells always contains one of them, chosen at random.
        """
        if self.crop is None or self.crop == self.size:
            return x, labels
        cells, grid = self.crop // 4, self.grid
        xs, ls = [], []
        for i in range(x.shape[0]):
            top, left = self._rng.integers(0, grid - cells + 1, size=2)
            if labels is not None:
                hits = torch.nonzero(labels[i] == _ANOMALY)
                if len(hits):
                    cy, cx = hits[self._rng.integers(len(hits))].tolist()
                    top = self._rng.integers(max(0, cy - cells + 1), min(cy, grid - cells) + 1)
                    left = self._rng.integers(max(0, cx - cells + 1), min(cx, grid - cells) + 1)
            xs.append(x[i, :, 4 * top : 4 * (top + cells), 4 * left : 4 * (left + cells)])
            if labels is not None:
                ls.append(labels[i, top : top + cells, left : left + cells])
        return torch.stack(xs), (torch.stack(ls) if labels is not None else None)  # (B, 3, C, C), (B, c, c)

    # ------------------------------------------------------------------------------------------- training
    def pretrain(self, normal: Sequence[np.ndarray]) -> DeepSADEvaluator:
        """Autoencoder pretraining on ``normal`` for ``config.pretrain_epochs`` epochs; sets normalisation."""
        check_normals(normal)
        pixels = self._pixels(normal)  # (N, 3, S, S)
        self.mean = pixels.mean(dim=(0, 2, 3))
        self.std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
        x_all = (pixels - self.mean[:, None, None]) / self.std[:, None, None]
        self.encoder.train()
        self.decoder.train()

        def augment(x: torch.Tensor) -> torch.Tensor:
            return self._crop(*self._flip(x))[0]  # (B, 3, S, S) -> (B, 3, C, C)

        params = [*self.encoder.parameters(), *self.decoder.parameters()]
        batch_loss = autoencoder_loss(self.encoder, self.decoder, x_all, augment)
        run_epochs(
            params,
            len(x_all),
            batch_loss,
            epochs=self.config.pretrain_epochs,
            **self._epoch_settings("pretrain"),
        )
        self.pretrained = True
        return self

    @torch.no_grad()
    def _init_center(self, x_normal: torch.Tensor) -> torch.Tensor:
        """(D,) mean patch embedding of the normals, with near-zero coordinates moved to +-CENTER_EPS."""
        self.encoder.eval()
        z = torch.cat(
            [self.encoder(x_normal[i : i + 64]) for i in range(0, len(x_normal), 64)]
        )  # (N, D, G, G)
        return nudge_center(z.mean(dim=(0, 2, 3)))

    def fit(
        self,
        normal: Sequence[np.ndarray],
        anomalies: Sequence[np.ndarray] | None = None,
        anomaly_masks: Sequence[np.ndarray | None] | None = None,
    ) -> DeepSADEvaluator:
        """Train on ``normal`` images and labelled ``anomalies`` (optional bool (H, W) mask per anomaly).

        Pretrains the autoencoder first unless :meth:`pretrain` already ran. Returns ``self``.
        """
        anomalies, anomaly_masks = check_fit_inputs(normal, anomalies, anomaly_masks)
        if not self.pretrained:
            self.pretrain(normal)
        x_normal = self._inputs(normal)  # (N, 3, S, S)
        self.center = self._init_center(x_normal)
        x_all = torch.cat([x_normal, self._inputs(anomalies)]) if anomalies else x_normal  # (N + M, 3, S, S)
        labels_all = torch.cat(
            [
                torch.full((len(normal), self.grid, self.grid), _NORMAL, dtype=torch.int8),
                torch.from_numpy(self._patch_labels(anomalies, anomaly_masks)),
            ]
        )  # (N + M, G, G)
        center, eta = self.center, self.config.eta

        def batch_loss(batch: np.ndarray) -> torch.Tensor | None:
            index = torch.from_numpy(batch)
            x, labels = self._crop(*self._flip(x_all[index], labels_all[index]))  # (B, 3, C, C), (B, c, c)
            dist = squared_distance(self.encoder(x), center)  # (B, c, c)
            labels = self._label_unmasked(labels, dist.detach())
            pull, push = labels == _NORMAL, labels == _ANOMALY  # (B, c, c)
            if not (pull.any() or push.any()):
                return None
            # The two terms are averaged separately: a defect covers a few cells of the grid, and one mean
            # over all patches would weigh its push by its tiny share of them (see the module docstring).
            loss = dist[pull].mean() if pull.any() else dist.new_zeros(())
            if push.any():
                loss = loss + eta * (1.0 / (dist[push] + LOSS_EPS)).mean()
            return loss

        self.encoder.train()
        epochs = self.config.epochs
        run_epochs(
            self.encoder.parameters(), len(x_all), batch_loss, epochs=epochs, **self._epoch_settings("train")
        )
        self.encoder.eval()
        return self

    def _epoch_settings(self, stage: str) -> dict[str, Any]:
        """Keyword arguments of :func:`~kka_synth.alignment.sad_core.run_epochs` for ``stage``."""
        return {
            "rng": self._rng,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "history": self.history[f"{stage}_loss"],
            "label": f"patch deep sad {stage}",
        }

    def _label_unmasked(self, labels: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Unmasked rows of ``labels`` (B, G, G): top_k farthest patches -> anomaly, the rest ignored."""
        rows = (labels == _UNMASKED).flatten(1).all(dim=1)  # (B,)
        if not rows.any():
            return labels
        flat = labels.flatten(1).clone()  # (B, G*G)
        top = dist.flatten(1)[rows].topk(self.top_k, dim=1).indices  # (R, k)
        chosen = torch.full_like(flat[rows], _IGNORE).scatter_(1, top, _ANOMALY)
        flat[rows] = chosen
        return flat.view_as(labels)

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_maps(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N, G, G) float32 squared distance of every patch embedding to the centre."""
        if self.center is None:
            raise RuntimeError("DeepSADEvaluator.score called before fit")
        check_images(images, "images")
        if len(images) == 0:
            return np.zeros((0, self.grid, self.grid), np.float32)
        self.encoder.eval()
        maps = []
        for start in range(0, len(images), 64):
            z = self.encoder(self._inputs(images[start : start + 64]))  # (B, D, G, G)
            maps.append(squared_distance(z, self.center))  # (B, G, G)
        return torch.cat(maps).numpy().astype(np.float32)

    def score(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(N,) float64 anomaly score: mean of an image's top_k patch distances (higher = more anomalous)."""
        maps = self.score_maps(images).reshape(len(images), -1)  # (N, G*G)
        return np.sort(maps, axis=1)[:, -self.top_k :].mean(axis=1).astype(np.float64)

    def clone(self) -> DeepSADEvaluator:
        """An independent copy (weights, centre, history and random state)."""
        return copy.deepcopy(self)

    # ---------------------------------------------------------------------------------------- save/load
    def _settings(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "size": self.size,
            "crop": self.crop,
            "channels": list(self.channels),
            "top_k": self.top_k,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "config": dataclasses.asdict(self.config),
        }

    def save(self, path: str | Path) -> Path:
        """Write the fitted encoder, centre and normalisation to one safetensors file."""
        if self.center is None:
            raise RuntimeError("DeepSADEvaluator.save called before fit")
        tensors = {**module_tensors("encoder", self.encoder), "center": self.center, "mean": self.mean}
        return save_evaluator(path, {**tensors, "std": self.std}, "deepsad", self._settings())

    @classmethod
    def load(cls, path: str | Path) -> DeepSADEvaluator:
        """Read a file written by :meth:`save`; the result scores exactly as the saved evaluator did."""
        settings, config, tensors = read_evaluator(path, "deepsad", "Deep SAD evaluator")
        settings["channels"] = tuple(settings["channels"])  # type: ignore[arg-type]
        evaluator = cls(config, **settings)  # type: ignore[arg-type]
        evaluator.encoder.load_state_dict(module_state("encoder", tensors))
        evaluator.center, evaluator.mean, evaluator.std = tensors["center"], tensors["mean"], tensors["std"]
        evaluator.pretrained = True
        evaluator.encoder.eval()
        return evaluator

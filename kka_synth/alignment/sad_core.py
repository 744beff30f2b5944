"""What the two Deep SAD confusion evaluators share: input checks, the centre, the training loop, the file.

Implements the training recipe of Ruff et al., "Deep Semi-Supervised Anomaly Detection" (ICLR 2020), as far
as it does not depend on the network: autoencoder pretraining, the centre ``c`` (mean embedding of the
normals, with near-zero coordinates moved to ``+-eps``), epochs of shuffled mini-batches under Adam, and the
squared distance ``||phi(x) - c||^2`` that both trains and scores. The networks, how anomalies are labelled
and the exact loss stay with each evaluator: :mod:`kka_synth.alignment.deepsad` (a patch CNN) and
:mod:`kka_synth.alignment.feature_sad` (a head on frozen DINOv2 features).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kka_synth.config import EvaluatorConfig

logger = logging.getLogger(__name__)

CENTER_EPS = 0.1
"""Coordinates of ``c`` closer to zero than this are moved to ``+-CENTER_EPS`` (Ruff et al.)."""

LOSS_EPS = 1e-6
"""Added to distances inside the inverse term of the labelled-anomaly loss."""


class EvaluatorInputError(ValueError):
    """Images or masks handed to the evaluator have the wrong type or shape; the message names the field."""


# ------------------------------------------------------------------------------------------------ checks
def check_images(images: Sequence[np.ndarray], name: str) -> None:
    """Raise :class:`EvaluatorInputError` naming ``name[i]`` unless every image is RGB uint8 (H, W, 3)."""
    for index, image in enumerate(images):
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            shape = getattr(image, "shape", None)
            dtype = getattr(image, "dtype", type(image).__name__)
            raise EvaluatorInputError(
                f"{name}[{index}] must be an RGB uint8 array (H, W, 3), got shape {shape} dtype {dtype}"
            )


def check_normals(normal: Sequence[np.ndarray]) -> None:
    """The normals a model pretrains on: valid images, at least two of them (for the channel std)."""
    check_images(normal, "normal")
    if len(normal) < 2:
        raise EvaluatorInputError(f"normal must hold at least 2 images, got {len(normal)}")


def check_fit_inputs(
    normal: Sequence[np.ndarray],
    anomalies: Sequence[np.ndarray] | None,
    anomaly_masks: Sequence[np.ndarray | None] | None,
) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Check the arguments of ``fit``; returns the anomalies and one mask (or None) per anomaly."""
    anomalies = list(anomalies or [])
    check_images(normal, "normal")
    check_images(anomalies, "anomalies")
    if anomaly_masks is None:
        return anomalies, [None] * len(anomalies)
    if len(anomaly_masks) != len(anomalies):
        raise EvaluatorInputError(
            f"anomaly_masks has {len(anomaly_masks)} entries for {len(anomalies)} anomalies"
        )
    return anomalies, list(anomaly_masks)


def check_mask(index: int, image: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """``mask`` as an array of its image's (H, W) shape, or None for an anomaly without a mask."""
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != image.shape[:2]:
        raise EvaluatorInputError(
            f"anomaly_masks[{index}] has shape {mask.shape}, expected its image's {image.shape[:2]}"
        )
    return mask


# ---------------------------------------------------------------------------------------------- training
def nudge_center(center: torch.Tensor) -> torch.Tensor:
    """Move the coordinates of ``center`` (D,) closer to zero than CENTER_EPS to +-CENTER_EPS, in place."""
    small = center.abs() < CENTER_EPS
    center[small & (center < 0)] = -CENTER_EPS
    center[small & (center >= 0)] = CENTER_EPS
    return center


def squared_distance(z: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(B, D, ...) embeddings and a (D,) centre -> (B, ...) squared Euclidean distances over dim 1."""
    return ((z - center.view(1, -1, *([1] * (z.ndim - 2)))) ** 2).sum(dim=1)


def batch_indices(rng: np.random.Generator, count: int, batch_size: int) -> list[np.ndarray]:
    """A random permutation of ``range(count)`` cut into batches of ``batch_size`` (the last may be short)."""
    order = rng.permutation(count)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def run_epochs(
    params: Iterable[nn.Parameter],
    count: int,
    batch_loss: Callable[[np.ndarray], torch.Tensor | None],
    *,
    epochs: int,
    rng: np.random.Generator,
    batch_size: int,
    lr: float,
    weight_decay: float,
    history: list[float],
    label: str,
) -> None:
    """Adam over ``params`` for ``epochs`` epochs of shuffled batches of ``range(count)``.

    ``batch_loss(indices)`` returns the batch's loss, or None to skip the batch. Each epoch appends its mean
    loss per sample (skipped batches count as zero) to ``history``.
    """
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        total = 0.0
        for batch in batch_indices(rng, count, batch_size):
            loss = batch_loss(batch)
            if loss is None:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        history.append(total / count)
        logger.debug("%s epoch %d: loss %.4f", label, epoch, history[-1])


def autoencoder_loss(
    encoder: nn.Module,
    decoder: nn.Module,
    x_all: torch.Tensor,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[np.ndarray], torch.Tensor]:
    """The ``batch_loss`` of autoencoder pretraining for :func:`run_epochs` on the rows of ``x_all`` (N, ...).

    A batch's loss is the mean squared error of ``decoder(encoder(x))`` against x, where x is the batch's
    rows after ``augment`` (if given).
    """

    def batch_loss(batch: np.ndarray) -> torch.Tensor:
        x = x_all[torch.from_numpy(batch)]
        if augment is not None:
            x = augment(x)
        return ((decoder(encoder(x)) - x) ** 2).mean()

    return batch_loss


# ------------------------------------------------------------------------------------------------- files
def save_evaluator(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    metadata_key: str,
    settings: dict[str, object],
) -> Path:
    """Write ``tensors`` and the JSON ``settings`` (under ``metadata_key``) to one safetensors file.

    The file is written under a temporary name and renamed, so a reader never sees half of it.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, tmp, metadata={metadata_key: json.dumps(settings)})
    tmp.replace(path)
    return path


def module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with every name prefixed by ``prefix.``."""
    return {f"{prefix}.{name}": tensor for name, tensor in module.state_dict().items()}


def module_state(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` named ``prefix.*``, with the prefix removed (inverse of module_tensors)."""
    start = len(prefix) + 1
    return {name[start:]: tensor for name, tensor in tensors.items() if name.startswith(prefix + ".")}


def read_evaluator(
    path: str | Path, metadata_key: str, what: str
) -> tuple[dict[str, object], EvaluatorConfig, dict[str, torch.Tensor]]:
    """(settings without the config, the config, the tensors) of a file written by :func:`save_evaluator`.

    ``what`` names the kind of evaluator in the errors for a missing file or a file of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata_key not in metadata:
        raise EvaluatorInputError(f"{path} is not a {what} file (no {metadata_key!r} metadata)")
    settings = json.loads(metadata[metadata_key])
    config = EvaluatorConfig(**settings.pop("config"))
    return settings, config, load_file(path)

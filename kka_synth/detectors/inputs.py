"""Input checks and resizing that every detector shares.

At a detector's boundary images are RGB uint8 arrays (H, W, 3) and masks bool (H, W) (see
:mod:`kka_synth.types`); anything else is a ``ValueError`` naming the argument. Inside, each detector resizes
to its working size with :func:`resize_rgb` and :func:`resize_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from kka_synth.types import SyntheticStage


def check_rgb(image: object, name: str) -> np.ndarray:
    """``image`` itself when it is a non-empty RGB uint8 (H, W, 3) array; otherwise ValueError naming it."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", type(image).__name__)
        raise ValueError(f"{name} must be an RGB uint8 array (H, W, 3), got shape {shape} dtype {dtype}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"{name} is empty, got shape {image.shape}")
    return image


def check_images(images: object, name: str) -> list[np.ndarray]:
    """A list of checked RGB uint8 images; ValueError for anything else (a bare array included)."""
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes, np.ndarray)):
        raise ValueError(f"{name} must be a list of RGB uint8 arrays, got {type(images).__name__}")
    return [check_rgb(image, f"{name}[{index}]") for index, image in enumerate(images)]


def check_mask(mask: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``mask`` itself when it is a bool array of ``shape``; otherwise ValueError naming it."""
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != shape:
        raise ValueError(
            f"{name} must be a bool array of shape {shape}, got shape {getattr(mask, 'shape', None)} "
            f"dtype {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    return mask


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[0], size[1], 3): area averaging when shrinking, bilinear otherwise."""
    if image.shape[:2] == size:
        return image
    shrink = image.shape[0] > size[0] or image.shape[1] > size[1]
    return cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (H, W) -> bool (size[0], size[1]), nearest neighbour."""
    if mask.shape == size:
        return mask
    return cv2.resize(mask.astype(np.uint8), size[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)


def prepare_stages(synthetic: object, size: tuple[int, int]) -> tuple[list[SyntheticStage], dict[str, int]]:
    """Check a synthetic schedule and resize its fixed anomalies (image, mask, clean) to ``size``.

    Anomalies without a mask (text-to-image renders) are left out and counted: the second value maps each
    stage's name to how many were left out, for the detector to log and note. Raises ValueError naming the
    stage and entry for anything malformed, and when the stages' shares sum above 1.
    """
    if not isinstance(synthetic, Sequence) or not synthetic:
        raise ValueError("synthetic must be None or a non-empty list of SyntheticStage")
    prepared, skipped = [], {}
    for index, stage in enumerate(synthetic):
        if not isinstance(stage, SyntheticStage):
            raise ValueError(f"synthetic[{index}] must be a SyntheticStage, got {type(stage).__name__}")
        anomalies = []
        for number, entry in enumerate(stage.anomalies):
            where = f"stage {stage.name!r} anomaly {number}"
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise ValueError(f"{where} must be a tuple (image, mask, clean or None)")
            image = check_rgb(entry[0], f"{where} image")
            if entry[1] is None:
                skipped[stage.name] = skipped.get(stage.name, 0) + 1
                continue
            mask = check_mask(entry[1], image.shape[:2], f"{where} mask")
            clean = None if entry[2] is None else check_rgb(entry[2], f"{where} clean image")
            if clean is not None and clean.shape != image.shape:
                raise ValueError(f"{where}: clean image shape {clean.shape} differs from {image.shape}")
            resized_clean = None if clean is None else resize_rgb(clean, size)
            anomalies.append((resize_rgb(image, size), resize_mask(mask, size), resized_clean))
        prepared.append(SyntheticStage(stage.name, anomalies=anomalies, draw=stage.draw, share=stage.share))
    total = sum(stage.share for stage in prepared)
    if total > 1.0 + 1e-6:
        raise ValueError(f"synthetic stage shares sum to {total:.3f}, more than 1")
    return prepared, skipped

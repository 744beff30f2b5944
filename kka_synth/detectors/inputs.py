"""Input checks and resizing that every detector shares.

At a detector's boundary images are RGB uint8 arrays (H, W, 3) and masks bool (H, W) (see
:mod:`kka_synth.types`); anything else is a ``ValueError`` naming the argument. Inside, each detector resizes
to its working size with :func:`resize_rgb` and :func:`resize_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np


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

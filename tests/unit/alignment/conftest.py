"""Real texture crops (scikit-image's CC0 brick) and painted defects for the alignment tests."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import skimage.data

CROP = 128


@pytest.fixture(scope="session")
def brick() -> np.ndarray:
    """(512, 512, 3) uint8 RGB brick texture."""
    gray = skimage.data.brick()
    return np.ascontiguousarray(np.stack([gray] * 3, axis=-1))


def crops(texture: np.ndarray, count: int, rows: tuple[int, int], seed: int) -> list[np.ndarray]:
    """``count`` random CROP x CROP crops whose top-left row lies in ``rows`` (to keep regions apart)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        y = int(rng.integers(rows[0], rows[1] - CROP))
        x = int(rng.integers(0, texture.shape[1] - CROP))
        out.append(np.ascontiguousarray(texture[y : y + CROP, x : x + CROP]))
    return out


def paint_blob(image: np.ndarray, radius: int, tone: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A disc of ``radius`` px shifted by ``tone`` grey levels at a random place; returns (image, mask)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(image.shape[:2], np.uint8)
    cy, cx = (int(v) for v in rng.integers(radius + 2, CROP - radius - 2, size=2))
    cv2.circle(mask, (cx, cy), radius, 1, -1)
    painted = image.astype(np.int16)
    painted[mask > 0] += tone
    return np.clip(painted, 0, 255).astype(np.uint8), mask.astype(bool)


@pytest.fixture(scope="session")
def brick_sets(brick: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Training normals (top rows), held-out normals (bottom rows), masked training anomalies, and test
    candidates from the bottom rows: obvious dark blobs and unchanged crops."""
    normals = crops(brick, 32, (0, 300), seed=1)
    holdout = crops(brick, 16, (300, 512), seed=2)
    train_pairs = [
        paint_blob(im, 12, -110, seed=i) for i, im in enumerate(crops(brick, 12, (0, 300), seed=3))
    ]
    test_pairs = [
        paint_blob(im, 14, -120, seed=100 + i) for i, im in enumerate(crops(brick, 8, (300, 512), 4))
    ]
    unchanged = crops(brick, 6, (300, 512), seed=5)
    tiny_mask = np.zeros((CROP, CROP), bool)
    tiny_mask[60:64, 60:64] = True  # a "defect" that changed no pixel: the hardest possible candidate
    return {
        "normals": normals,
        "holdout": holdout,
        "anomalies": [image for image, _ in train_pairs],
        "masks": [mask for _, mask in train_pairs],
        "obvious": [image for image, _ in test_pairs],
        "obvious_masks": [mask for _, mask in test_pairs],
        "unchanged": unchanged,
        "unchanged_masks": [tiny_mask.copy() for _ in unchanged],
    }

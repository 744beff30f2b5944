"""Images for the synth tests: crops of the bundled brick texture and a drawn object on a background."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from kka_synth.synth.foreground import box_mask, foreground_box, region_pixel_box


def to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))


@pytest.fixture(scope="session")
def brick_sheet() -> np.ndarray:
    return to_rgb(data.brick())


@pytest.fixture(scope="session")
def brick(brick_sheet: np.ndarray) -> np.ndarray:
    """A 128x128 RGB crop of the brick texture."""
    return brick_sheet[100:228, 100:228].copy()


def make_object(seed: int = 0, side: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A gravel-textured tan ellipse on a dark, slightly noisy background; returns (image, object mask)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:side, 0:side]
    inside = ((xs - side * 0.5) / (side * 0.36)) ** 2 + ((ys - side * 0.52) / (side * 0.28)) ** 2 < 1.0
    image = np.empty((side, side, 3), dtype=np.float32)
    image[:] = (40.0, 44.0, 52.0)
    gravel = to_rgb(data.gravel())[seed * 16 : seed * 16 + side, :side].astype(np.float32)
    image[inside] = (0.55 * gravel[inside] + 70.0) * np.array([1.0, 0.85, 0.65], dtype=np.float32)
    image += rng.normal(0.0, 2.0, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), inside


@pytest.fixture(scope="session")
def object_image() -> np.ndarray:
    return make_object(0)[0]


@pytest.fixture(scope="session")
def object_truth() -> np.ndarray:
    """The true object mask of ``object_image``."""
    return make_object(0)[1]


@pytest.fixture(scope="session")
def images(brick: np.ndarray, object_image: np.ndarray) -> dict[str, np.ndarray]:
    return {"brick": brick, "object": object_image}


def _region_area(foreground: np.ndarray, region: tuple[float, float, float, float]) -> np.ndarray:
    return box_mask(foreground.shape, region_pixel_box(foreground_box(foreground), region))


@pytest.fixture(scope="session")
def region_area():
    """A function (foreground, region) -> bool mask of the normalised region box on the object's box."""
    return _region_area


@pytest.fixture(scope="session")
def normals(brick_sheet: np.ndarray) -> list[np.ndarray]:
    """Nine 128x128 brick crops from disjoint places of the sheet (normal images of one category)."""
    return [brick_sheet[y : y + 128, x : x + 128].copy() for y in (0, 192, 384) for x in (0, 192, 384)]


@pytest.fixture(scope="session")
def object_normals() -> list[np.ndarray]:
    """Eight drawn objects of one category: same silhouette, different gravel texture and sensor noise."""
    return [make_object(seed)[0] for seed in range(8)]

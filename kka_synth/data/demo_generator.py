"""Pixels of the built-in demo dataset: its normal images and the defect generator of its test anomalies.

The generator is independent of kka-synth's renderers on purpose (``kka_synth.synth`` is never imported):
a demo whose test defects came from the renderers under study would grade them against themselves. See
:mod:`kka_synth.data.demo` for the dataset these pixels fill. The textures are scikit-image's CC0
photographs ``brick`` (CC0Textures "Bricks25") and ``gravel`` (CC0Textures "Gravel04").

Normal images:

- ``brick`` (texture): crops of the brick photograph tinted brick red. Training crops come from rows
  0-299 of the 512x512 source and test crops from rows 320-511, so no test image holds a pixel of a
  training image. Half the crops are mirrored left-right.
- ``washer`` (object): a flat metal washer with a bevelled profile lit from one side, brushed-metal
  highlights, machining rings and a soft drop shadow, on a plain teal cloth. Position, scale, tilt,
  light direction and exposure vary slightly between images, and every image has its own sensor noise.

Defects (each mask covers every pixel the defect changes):

- ``contamination``: a patch of gravel, matched to the brick's brightness and contrast, pasted along an
  irregular polygon;
- ``deformation``: a smooth elastic displacement inside a small ellipse (a dent when placed on the
  washer's rim); its mask is the filled set of pixels that changed;
- ``stain``: an ink- or oil-like smudge, a blob blurred with a Gaussian and multiplied into the colour;
- ``chip``: a bite cut out of the washer's outer rim that shows the background behind it.

Every image draws from its own ``numpy.random.Generator`` seeded by (category, split, defect, index), so
images do not depend on build order and a rebuild is byte-identical.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import ndimage

from kka_synth.data.images import DataError

DEMO_CATEGORIES = ("brick", "washer")
DEMO_DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "brick": ("contamination", "deformation", "stain"),
    "washer": ("chip", "deformation", "stain"),
}
IMAGE_SIZE = 128
SEED = 20250220
BRICK_TRAIN_ROWS = (0, 300)
BRICK_TEST_ROWS = (320, 512)

_BRICK_STOPS = (  # grey level -> RGB: dark brick, brick red, light mortar
    (0.0, 0.30, 0.55, 1.0),
    ((0.12, 0.05, 0.04), (0.62, 0.29, 0.20), (0.78, 0.66, 0.56), (0.92, 0.88, 0.82)),
)


@lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's brick and gravel photographs as float grey (512, 512) in [0, 1]."""
    from skimage import data

    brick, gravel = data.brick().astype(np.float64) / 255.0, data.gravel().astype(np.float64) / 255.0
    brick.setflags(write=False)
    gravel.setflags(write=False)
    return brick, gravel


@lru_cache(maxsize=1)
def _brick_levels() -> tuple[float, float]:
    """The 1st and 99th percentile grey levels of the brick photograph, the ends of the tint ramp."""
    brick, _ = _textures()
    return float(np.percentile(brick, 1)), float(np.percentile(brick, 99))


def _tint(gray: np.ndarray) -> np.ndarray:
    """(H, W) grey in [0, 1] -> (H, W, 3) brick colours."""
    lo, hi = _brick_levels()
    t = np.clip((gray - lo) / (hi - lo), 0.0, 1.0)
    stops, colours = _BRICK_STOPS
    return np.stack([np.interp(t, stops, [c[k] for c in colours]) for k in range(3)], axis=-1)


def _crop(source: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random IMAGE_SIZE square of ``source`` inside ``rows``, mirrored left-right half the time."""
    y0 = int(rng.integers(rows[0], rows[1] - IMAGE_SIZE + 1))
    x0 = int(rng.integers(0, source.shape[1] - IMAGE_SIZE + 1))
    crop = source[y0 : y0 + IMAGE_SIZE, x0 : x0 + IMAGE_SIZE]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _quantize(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (H, W) of every pixel, as floats."""
    rows, cols = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    return rows, cols


class _Washer:
    """The layers of one washer picture: background (H, W, 3), metal (H, W, 3), coverage alpha (H, W),
    sensor noise (H, W, 3), and the pose needed to place defects on it."""

    def __init__(self, rng: np.random.Generator):
        yy, xx = _grid()
        half = IMAGE_SIZE / 2
        self.cy, self.cx = half + np.clip(rng.normal(0.0, 2.5, 2), -6.0, 6.0)
        self.r_out = 0.31 * IMAGE_SIZE * rng.uniform(0.94, 1.06)
        self.r_in = self.r_out * rng.uniform(0.40, 0.46)
        self.angle, self.ratio = rng.uniform(0.0, np.pi), rng.uniform(0.90, 1.0)
        dx, dy = xx - self.cx, yy - self.cy
        u = dx * np.cos(self.angle) + dy * np.sin(self.angle)
        v = (-dx * np.sin(self.angle) + dy * np.cos(self.angle)) / self.ratio
        r, theta = np.hypot(u, v), np.arctan2(v, u)
        self.alpha = np.clip(self.r_out - r + 0.5, 0.0, 1.0) * np.clip(r - self.r_in + 0.5, 0.0, 1.0)
        # Bevelled profile: the height rises over the inner 18% of the ring and falls over the outer 18%.
        s = np.clip((r - self.r_in) / (self.r_out - self.r_in), 0.0, 1.0)
        bevel = 0.18
        rising, falling = 1.0 - s / bevel, -(1.0 - (1.0 - s) / bevel)
        slope = np.where(s < bevel, rising, np.where(s > 1.0 - bevel, falling, 0.0))
        radial = np.hypot(dx, dy) + 1e-6
        normal = np.stack([-1.2 * slope * dx / radial, -1.2 * slope * dy / radial, np.ones_like(s)])
        normal /= np.linalg.norm(normal, axis=0)
        azimuth = np.deg2rad(225.0 + rng.normal(0.0, 12.0))
        light = np.array([np.cos(azimuth) * 0.6, np.sin(azimuth) * 0.6, 0.8])
        diffuse = np.clip(np.tensordot(light, normal, axes=1), 0.0, 1.0)
        brushed = (0.5 + 0.5 * np.cos(2.0 * (theta - azimuth + self.angle))) ** 4
        rings = 0.025 * np.sin(2.0 * np.pi * r / rng.uniform(1.8, 2.4))
        gain = rng.uniform(0.93, 1.07)
        steel = np.array([0.70, 0.72, 0.76]) * gain
        self.metal = steel * (0.30 + 0.70 * diffuse)[..., None] + (0.22 * brushed + rings)[..., None]
        # Teal cloth with a vignette, a faint weave and the washer's soft shadow away from the light.
        vignette = 1.0 - 0.18 * ((xx - half) ** 2 + (yy - half) ** 2) / half**2
        weave = ndimage.gaussian_filter(rng.normal(size=(IMAGE_SIZE, IMAGE_SIZE)), 1.2)
        weave *= 0.03 / (weave.std() + 1e-9)
        offset = (-3.0 * np.sin(azimuth), -3.0 * np.cos(azimuth))
        shadow = ndimage.gaussian_filter(ndimage.shift(self.alpha, offset, order=1, mode="constant"), 2.5)
        cloth = np.array([0.16, 0.34, 0.30]) * gain
        self.background = cloth * ((vignette + weave) * (1.0 - 0.5 * shadow))[..., None]
        self.noise = rng.normal(0.0, 1.6 / 255.0, (IMAGE_SIZE, IMAGE_SIZE, 3))

    def clean(self, alpha: np.ndarray | None = None) -> np.ndarray:
        """The noise-free composite (H, W, 3) float, with ``alpha`` replacing the washer's coverage."""
        a = (self.alpha if alpha is None else alpha)[..., None]
        return self.background * (1.0 - a) + self.metal * a

    def point(self, radius: float, phi: float) -> tuple[float, float]:
        """Image (y, x) of the point at ``radius`` and angle ``phi`` in the washer's own frame."""
        u, v = radius * np.cos(phi), radius * np.sin(phi) * self.ratio
        x = self.cx + u * np.cos(self.angle) - v * np.sin(self.angle)
        y = self.cy + u * np.sin(self.angle) + v * np.cos(self.angle)
        return float(y), float(x)


def irregular_polygon(center: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """Bool (H, W) mask of a random star-shaped polygon of 7-11 vertices around ``center`` (y, x)."""
    from skimage.draw import polygon

    count = int(rng.integers(7, 12))
    angles = np.sort(rng.uniform(0.0, 2.0 * np.pi, count))
    radii = radius * rng.uniform(0.55, 1.0, count)
    rows, cols = center[0] + radii * np.sin(angles), center[1] + radii * np.cos(angles)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    rr, cc = polygon(rows, cols, shape=mask.shape)
    mask[rr, cc] = True
    return mask


def transplant(
    image: np.ndarray, donor: np.ndarray, center: tuple[float, float], radius: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paste ``donor`` (H, W, 3) into ``image`` (H, W, 3) along an irregular polygon; (image, mask)."""
    mask = irregular_polygon(center, radius, rng)
    return np.where(mask[..., None], donor, image), mask


def smudge(
    image: np.ndarray,
    center: tuple[float, float],
    radius: float,
    colour: tuple[float, float, float],
    rng: np.random.Generator,
    allowed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multiply an ink-like blurred blob of ``colour`` into ``image`` (inside ``allowed``); (image, mask)."""
    yy, xx = _grid()
    field = np.zeros_like(yy)
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = np.asarray(center) + rng.normal(0.0, 0.4 * radius, 2)
        sigma = radius * rng.uniform(0.25, 0.5)
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma**2))
    blob = ndimage.gaussian_filter((field > 0.5).astype(np.float64), rng.uniform(1.2, 2.5))
    streaks = 0.75 + 0.25 * np.tanh(ndimage.gaussian_filter(rng.normal(size=yy.shape), 2.0) * 8.0)
    alpha = np.clip((blob - 0.05) / 0.95, 0.0, 1.0) * streaks * rng.uniform(0.5, 0.8)
    if allowed is not None:
        alpha = alpha * allowed
    alpha[alpha < 0.02] = 0.0
    mask = alpha > 0
    stained = image * (1.0 - alpha[..., None] * (1.0 - np.asarray(colour)))
    return np.where(mask[..., None], stained, image), mask


def local_warp(
    image: np.ndarray,
    center: tuple[float, float],
    radius: float,
    amplitude: float,
    direction: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Displace pixels by up to ``amplitude`` along ``direction`` (dy, dx) inside a random ellipse around
    ``center``; the mask is the filled set of pixels that changed. Returns (image, mask)."""
    yy, xx = _grid()
    tilt, ratio = rng.uniform(0.0, np.pi), rng.uniform(0.6, 1.0)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(tilt) + dy * np.sin(tilt)
    v = (-dx * np.sin(tilt) + dy * np.cos(tilt)) / ratio
    q = (u**2 + v**2) / radius**2
    window = np.where(q < 1.0, (1.0 - q) ** 2, 0.0)
    jitter = ndimage.gaussian_filter(rng.normal(size=(2, *yy.shape)), (0, 4, 4))
    jitter *= 0.35 / (jitter.std() + 1e-9)
    shift = amplitude * window * (np.asarray(direction, dtype=np.float64)[:, None, None] + jitter)
    moved = np.hypot(shift[0], shift[1]) >= 0.3
    shift[:, ~moved] = 0.0
    coords = np.stack([yy - shift[0], xx - shift[1]])
    warped = np.stack(
        [ndimage.map_coordinates(image[..., k], coords, order=1, mode="reflect") for k in range(3)], axis=-1
    )
    changed = moved & (np.abs(warped - image).max(axis=-1) > 1.5 / 255.0)
    mask = ndimage.binary_fill_holes(changed)
    return np.where(mask[..., None], warped, image), mask


def _brick_pair(defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    brick, gravel = _textures()
    gray = _crop(brick, BRICK_TEST_ROWS, rng)
    clean = _tint(gray)
    margin = 20.0
    center = tuple(rng.uniform(margin, IMAGE_SIZE - margin, 2))
    if defect == "contamination":
        stones = _crop(gravel, (0, gravel.shape[0]), rng)
        contrast = rng.uniform(0.8, 1.2)
        matched = (stones - stones.mean()) / (stones.std() + 1e-9) * gray.std() * contrast + gray.mean()
        donor = _tint(np.clip(matched, 0.0, 1.0))
        anomalous, mask = transplant(clean, donor, center, rng.uniform(9, 18), rng)
    elif defect == "deformation":
        phi = rng.uniform(0.0, 2.0 * np.pi)
        direction = (np.sin(phi), np.cos(phi))
        radius, amplitude = rng.uniform(14, 22), rng.uniform(3.0, 5.5)
        anomalous, mask = local_warp(clean, center, radius, amplitude, direction, rng)
    elif defect == "stain":
        anomalous, mask = smudge(clean, center, rng.uniform(6, 12), (0.22, 0.22, 0.32), rng)
    else:
        raise DataError(f"unknown demo defect type {defect!r} for brick")
    return _quantize(clean), _quantize(anomalous), mask


def _washer_pair(defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    washer = _Washer(rng)
    clean = washer.clean()
    phi = rng.uniform(0.0, 2.0 * np.pi)
    if defect == "chip":
        bite = irregular_polygon(washer.point(washer.r_out, phi), rng.uniform(4.0, 8.0), rng)
        mask = bite & (washer.alpha > 0)
        anomalous = washer.clean(np.where(bite, 0.0, washer.alpha))
    elif defect == "deformation":
        rim = washer.point(washer.r_out, phi)
        inward = np.array([washer.cy - rim[0], washer.cx - rim[1]])
        inward /= np.linalg.norm(inward)
        radius, amplitude = rng.uniform(9, 13), rng.uniform(2.5, 4.0)
        anomalous, mask = local_warp(clean, rim, radius, amplitude, (inward[0], inward[1]), rng)
    elif defect == "stain":
        where = washer.point(rng.uniform(washer.r_in + 4.0, washer.r_out - 4.0), phi)
        anomalous, mask = smudge(clean, where, rng.uniform(5, 9), (0.55, 0.45, 0.30), rng, washer.alpha)
    else:
        raise DataError(f"unknown demo defect type {defect!r} for washer")
    return _quantize(clean + washer.noise), _quantize(anomalous + washer.noise), mask


def _rng(category: str, split: int, defect: int, index: int) -> np.random.Generator:
    return np.random.default_rng([SEED, DEMO_CATEGORIES.index(category), split, defect, index])


def demo_normal(category: str, split: str, index: int) -> np.ndarray:
    """Normal image ``index`` (RGB uint8 128x128) of ``split`` ("train" or "test") of a demo category."""
    if category not in DEMO_CATEGORIES or split not in ("train", "test"):
        known = ", ".join(DEMO_CATEGORIES)
        raise DataError(f"no demo normals for {category!r}/{split!r} (categories: {known}; train or test)")
    rng = _rng(category, 0 if split == "train" else 1, 0, index)
    if category == "brick":
        rows = BRICK_TRAIN_ROWS if split == "train" else BRICK_TEST_ROWS
        return _quantize(_tint(_crop(_textures()[0], rows, rng)))
    washer = _Washer(rng)
    return _quantize(washer.clean() + washer.noise)


def demo_pair(category: str, defect_type: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(normal, anomalous, mask) for test anomaly ``index``: the anomalous image differs from the normal
    one (a test-split image) only inside the bool mask, which is never empty."""
    if defect_type not in DEMO_DEFECT_TYPES.get(category, ()):
        raise DataError(f"unknown demo defect {category!r}/{defect_type!r} (known: {DEMO_DEFECT_TYPES})")
    rng = _rng(category, 2, DEMO_DEFECT_TYPES[category].index(defect_type) + 1, index)
    make = _brick_pair if category == "brick" else _washer_pair
    for _ in range(20):  # a warp over flat texture can change nothing; draw again (deterministically)
        normal, anomalous, mask = make(defect_type, rng)
        if mask.sum() >= 12 and np.any(normal != anomalous):
            return normal, anomalous, mask
    raise DataError(f"demo generator made no visible {defect_type} for {category} #{index}")

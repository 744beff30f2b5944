"""Where the object is: foreground from background colour statistics, and placing defects on the object.

Industrial inspection images show either one object on a plain-ish background (MVTec AD objects, VisA) or a
texture that fills the frame (MVTec AD textures). The background's colours are learnt from the image border:
a pixel is background when its Lab colour lies as close to some border colour as border colours lie to each
other (a leave-one-out nearest-neighbour rule, so the tolerance adapts to the background's own noise).
Morphology cleans the result, the largest components are kept and their holes filled. When the border looks
like the inside (a texture), or the foreground would cover nearly nothing or nearly everything, the whole
frame is foreground. Everything here is deterministic.
"""

from __future__ import annotations

import hashlib
import logging

import cv2
import numpy as np
from scipy import ndimage

from kka_synth.synth.base import RenderError, check_image
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)

WORK_SIDE = 128
"""Longest side, in pixels, at which the foreground is estimated (then resized back)."""

BORDER_SAMPLES = 256
"""Border colours kept as the background model."""

MIN_COLOUR_DISTANCE = 6.0
"""Least Lab distance (about twice a just-noticeable difference) that can separate object from background."""

TOLERANCE_FACTOR = 2.5
"""Multiplier on the border's own 99th-percentile nearest-neighbour distance."""

MIN_SHARE, MAX_SHARE = 0.02, 0.92
"""Foreground shares outside this range mean a texture: the whole frame is foreground."""


def _lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 CIE Lab (L in 0..100) of an RGB uint8 image, median-filtered against sensor noise.

    The median keeps the object's outline where it is (a Gaussian would grow the object by its sigma).
    """
    smooth = cv2.medianBlur(image, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(smooth, cv2.COLOR_RGB2Lab)


def _border_colours(lab: np.ndarray) -> np.ndarray:
    """(N, 3) evenly spaced colours from a strip along the image border."""
    height, width = lab.shape[:2]
    strip = max(2, round(0.03 * min(height, width)))
    border = np.ones((height, width), dtype=bool)
    border[strip:-strip, strip:-strip] = False
    colours = lab[border]
    step = max(1, len(colours) // BORDER_SAMPLES)
    return colours[::step][:BORDER_SAMPLES]


def _nearest_distance(points: np.ndarray, references: np.ndarray) -> np.ndarray:
    """(N,) Euclidean distance of each point to its nearest reference."""
    squared = (
        (points**2).sum(axis=1)[:, None] + (references**2).sum(axis=1)[None, :] - 2.0 * points @ references.T
    )
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _clean(raw: np.ndarray) -> np.ndarray:
    """Open away specks, close small gaps, keep the largest components and fill their holes."""
    side = min(raw.shape)
    mask = raw.astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(max(1, round(side / 100))))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disc(max(1, round(side / 50))))
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(raw.shape, dtype=bool)
    areas = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
    keep = np.flatnonzero(areas >= max(0.1 * areas.max(), 0.002 * raw.size)) + 1
    return ndimage.binary_fill_holes(np.isin(labels, keep))


def estimate_foreground(image: np.ndarray) -> np.ndarray:
    """The object's foreground as a bool (H, W) mask; all True for a texture.

    The image border is taken as background. See the module docstring for the rule.
    """
    image = check_image(image)
    height, width = image.shape[:2]
    scale = min(1.0, WORK_SIDE / max(height, width))
    small = image
    if scale < 1.0:
        size = (max(8, round(width * scale)), max(8, round(height * scale)))
        small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    lab = _lab(small)
    border = _border_colours(lab)
    # Leave-one-out nearest-neighbour distances among border colours measure the background's spread.
    squared = ((border[:, None, :] - border[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(squared, np.inf)
    spread = np.sqrt(squared.min(axis=1))
    tolerance = max(TOLERANCE_FACTOR * float(np.quantile(spread, 0.99)), MIN_COLOUR_DISTANCE)
    distance = _nearest_distance(lab.reshape(-1, 3), border).reshape(lab.shape[:2])
    mask = _clean(distance > tolerance)
    share = float(mask.mean())
    if not MIN_SHARE <= share <= MAX_SHARE:
        logger.debug(
            "foreground share %.3f is outside [%s, %s]: treating the image as a texture",
            share,
            MIN_SHARE,
            MAX_SHARE,
        )
        return np.ones((height, width), dtype=bool)
    if scale < 1.0:
        mask = cv2.resize(mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
    return mask


class ForegroundCache:
    """:func:`estimate_foreground` remembered for the last ``size`` distinct images (keyed by their bytes).

    The loop renders many specs on the same normal images; this keeps the estimate from being redone.
    """

    def __init__(self, size: int = 64):
        if size < 1:
            raise ValueError(f"ForegroundCache size must be positive, got {size}")
        self.size = size
        self._masks: dict[bytes, np.ndarray] = {}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = check_image(image)
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + repr(image.shape).encode()
        if key not in self._masks:
            if len(self._masks) >= self.size:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = estimate_foreground(image)
        return self._masks[key]


def foreground_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The pixel bounding box (x0, y0, x1, y1) of a bool mask; x1 and y1 are exclusive (slice ends)."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 2:
        raise RenderError("bad_mask", f"mask must be a 2-D array, got {getattr(mask, 'shape', type(mask))}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        raise RenderError("no_foreground", "the foreground mask is empty")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def region_pixel_box(
    object_box: tuple[int, int, int, int], region: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    """Map a normalised region (x0, y0, x1, y1) on the object's box to pixels (x0, y0, x1, y1), ends excluded.

    The result is at least one pixel wide and high and never leaves the object's box.
    """
    bx0, by0, bx1, by1 = object_box
    width, height = bx1 - bx0, by1 - by0
    x0 = bx0 + int(np.floor(region[0] * width))
    y0 = by0 + int(np.floor(region[1] * height))
    x1 = bx0 + int(np.ceil(region[2] * width))
    y1 = by0 + int(np.ceil(region[3] * height))
    x0, y0 = min(x0, bx1 - 1), min(y0, by1 - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A bool (H, W) mask that is True inside the pixel box (x0, y0, x1, y1), ends exclusive."""
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def allowed_area(foreground: np.ndarray, spec: DefectSpec) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The pixels a defect may touch: the foreground inside the spec's region box on the object.

    Returns the bool (H, W) mask and the region's pixel box. Raises ``RenderError("no_foreground")`` when the
    region holds no foreground pixel.
    """
    region = region_pixel_box(foreground_box(foreground), spec.region)
    allowed = foreground & box_mask(foreground.shape, region)
    if not allowed.any():
        raise RenderError("no_foreground", f"region {spec.region} holds no foreground pixel")
    return allowed, region


def pick_centre(
    allowed: np.ndarray, radius: float, rng: np.random.Generator, candidates: np.ndarray | None = None
) -> tuple[float, float]:
    """Pick a defect centre (x, y) among allowed pixels, preferring those with ``radius`` pixels of room.

    ``candidates`` (bool (H, W)) restricts the choice further, e.g. to the object's outline; when it holds no
    allowed pixel the choice falls back to all allowed pixels.
    """
    room = ndimage.distance_transform_edt(allowed)
    pool = allowed if candidates is None or not (candidates & allowed).any() else candidates & allowed
    ys, xs = np.nonzero(pool)
    weights = np.minimum(room[ys, xs], max(radius, 1.0)) ** 2 + 1e-3
    index = rng.choice(len(ys), p=weights / weights.sum())
    return float(xs[index]), float(ys[index])

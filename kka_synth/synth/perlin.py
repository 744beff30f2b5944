"""Perlin-noise defects with texture blending, after DRAEM (Zavrtanik, Kristan and Skočaj, "DRAEM - A
discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021).

DRAEM thresholds a rotated Perlin noise field to get an irregular mask, takes an anomaly source texture (a
DTD image passed through three random augmentations) and pastes it into the mask with opacity ``beta``.
Here the source is one of scikit-image's bundled CC0 textures (brick, grass, gravel), colour-tinted, or the
image itself cut into tiles and shuffled; three of the operations in :data:`AUGMENTATIONS` are applied.

The spec steers the render:

- region: the noise lives on the spec's region box on the object, on a window of about four times the
  defect's area inside it (so a small defect is one local cluster), and the mask is kept on the foreground;
- size: the noise threshold is the quantile that makes the mask cover ``spec.size`` of the object (DRAEM
  uses a fixed 0.5);
- severity: the opacity is ``beta = 0.1 + 0.88 * severity``, in [0.1, 1.0);
- tone: the source is shifted darker, brighter or to another hue than the image under the mask.

``spec.shape`` has no meaning for a noise mask and is ignored.

The Perlin noise generator is written here in numpy, vectorised over pixels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import cv2
import numpy as np

from kka_synth.synth.base import RenderError, check_inputs, finish
from kka_synth.synth.foreground import ForegroundCache, allowed_area, pick_centre
from kka_synth.types import REGIONS, SHAPES, TONES, DefectSpec

logger = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel")
"""scikit-image textures usable as anomaly sources (bundled with its wheel, no download)."""


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], scale: tuple[float, float], rng: np.random.Generator, angle: float = 0.0
) -> np.ndarray:
    """Gradient (Perlin) noise of ``shape`` (H, W) as float32 in [-1, 1].

    ``scale`` is the number of lattice cells across the image along (y, x); ``angle`` (radians) rotates the
    lattice about the image centre. Any image size works, the lattice need not divide it.
    """
    height, width = shape
    if height < 1 or width < 1 or min(scale) <= 0:
        raise ValueError(f"perlin_noise needs a positive shape and scale, got {shape} and {scale}")
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ys, xs = ys - (height - 1) / 2.0, xs - (width - 1) / 2.0
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u = (cos * xs - sin * ys) * np.float32(scale[1] / width)  # (H, W) lattice coordinates
    v = (sin * xs + cos * ys) * np.float32(scale[0] / height)
    u0, v0 = np.floor(u), np.floor(v)
    ox, oy = int(u0.min()), int(v0.min())
    cells_x, cells_y = int(u0.max()) - ox + 2, int(v0.max()) - oy + 2
    theta = rng.uniform(0.0, 2.0 * np.pi, size=cells_y * cells_x)
    grad_x, grad_y = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)  # (cells,)
    cell = (v0 - oy).astype(np.int64) * cells_x + (u0 - ox).astype(np.int64)  # (H, W) flat lattice index
    fu, fv = u - u0, v - v0

    def corner(dy: int, dx: int) -> np.ndarray:
        index = cell + (dy * cells_x + dx)
        return grad_x.take(index) * (fu - dx) + grad_y.take(index) * (fv - dy)

    wu, wv = _fade(fu), _fade(fv)
    top_left, bottom_left = corner(0, 0), corner(1, 0)
    top = top_left + wu * (corner(0, 1) - top_left)
    bottom = bottom_left + wu * (corner(1, 1) - bottom_left)
    noise = (top + wv * (bottom - top)) * np.float32(np.sqrt(2.0))
    return np.clip(noise, -1.0, 1.0).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int],
    scale: tuple[float, float],
    rng: np.random.Generator,
    octaves: int = 3,
    persistence: float = 0.5,
    angle: float = 0.0,
) -> np.ndarray:
    """``octaves`` Perlin layers summed, each twice as fine and ``persistence`` times as strong; [-1, 1]."""
    total = np.zeros(shape, dtype=np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        factor = 2.0**octave
        total += amplitude * perlin_noise(shape, (scale[0] * factor, scale[1] * factor), rng, angle)
        norm += amplitude
        amplitude *= persistence
    return total / norm


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


@functools.lru_cache(maxsize=len(TEXTURES))
def load_texture(name: str) -> np.ndarray:
    """One of :data:`TEXTURES` as an RGB uint8 array, read from scikit-image's bundled data."""
    if name not in TEXTURES:
        raise RenderError("bad_texture", f"texture must be one of {', '.join(TEXTURES)}, got {name!r}")
    from skimage import data

    image = getattr(data, name)()
    return _gray_to_rgb(image) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])


def _lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(image, np.clip(table, 0, 255).astype(np.uint8))


def _gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    gamma = rng.uniform(0.5, 2.0)
    return _lut(image, 255.0 * (np.arange(256) / 255.0) ** gamma)


def _multiply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image * rng.uniform(0.8, 1.2, size=3), 0, 255).astype(np.uint8)


def _add(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image.astype(np.int16) + int(rng.integers(-30, 31)), 0, 255).astype(np.uint8)


def _sharpen(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    blurred = cv2.GaussianBlur(image, (0, 0), 1.0)
    return cv2.addWeighted(image, 1.0 + rng.uniform(0.5, 1.5), blurred, -rng.uniform(0.5, 1.5), 0)


def _hue(image: np.ndarray, rng: np.random.Generator, shift: float | None = None) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(shift if shift is not None else rng.integers(-25, 26))) % 180
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def _solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    threshold = int(rng.integers(32, 129))
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = int(rng.integers(3, 6))
    return (image & np.uint8((0xFF << (8 - bits)) & 0xFF)).astype(np.uint8)


def _invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (255 - image).astype(np.uint8)


def _autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low, high = np.percentile(image, (1, 99))
    return _lut(image, (np.arange(256) - low) * 255.0 / max(high - low, 1.0))


def _equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(image[..., c])) for c in range(3)], axis=-1)


def _rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), rng.uniform(-45, 45), 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)


AUGMENTATIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gamma": _gamma,
    "multiply": _multiply,
    "add": _add,
    "sharpen": _sharpen,
    "hue": _hue,
    "solarize": _solarize,
    "posterize": _posterize,
    "invert": _invert,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "rotate": _rotate,
}
"""DRAEM's source augmentations; three distinct ones are applied to every anomaly source."""


def _texture_source(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random crop of a bundled texture, resized to ``shape`` and tinted with a random colour."""
    texture = load_texture(TEXTURES[int(rng.integers(len(TEXTURES)))])
    side = int(rng.integers(min(texture.shape[:2]) // 4, min(texture.shape[:2]) + 1))
    y0 = int(rng.integers(0, texture.shape[0] - side + 1))
    x0 = int(rng.integers(0, texture.shape[1] - side + 1))
    crop = cv2.resize(texture[y0 : y0 + side, x0 : x0 + side], shape[::-1], interpolation=cv2.INTER_AREA)
    crop = np.rot90(crop, int(rng.integers(4))) if shape[0] == shape[1] else crop
    tint = rng.uniform(0.55, 1.2, size=3)
    return np.clip(crop * tint, 0, 255).astype(np.uint8)


def _shuffled_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image cut into a grid of tiles that are shuffled and flipped (a self-similar anomaly source)."""
    height, width = image.shape[:2]
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    ys = np.linspace(0, height, rows + 1).astype(int)
    xs = np.linspace(0, width, cols + 1).astype(int)
    tiles = [image[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] for r in range(rows) for c in range(cols)]
    order = rng.permutation(len(tiles))
    out = np.empty_like(image)
    for index, (r, c) in enumerate((r, c) for r in range(rows) for c in range(cols)):
        tile = tiles[order[index]]
        tile = tile[::-1] if rng.random() < 0.5 else tile
        tile = tile[:, ::-1] if rng.random() < 0.5 else tile
        h, w = ys[r + 1] - ys[r], xs[c + 1] - xs[c]
        out[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = cv2.resize(np.ascontiguousarray(tile), (w, h))
    return out


def _luminance(image: np.ndarray, mask: np.ndarray) -> float:
    return float(image[mask].astype(np.float32).mean())


def _apply_tone(
    source: np.ndarray, image: np.ndarray, mask: np.ndarray, tone: str, rng: np.random.Generator
) -> np.ndarray:
    """Shift the source so that it is darker, brighter or of another hue than the image under the mask."""
    base, current = _luminance(image, mask), max(_luminance(source, mask), 1.0)
    if tone == "darker":
        goal = 0.7 * base
        return source if current <= goal else np.clip(source * (goal / current), 0, 255).astype(np.uint8)
    if tone == "brighter":
        goal = min(250.0, 1.25 * base + 10.0)
        if current >= goal:
            return source
        lifted = 255.0 - (255.0 - source.astype(np.float32)) * (255.0 - goal) / max(255.0 - current, 1.0)
        return np.clip(lifted, 0, 255).astype(np.uint8)
    shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(20, 45))
    hsv = cv2.cvtColor(_hue(source, rng, shift), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(np.maximum(hsv[..., 1] * 1.6, 90.0), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


class PerlinRenderer:
    """DRAEM-style defects: a thresholded Perlin mask filled with an augmented texture at opacity ``beta``."""

    name = "perlin"

    def __init__(
        self, sources: tuple[str, ...] = ("texture", "self"), max_scale_power: int = 6, cache_size: int = 64
    ):
        unknown = sorted(set(sources) - {"texture", "self"})
        if not sources or unknown:
            raise ValueError(f"PerlinRenderer sources must be among texture, self; got {sources!r}")
        if not 0 <= max_scale_power <= 8:
            raise ValueError(f"PerlinRenderer max_scale_power must be in [0, 8], got {max_scale_power}")
        self.sources = tuple(sources)
        self.max_scale_power = max_scale_power
        self.foreground = ForegroundCache(cache_size)

    @staticmethod
    def _window(
        allowed: np.ndarray, region: tuple[int, int, int, int], target: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        """A box inside the region where the noise lives: about four times the target's area around a centre
        on the allowed pixels, so a small defect is one local cluster instead of specks over the whole region.
        The whole region when the box would hold fewer than twice the target's allowed pixels.
        """
        half = max(4.0, float(np.sqrt(4.0 * target)) / 2.0)
        cx, cy = pick_centre(allowed, half, rng)
        x0, y0, x1, y1 = region
        box = (
            max(x0, int(cx - half)),
            max(y0, int(cy - half)),
            min(x1, int(cx + half) + 1),
            min(y1, int(cy + half) + 1),
        )
        if allowed[box[1] : box[3], box[0] : box[2]].sum() < 2 * target:
            return region
        return box

    @staticmethod
    def beta(severity: float) -> float:
        """The source's opacity for a severity in [0, 1]: 0.1 at 0, 0.98 at 1."""
        return 0.1 + 0.88 * float(severity)

    def render(
        self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        image = check_inputs(image, spec, rng)
        foreground = self.foreground(image)
        allowed, (x0, y0, x1, y1) = allowed_area(foreground, spec)
        target = max(1, round(spec.size * foreground.sum()))
        mask_rng, source_rng = (np.random.default_rng(seed) for seed in rng.integers(0, 2**63 - 1, size=2))

        x0, y0, x1, y1 = self._window(allowed, (x0, y0, x1, y1), target, mask_rng)
        # DRAEM draws 2**k lattice cells, k < 6, on 256-pixel images; cells never get smaller than 8 pixels.
        finest = int(np.floor(np.log2(max(min(x1 - x0, y1 - y0), 8) / 8.0)))
        scale = 2.0 ** mask_rng.integers(0, min(self.max_scale_power, finest) + 1, size=2)
        angle = mask_rng.uniform(-np.pi / 2, np.pi / 2)
        noise = np.full(image.shape[:2], -np.inf, dtype=np.float32)
        field = perlin_noise((y1 - y0, x1 - x0), (float(scale[0]), float(scale[1])), mask_rng, angle)
        # A bump toward the window's centre keeps the thresholded noise off the window's straight edges.
        ys, xs = np.mgrid[-1.0 : 1.0 : (y1 - y0) * 1j, -1.0 : 1.0 : (x1 - x0) * 1j]
        noise[y0:y1, x0:x1] = field + 0.5 * (1.0 - (xs**2 + ys**2))
        values = noise[allowed & np.isfinite(noise)]
        count = min(target, len(values))
        level = np.partition(values, len(values) - count)[len(values) - count]
        mask = allowed & (noise >= level)

        kind = self.sources[int(source_rng.integers(len(self.sources)))]
        source = (
            _texture_source(image.shape[:2], source_rng)
            if kind == "texture"
            else _shuffled_source(image, source_rng)
        )
        names = list(AUGMENTATIONS)
        for index in source_rng.choice(len(names), size=3, replace=False):
            source = AUGMENTATIONS[names[index]](source, source_rng)
        if mask.any():
            source = _apply_tone(source, image, mask, spec.tone, source_rng)
        beta = self.beta(spec.severity)
        logger.debug("perlin render: scale %s, angle %.2f, source %s, beta %.2f", scale, angle, kind, beta)
        blended = image.astype(np.float32) * (1.0 - beta) + source.astype(np.float32) * beta
        return finish(image, blended, mask)


def random_spec(category: str, defect_types: list[str], rng: np.random.Generator) -> DefectSpec:
    """A random spec for rule-based anomalies: any region, a small to medium size, any tone and a visible
    severity."""
    return DefectSpec(
        category=category,
        defect_type=str(rng.choice(defect_types)),
        description="",
        region=REGIONS[str(rng.choice(list(REGIONS)))],
        size=float(rng.choice([0.01, 0.02, 0.05, 0.1])),
        shape=str(rng.choice(SHAPES)),
        tone=str(rng.choice(TONES)),
        severity=float(rng.uniform(0.3, 1.0)),
    )


class PerlinAnomalies:
    """Rule-based anomalies drawn on the fly: ``draw(normal, rng) -> (image, mask)`` puts a Perlin defect
    from a random spec on a normal image, as DRAEM does at every training step."""

    def __init__(
        self,
        category: str,
        defect_types: list[str] | None = None,
        renderer: PerlinRenderer | None = None,
        attempts: int = 4,
    ):
        self.category = category
        self.defect_types = list(defect_types or ["defect"])
        self.renderer = renderer or PerlinRenderer()
        self.attempts = attempts

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        for _ in range(self.attempts):
            spec = random_spec(self.category, self.defect_types, rng)
            try:
                result, mask = self.renderer.render(image, spec, rng)
            except RenderError:
                continue
            if mask.any():
                return result, mask
        raise RenderError(
            "no_fit", f"no Perlin anomaly fits this {self.category} image in {self.attempts} attempts"
        )

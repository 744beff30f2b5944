"""Spec-driven procedural defects: scratches, cracks, blobs, spots, holes, stains and missing chunks.

This is the offline renderer of the KKA loop ("Improving Vision Anomaly Detection through Anomaly-related
Knowledge from LLMs", arXiv 2502.14880), standing in for its text-to-image step: every field
of a :class:`~kka_synth.types.DefectSpec` changes the render, so the proposer's choices matter to the
evaluator.

- ``region``: the defect's centre is drawn inside the region box on the object's bounding box, and the mask
  is kept on the foreground inside that box.
- ``size``: the mask covers ``size`` times the object's foreground area (capped by the area available).
- ``shape``: the geometry (:mod:`kka_synth.synth.shapes`) and the shading profile.
- ``tone``: darker (multiplicative shadow), brighter (screen-like lift) or colour (a chroma shift in Lab). A
  hole is a dark cavity with a lit rim; with tone brighter it is backlit, with colour its floor is tinted.
- ``severity``: the contrast of the change, from barely visible at 0.05 to obvious at 1.
- ``defect_type`` and ``description``: words such as thin, wide, long, several, rust or blue pick the
  stroke width, the length, the number of spots and the hue.

The change is blended through a soft alpha and shaded, not painted flat: it modulates the underlying texture,
adds fine grain, and lights one side of the outline. The mask is the defect's support (the alpha's threshold
set); every pixel outside it is left bit-identical.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from kka_synth.synth.base import RenderError, check_inputs, finish, smoothstep
from kka_synth.synth.foreground import ForegroundCache, allowed_area, pick_centre
from kka_synth.synth.perlin import fractal_noise
from kka_synth.synth.shapes import crack_path, level_for_area, radial_field, scratch_path, stroke_field
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)

HUES = {
    "rust": 60.0,
    "corros": 60.0,
    "oxid": 55.0,
    "orange": 60.0,
    "brown": 70.0,
    "burn": 70.0,
    "scorch": 70.0,
    "red": 35.0,
    "yellow": 95.0,
    "oil": 95.0,
    "green": 150.0,
    "blue": 285.0,
    "purple": 320.0,
    "violet": 320.0,
    "pink": 350.0,
}
"""Words that fix a colour defect's hue (angle in the Lab a-b plane, degrees)."""

THIN_WORDS = ("thin", "fine", "hairline", "narrow", "slight")
WIDE_WORDS = ("wide", "thick", "broad", "deep", "heavy", "gouge")
LONG_WORDS = ("long", "elongated", "extended", "across")
MANY_WORDS = ("several", "multiple", "many", "cluster", "scattered", "speckle", "dots")
SINGLE_WORDS = ("single", "isolated", "lone", "one ")
DARK_WORDS = ("burn", "scorch", "soot", "char")


@dataclass(frozen=True)
class Hints:
    """What the free text of a spec says about the render."""

    width: float = 1.0
    """Multiplier on a stroke's nominal width."""
    length: float = 1.0
    """Multiplier on a stroke's length (the width shrinks to keep the area)."""
    spots: tuple[int, int] = (1, 4)
    """Range [low, high) of the number of spots."""
    hue: float | None = None
    """Lab hue angle in degrees for colour defects; None draws one."""
    darken: float = 0.2
    """Lightness lost by a colour defect at full strength."""


def read_hints(spec: DefectSpec) -> Hints:
    """Turn the defect type and description into :class:`Hints`."""
    text = f" {spec.defect_type} {spec.description} ".lower().replace("_", " ")
    width = 0.6 if any(w in text for w in THIN_WORDS) else 1.8 if any(w in text for w in WIDE_WORDS) else 1.0
    length = 1.5 if any(w in text for w in LONG_WORDS) else 1.0
    spots = (
        (3, 7)
        if any(w in text for w in MANY_WORDS)
        else (1, 2)
        if any(w in text for w in SINGLE_WORDS)
        else (1, 4)
    )
    hue = next((angle for word, angle in HUES.items() if word in text), None)
    darken = 0.45 if any(w in text for w in DARK_WORDS) else 0.2
    return Hints(width=width, length=length, spots=spots, hue=hue, darken=darken)


def strength(severity: float) -> float:
    """Fractional change at the defect's core for a severity in [0, 1]: 0.03 at 0, 0.8 at 1."""
    return 0.03 + 0.77 * float(severity)


@dataclass
class Geometry:
    """Where a defect is and how strongly each of its pixels changes."""

    mask: np.ndarray
    """bool (H, W): the defect's support."""
    alpha: np.ndarray
    """float32 (H, W): blending weight, positive on the mask, zero elsewhere."""
    depth: np.ndarray
    """float32 (H, W): the shape's profile (1 at the core), e.g. a V across a scratch."""
    field: np.ndarray
    """float32 (H, W): the shape's distance-like field; the mask is ``field <= level`` on allowed pixels."""
    level: float
    centre: tuple[float, float]
    """(x, y) of the defect's centre (the largest spot's, for spots)."""


def _soft(field: np.ndarray, level: float, edge: float, mask: np.ndarray) -> np.ndarray:
    """Alpha rising from about 0.16 on the outline to 1 at ``0.75 * edge`` inside it; zero off the mask."""
    return (smoothstep(0.25 + (level - field) / max(edge, 1e-3)) * mask).astype(np.float32)


def apply_tone(image: np.ndarray, amount: np.ndarray, tone: str, hints: Hints, hue: float) -> np.ndarray:
    """Move a float RGB image (H, W, 3) by ``amount`` (H, W) in [0, 1] toward the tone, keeping texture."""
    a = amount[..., None]
    if tone == "darker":
        return image * (1.0 - a) - 12.0 * a
    if tone == "brighter":
        return image + (255.0 - image) * a
    lab = cv2.cvtColor(np.clip(image / 255.0, 0.0, 1.0).astype(np.float32), cv2.COLOR_RGB2Lab)
    lab[..., 0] *= 1.0 - hints.darken * amount
    lab[..., 1] += amount * 70.0 * np.cos(np.radians(hue))
    lab[..., 2] += amount * 70.0 * np.sin(np.radians(hue))
    return cv2.cvtColor(lab, cv2.COLOR_Lab2RGB) * 255.0


class ProceduralRenderer:
    """Renders every :data:`~kka_synth.types.SHAPES` entry, steered by all fields of the spec."""

    name = "procedural"

    def __init__(self, cache_size: int = 64):
        self.foreground = ForegroundCache(cache_size)

    def render(
        self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        image = check_inputs(image, spec, rng)
        geometry_rng, look_rng = (np.random.default_rng(seed) for seed in rng.integers(0, 2**63 - 1, size=2))
        foreground, geometry = self.place(image, spec, geometry_rng)
        scale = max(0.5, min(image.shape[:2]) / 128.0)
        out = self._shade(
            image.astype(np.float32), foreground, geometry, spec, read_hints(spec), look_rng, scale
        )
        return finish(image, out, geometry.mask)

    def place(
        self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator
    ) -> tuple[np.ndarray, Geometry]:
        """Where the spec's defect goes and what shape it has, without drawing it.

        Returns the image's bool (H, W) foreground and the :class:`Geometry`: the mask lies on the foreground
        inside the spec's region, covers about ``size`` of the foreground, and takes the spec's shape (a thin
        stroke for a scratch, a blob for a stain). Diffusion renderers use it as the region to repaint.
        Raises ``RenderError`` when the region holds no foreground or the shape covers no pixel.
        """
        image = check_inputs(image, spec, rng)
        foreground = self.foreground(image)
        allowed, region = allowed_area(foreground, spec)
        target = spec.size * float(foreground.sum())
        if target > allowed.sum():
            logger.debug(
                "size %.4f asks for %d pixels but the region offers %d", spec.size, target, allowed.sum()
            )
        hints = read_hints(spec)
        scale = max(0.5, min(image.shape[:2]) / 128.0)
        if spec.shape in ("scratch", "crack"):
            geometry = self._stroke(spec.shape, allowed, region, target, hints, rng, scale)
        elif spec.shape == "spot":
            geometry = self._spots(allowed, target, hints, rng, scale)
        else:
            outline = None
            if spec.shape == "missing" and not foreground.all():
                outline = foreground & ~cv2.erode(
                    foreground.astype(np.uint8), np.ones((3, 3), np.uint8)
                ).astype(bool)
            geometry = self._radial(spec.shape, allowed, target, rng, scale, outline)
        if not geometry.mask.any():
            raise RenderError("empty_mask", f"the {spec.shape} covers no pixel of region {spec.region}")
        return foreground, geometry

    def _stroke(
        self,
        shape: str,
        allowed: np.ndarray,
        region: tuple[int, int, int, int],
        target: float,
        hints: Hints,
        rng: np.random.Generator,
        scale: float,
    ) -> Geometry:
        half = max(0.5, (0.7 if shape == "scratch" else 0.6) * scale * hints.width)
        diagonal = float(np.hypot(region[2] - region[0], region[3] - region[1]))
        length = max(target / (2.0 * half) * hints.length, 3.0)
        if shape == "scratch":
            # More area than one thin scratch across the region can hold becomes a few scratches (abrasion).
            count = int(np.clip(np.ceil(length / diagonal), 1, 5))
            length = min(length / count, diagonal)
            centre = pick_centre(allowed, 3.0 * half, rng)
            paths = [scratch_path(centre, length, rng, allowed)]
            for _ in range(count - 1):
                paths.append(scratch_path(pick_centre(allowed, 3.0 * half, rng), length, rng, allowed))
            segments = (np.concatenate([p[0] for p in paths]), np.concatenate([p[1] for p in paths]))
        else:
            length = min(length, 2.0 * diagonal)
            centre = pick_centre(allowed, 3.0 * half, rng)
            segments = crack_path(centre, length, rng)
        field = stroke_field(allowed.shape, segments, reach=max(6.0 * half, 2.0 * target / length) + 3.0)
        level = max(level_for_area(field, allowed, target), 0.5)
        mask = allowed & (field <= level)
        depth = 1.0 - (0.45 if shape == "scratch" else 0.3) * np.clip(field / level, 0.0, 1.0)
        edge = max(1.0, 0.6 * level)
        return Geometry(mask, _soft(field, level, edge, mask), depth.astype(np.float32), field, level, centre)

    def _spots(
        self, allowed: np.ndarray, target: float, hints: Hints, rng: np.random.Generator, scale: float
    ) -> Geometry:
        count = int(rng.integers(*hints.spots))
        shares = rng.dirichlet(np.full(count, 2.0))
        relative = np.sqrt(shares / shares.max())
        field = np.full(allowed.shape, np.inf, dtype=np.float32)
        centre = (0.0, 0.0)
        for index, (share, size) in enumerate(zip(shares, relative, strict=True)):
            spot_centre = pick_centre(allowed, float(np.sqrt(target * share / np.pi)), rng)
            centre = spot_centre if index == int(np.argmax(shares)) else centre
            spot = radial_field(allowed.shape, spot_centre, rng, irregularity=0.1, max_elongation=1.4)
            field = np.minimum(field, spot / max(size, 1e-3))
        level = level_for_area(field, allowed, target)
        mask = allowed & (field <= level)
        depth = 1.0 - 0.5 * np.clip(field / max(level, 1e-3), 0.0, 1.0) ** 2
        edge = max(1.0 * scale, 0.5 * level)
        return Geometry(mask, _soft(field, level, edge, mask), depth.astype(np.float32), field, level, centre)

    def _radial(
        self,
        shape: str,
        allowed: np.ndarray,
        target: float,
        rng: np.random.Generator,
        scale: float,
        outline: np.ndarray | None,
    ) -> Geometry:
        irregularity, elongation, roughness = {
            "blob": (0.45, 2.2, 0.08),
            "stain": (0.35, 1.8, 0.25),
            "hole": (0.05, 1.25, 0.0),
            "missing": (0.4, 1.6, 0.15),
        }[shape]
        radius = float(np.sqrt(max(target, 1.0) / np.pi))
        centre = pick_centre(allowed, radius, rng, candidates=outline)
        field = radial_field(allowed.shape, centre, rng, irregularity, elongation, roughness, radius)
        level = level_for_area(field, allowed, target)
        mask = allowed & (field <= level)
        ratio = np.clip(field / max(level, 1e-3), 0.0, 1.0)
        if shape == "stain":
            depth = 0.6 + 0.4 * np.exp(-(((ratio - 0.85) / 0.15) ** 2))
            edge = max(1.5 * scale, 0.6 * level)
        else:
            depth = np.ones_like(field)
            edge = {"blob": 1.2, "hole": 1.0, "missing": 0.8}[shape] * scale
        return Geometry(mask, _soft(field, level, edge, mask), depth.astype(np.float32), field, level, centre)

    def _shade(
        self,
        image: np.ndarray,
        foreground: np.ndarray,
        geometry: Geometry,
        spec: DefectSpec,
        hints: Hints,
        rng: np.random.Generator,
        scale: float,
    ) -> np.ndarray:
        """The float RGB render: toned, textured, grained and lit from one side."""
        height, width = image.shape[:2]
        k = strength(spec.severity)
        light = rng.uniform(0.0, 2.0 * np.pi)
        hue = hints.hue if hints.hue is not None else float(rng.uniform(0.0, 360.0))
        grain = rng.normal(0.0, 1.0, size=(height, width)).astype(np.float32)
        alpha, mask = geometry.alpha, geometry.mask
        gy, gx = np.gradient(cv2.GaussianBlur(alpha, (0, 0), 0.8))
        rim = gx * np.cos(light) + gy * np.sin(light)
        rim = rim / max(float(np.abs(rim).max()), 1e-6)

        if spec.shape == "hole":
            out = self._hole(image, geometry, spec, hints, hue, light, k)
        elif spec.shape == "missing":
            out = self._missing(image, foreground, geometry, spec, hints, hue, rng, scale)
        else:
            weight = alpha * geometry.depth
            if spec.shape in ("blob", "stain"):
                cells = max(2.0, width / (12.0 * scale))
                weight = weight * (
                    0.75 + 0.25 * fractal_noise((height, width), (cells, cells), rng, octaves=2)
                )
            out = apply_tone(image, np.clip(k * weight, 0.0, 1.0), spec.tone, hints, hue)
        shading = (5.0 * grain * alpha + 25.0 * rim) * k
        return out + (shading * mask)[..., None]

    def _hole(
        self,
        image: np.ndarray,
        geometry: Geometry,
        spec: DefectSpec,
        hints: Hints,
        hue: float,
        light: float,
        k: float,
    ) -> np.ndarray:
        """A round cavity: a deep interior shaded across its wall, and a rim that catches the light."""
        height, width = image.shape[:2]
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        level, field = max(geometry.level, 1e-3), geometry.field
        toward = (
            (xs - geometry.centre[0]) * np.cos(light) + (ys - geometry.centre[1]) * np.sin(light)
        ) / level
        toward = np.clip(toward, -1.0, 1.0)
        inner = smoothstep(0.5 + (0.75 * level - field)) * geometry.mask
        depth = min(1.0, 0.15 + 0.8 * spec.severity) * inner * (0.75 + 0.25 * toward)
        out = apply_tone(image, np.clip(depth, 0.0, 1.0).astype(np.float32), spec.tone, hints, hue)
        ring = np.exp(-((((field / level) - 0.87) / 0.09) ** 2)) * geometry.mask
        lip = ring * (70.0 * (0.3 + 0.7 * np.maximum(toward, 0.0)) - 25.0 * np.maximum(-toward, 0.0)) * k
        return out + lip[..., None]

    def _missing(
        self,
        image: np.ndarray,
        foreground: np.ndarray,
        geometry: Geometry,
        spec: DefectSpec,
        hints: Hints,
        hue: float,
        rng: np.random.Generator,
        scale: float,
    ) -> np.ndarray:
        """A chunk replaced by the background (or, on a texture, by a smooth recessed surface)."""
        height, width = image.shape[:2]
        noise = rng.normal(0.0, 1.0, size=(height, width, 3)).astype(np.float32)
        if foreground.all():
            smooth = cv2.GaussianBlur(image, (0, 0), 3.0 * scale)
            fill = apply_tone(smooth, np.full((height, width), 0.45, np.float32), spec.tone, hints, hue)
            fill = fill + 3.0 * noise
        else:
            background = image[~foreground]
            colour = np.median(background, axis=0)
            spread = np.clip(background.std(axis=0), 0.0, 12.0)
            fill = colour + cv2.GaussianBlur(noise, (0, 0), 0.7) * spread
        opacity = 0.1 + 0.9 * spec.severity
        weight = (geometry.alpha * opacity)[..., None]
        out = image * (1.0 - weight) + fill * weight
        remaining = (foreground & ~geometry.mask).astype(np.uint8)
        band = geometry.mask & cv2.dilate(remaining, np.ones((3, 3), np.uint8)).astype(bool)
        edge = np.clip(0.5 * strength(spec.severity) * band, 0.0, 1.0).astype(np.float32)
        return apply_tone(out, edge, spec.tone, hints, hue)

"""Defect geometry for the procedural renderer: distance-like fields whose sublevel sets are the defect.

Every shape is a float field over the image, in about pixel units, that grows away from the defect's core:
the distance to a stroke's centre line (scratches, cracks) or an irregular radial distance from a centre
(blobs, stains, spots, holes, missing chunks). The defect is the set ``field <= level``; picking ``level`` as
the right order statistic of the field over the allowed pixels makes the defect cover a requested number of
pixels exactly (:func:`level_for_area`), whatever the shape.

The shapes are those of :data:`kka_synth.types.SHAPES`, rendered for the offline step of the KKA loop
("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880).
"""

from __future__ import annotations

import numpy as np

from kka_synth.synth.perlin import fractal_noise

Segments = tuple[np.ndarray, np.ndarray]
"""A polyline as (points (N, 2, 2) of segment ends in (x, y), widths (N, 2) relative width at each end)."""


def level_for_area(field: np.ndarray, allowed: np.ndarray, target: float) -> float:
    """The level whose sublevel set ``field <= level`` covers ``target`` allowed pixels (or all of them).

    Non-finite field values (pixels out of a stroke's reach) never count; with none finite, ``inf``.
    """
    values = field[allowed & np.isfinite(field)]
    if len(values) == 0:
        return float("inf")
    count = int(np.clip(round(target), 1, len(values)))
    return float(np.partition(values, count - 1)[count - 1])


def radial_field(
    shape: tuple[int, int],
    centre: tuple[float, float],
    rng: np.random.Generator,
    irregularity: float,
    max_elongation: float,
    roughness: float = 0.0,
    radius: float = 1.0,
) -> np.ndarray:
    """An irregular, possibly elongated distance from ``centre`` (x, y) as (H, W) float32.

    The outline's radius varies with angle by harmonics 2..5 of total relative amplitude up to
    ``irregularity``; the shape is stretched by up to ``max_elongation`` along a random axis (area kept);
    ``roughness`` adds fractal noise of that many times ``radius`` pixels, for ragged outlines.
    """
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    axis = rng.uniform(0.0, np.pi)
    stretch = np.sqrt(rng.uniform(1.0, max(max_elongation, 1.0)))
    u = (dx * np.cos(axis) + dy * np.sin(axis)) / stretch
    v = (-dx * np.sin(axis) + dy * np.cos(axis)) * stretch
    angle = np.arctan2(v, u)
    outline = np.ones(shape, dtype=np.float32)
    for harmonic in range(2, 6):
        amplitude = rng.uniform(0.0, irregularity / (harmonic - 1))
        outline += amplitude * np.cos(harmonic * angle + rng.uniform(0.0, 2.0 * np.pi))
    field = np.hypot(u, v) / np.maximum(outline, 0.25)
    if roughness > 0.0:
        cells = max(2.0, min(shape) / max(2.0 * radius, 1.0))
        field = field + roughness * radius * fractal_noise(shape, (cells, cells), rng, octaves=3)
    return field.astype(np.float32)


def stroke_field(shape: tuple[int, int], segments: Segments, reach: float) -> np.ndarray:
    """Distance from each pixel to a polyline, divided by the polyline's local relative width, (H, W) float32.

    Pixels farther than ``reach`` from every segment's neighbourhood get ``inf``. Consecutive segments are
    processed in small chunks, each only over its own bounding box grown by ``reach``, so the cost follows the
    stroke's area rather than the image's.
    """
    points, widths = segments
    height, width = shape
    field = np.full(shape, np.inf, dtype=np.float32)
    for start in range(0, len(points), 16):
        a, b = points[start : start + 16, 0], points[start : start + 16, 1]  # (n, 2) each, (x, y)
        w = widths[start : start + 16]  # (n, 2)
        ends = points[start : start + 16].reshape(-1, 2)
        x0 = int(np.clip(np.floor(ends[:, 0].min() - reach), 0, width))
        x1 = int(np.clip(np.ceil(ends[:, 0].max() + reach) + 1, 0, width))
        y0 = int(np.clip(np.floor(ends[:, 1].min() - reach), 0, height))
        y1 = int(np.clip(np.ceil(ends[:, 1].max() + reach) + 1, 0, height))
        if x0 >= x1 or y0 >= y1:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        pixels = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (M, 2)
        ab = b - a
        length2 = np.maximum((ab**2).sum(axis=1), 1e-9)
        ap = pixels[None, :, :] - a[:, None, :]  # (n, M, 2)
        t = np.clip((ap * ab[:, None, :]).sum(axis=2) / length2[:, None], 0.0, 1.0)  # (n, M)
        offset = ap - t[..., None] * ab[:, None, :]
        distance = np.sqrt((offset**2).sum(axis=2))
        local = w[:, :1] * (1.0 - t) + w[:, 1:] * t
        best = (distance / np.maximum(local, 1e-3)).min(axis=0).reshape(y1 - y0, x1 - x0)
        np.minimum(field[y0:y1, x0:x1], best, out=field[y0:y1, x0:x1])
    return field


def _polyline(points: np.ndarray, taper: np.ndarray) -> Segments:
    """Segments between consecutive points (P, 2) with per-point relative widths (P,)."""
    ends = np.stack([points[:-1], points[1:]], axis=1).astype(np.float32)
    widths = np.stack([taper[:-1], taper[1:]], axis=1).astype(np.float32)
    return ends, widths


def _taper(count: int, floor: float) -> np.ndarray:
    """Relative width along a stroke of ``count`` points: ``floor`` at both ends, 1 in the middle."""
    s = np.linspace(0.0, 1.0, count)
    return floor + (1.0 - floor) * np.sin(np.pi * s) ** 0.6


def inside_share(segments: Segments, allowed: np.ndarray) -> float:
    """Share of a polyline's segment ends that fall on allowed pixels."""
    flat = np.rint(segments[0].reshape(-1, 2)).astype(int)
    height, width = allowed.shape
    inside = (flat[:, 0] >= 0) & (flat[:, 0] < width) & (flat[:, 1] >= 0) & (flat[:, 1] < height)
    hits = np.zeros(len(flat), dtype=bool)
    hits[inside] = allowed[flat[inside, 1], flat[inside, 0]]
    return float(hits.mean())


def scratch_path(
    centre: tuple[float, float], length: float, rng: np.random.Generator, allowed: np.ndarray, tries: int = 8
) -> Segments:
    """A thin, gently curved stroke of about ``length`` pixels through ``centre``, kept mostly on ``allowed``.

    Several headings are tried and the stroke with the largest share on the allowed pixels wins; the length
    shrinks when no heading fits.
    """
    best, best_share = None, -1.0
    for attempt in range(tries):
        current = max(length * 0.8 ** (attempt // 2), 3.0)
        count = max(3, int(np.ceil(current / 3.0)) + 1)
        s = np.linspace(-0.5, 0.5, count) * current
        heading = rng.uniform(0.0, np.pi) + rng.uniform(-1.0, 1.0) * s / max(current, 1.0)
        heading = heading + 0.08 * np.sin(2 * np.pi * s / max(current, 1.0) * rng.uniform(1.0, 3.0))
        steps = np.stack([np.cos(heading), np.sin(heading)], axis=1) * (current / (count - 1))
        points = np.cumsum(steps, axis=0)
        points = points - points[count // 2] + np.asarray(centre)
        segments = _polyline(points, _taper(count, rng.uniform(0.2, 0.5)))
        share = inside_share(segments, allowed)
        if share > best_share:
            best, best_share = segments, share
        if share >= 0.98:
            break
    assert best is not None
    return best


def _walk(
    start: np.ndarray, heading: float, length: float, width: float, depth: int, rng: np.random.Generator
) -> list[Segments]:
    """A jagged random walk with tapered width that may fork into thinner branches."""
    step = 2.5
    count = max(2, int(np.ceil(length / step)) + 1)
    drift = np.cumsum(rng.normal(0.0, 0.12, size=count - 1))
    jitter = rng.uniform(-0.6, 0.6, size=count - 1)
    angles = heading + drift + jitter
    points = np.vstack([start, start + np.cumsum(np.stack([np.cos(angles), np.sin(angles)], 1) * step, 0)])
    taper = width * np.linspace(1.0, 0.25, count)
    parts = [_polyline(points, taper)]
    if depth < 2:
        for _ in range(rng.poisson(1.3 if depth == 0 else 0.6)):
            index = int(rng.integers(1, count))
            turn = rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 1.1)
            parts += _walk(
                points[index],
                float(angles[index - 1] + turn),
                length * rng.uniform(0.25, 0.55),
                float(taper[index] * 0.7),
                depth + 1,
                rng,
            )
    return parts


def crack_path(centre: tuple[float, float], length: float, rng: np.random.Generator) -> Segments:
    """A branching, jagged crack whose segments add up to about ``length`` pixels, centred on ``centre``."""
    heading = rng.uniform(0.0, 2.0 * np.pi)
    origin = np.zeros(2)
    trunk = max(length, 4.0) / 1.6
    parts = _walk(origin, heading, trunk / 2, 1.0, 0, rng) + _walk(
        origin, heading + np.pi, trunk / 2, 1.0, 0, rng
    )
    ends = np.concatenate([p[0] for p in parts]).astype(np.float32)
    widths = np.concatenate([p[1] for p in parts]).astype(np.float32)
    total = float(np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1).sum())
    ends = ends * (max(length, 4.0) / max(total, 1e-6))
    return ends + np.asarray(centre, dtype=np.float32), widths

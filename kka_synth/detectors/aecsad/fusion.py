"""Score fusion by trimmed z-normalisation, and the thresholds and weights a calibration set can set.

CSAD (Hsieh and Lai, BMVC 2024) and AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) bring the
patch-histogram and LGST scores to one scale before adding them: each score is z-normalised by the mean and
standard deviation of a held-out normal validation split, computed after trimming the lowest and highest
20% so that a few odd validation images cannot move the scale.

The synthetic set never trains anything here (AeCSAD trains on normal images only): :func:`calibration_set`
turns it into calibration anomalies, which set the thresholds (F1-optimal over them and the held-out
normals) and, when asked, the fusion weights (:func:`calibrate_weights`).

Here the columns are (global histogram, patch histogram, LGST). The fused score is
``w_hist * (z_global + z_patch) + w_lgst * z_lgst``; equal weights (1, 1) are the thesis's sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

from kka_synth.detectors.inputs import check_mask, check_rgb, resize_mask, resize_rgb
from kka_synth.eval.metrics import image_auroc
from kka_synth.synth.base import RenderError
from kka_synth.types import SyntheticStage

logger = logging.getLogger(__name__)

WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
"""Candidate ratios w_hist / w_lgst for calibrated weights (w_lgst = 1; 0 drops the histogram)."""

MIN_CALIBRATION = 4
"""Fewest calibration anomalies for calibrated weights; with fewer the weights stay equal."""


def trimmed_stats(values: np.ndarray, trim: float) -> tuple[float, float]:
    """Mean and (population) standard deviation of 1-D ``values`` after dropping ``floor(trim * n)`` of the
    lowest and as many of the highest; all values are kept when that would leave none."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0:
        raise ValueError("trimmed statistics need at least one value")
    cut = math.floor(trim * values.size)
    kept = values[cut : values.size - cut] if values.size - 2 * cut >= 1 else values
    return float(kept.mean()), float(kept.std())


class TrimmedZ:
    """Per-column trimmed z-normalisation of (N, C) scores; a column with zero spread keeps scale 1."""

    def __init__(self, trim: float = 0.2):
        self.trim = trim
        self.mean = np.zeros(0)
        self.std = np.ones(0)

    def fit(self, scores: np.ndarray) -> TrimmedZ:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 2 or len(scores) == 0:
            raise ValueError(f"scores must be (N, C) with N >= 1, got shape {scores.shape}")
        stats = [trimmed_stats(scores[:, c], self.trim) for c in range(scores.shape[1])]
        self.mean = np.array([m for m, _ in stats])
        self.std = np.array([s if s > 0 else 1.0 for _, s in stats])
        return self

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return (np.asarray(scores, dtype=np.float64) - self.mean) / self.std


def fuse(z: np.ndarray, weights: tuple[float, float]) -> np.ndarray:
    """(N,) fused score of (N, 3) z-scores (global histogram, patch histogram, LGST)."""
    return weights[0] * (z[:, 0] + z[:, 1]) + weights[1] * z[:, 2]


def calibrate_weights(z_normal: np.ndarray, z_anomalous: np.ndarray) -> tuple[float, float]:
    """The (w_hist, 1) of :data:`WEIGHT_GRID` whose fused score separates held-out normals from calibration
    anomalies best (image AUROC); ties go to the ratio nearest 1 (the equal sum). Fewer than
    :data:`MIN_CALIBRATION` anomalies or no normals keep (1, 1)."""
    if len(z_anomalous) < MIN_CALIBRATION or len(z_normal) == 0:
        return (1.0, 1.0)
    labels = np.r_[np.zeros(len(z_normal)), np.ones(len(z_anomalous))].astype(np.int64)
    z = np.concatenate([z_normal, z_anomalous])
    best, best_key = (1.0, 1.0), None
    for ratio in WEIGHT_GRID:
        auroc = image_auroc(labels, fuse(z, (ratio, 1.0)))
        key = (round(auroc, 6), -abs(math.log(ratio)) if ratio > 0 else -math.inf)
        if best_key is None or key > best_key:
            best, best_key = (ratio, 1.0), key
    return best


def f1_threshold(normal: np.ndarray, anomalous: np.ndarray) -> float:
    """The lowest score threshold (``score >= t`` is anomalous) with the largest F1 over the two groups.

    Exact over all unique scores, in O(n log n): works for image scores and for millions of pixels alike.
    """
    negatives = np.sort(np.asarray(normal, dtype=np.float64).ravel())
    positives = np.sort(np.asarray(anomalous, dtype=np.float64).ravel())
    if positives.size == 0:
        raise ValueError("an F1 threshold needs at least one anomalous score")
    candidates = np.unique(np.concatenate([negatives, positives]))  # ascending
    tp = positives.size - np.searchsorted(positives, candidates, side="left")
    fp = negatives.size - np.searchsorted(negatives, candidates, side="left")
    f1 = 2.0 * tp / (tp + fp + positives.size)
    return float(candidates[int(np.argmax(f1))])


def normal_threshold(normal: np.ndarray, trim: float, k: float = 3.0) -> float:
    """Trimmed mean + ``k`` trimmed standard deviations of normal scores (used without anomalies)."""
    mean, std = trimmed_stats(normal, trim)
    return mean + k * std


def pixel_threshold(
    maps_normal: np.ndarray, maps_anomalous: np.ndarray, masks: Sequence[np.ndarray]
) -> float:
    """F1-optimal pixel threshold over normal maps (n, H, W) and anomalous maps (m, H, W) with their bool
    masks; with no anomalies, the 99.5th percentile of the normal maps."""
    if not len(masks):
        return float(np.quantile(maps_normal, 0.995))
    inside = np.concatenate([m[mask] for m, mask in zip(maps_anomalous, masks, strict=True)])
    outside = np.concatenate(
        [maps_normal.ravel()] + [m[~mask] for m, mask in zip(maps_anomalous, masks, strict=True)]
    )
    return f1_threshold(outside, inside)


def calibration_set(
    synthetic: object, held_out: Sequence[np.ndarray], side: int, draws: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The synthetic stages' anomalies at ``side`` x ``side`` as (image, mask or None): every fixed anomaly,
    and ``draws`` draws per held-out normal (already at ``side``) from each stage that has only ``draw``.

    Raises:
        ValueError: ``synthetic`` is neither None nor a non-empty list of SyntheticStage, or an anomaly is
            malformed.
    """
    if synthetic is None:
        return []
    if not isinstance(synthetic, Sequence) or isinstance(synthetic, (str, bytes)) or not synthetic:
        raise ValueError("synthetic must be None or a non-empty list of SyntheticStage")
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    failed = 0
    for index, stage in enumerate(synthetic):
        if not isinstance(stage, SyntheticStage):
            raise ValueError(f"synthetic[{index}] must be a SyntheticStage, got {type(stage).__name__}")
        for number, entry in enumerate(stage.anomalies):
            where = f"stage {stage.name!r} anomaly {number}"
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise ValueError(f"{where} must be a tuple (image, mask, clean or None)")
            image = check_rgb(entry[0], f"{where} image")
            mask = None if entry[1] is None else check_mask(entry[1], image.shape[:2], f"{where} mask")
            out.append(
                (resize_rgb(image, (side, side)), None if mask is None else resize_mask(mask, (side, side)))
            )
        if stage.anomalies or stage.draw is None:
            continue
        for normal in held_out:
            for _ in range(draws):
                try:
                    image, mask = stage.draw(normal, rng)
                except RenderError:
                    failed += 1
                    continue
                where = f"stage {stage.name!r} draw"
                image = check_rgb(image, f"{where} image")
                out.append((image, check_mask(np.asarray(mask), image.shape[:2], f"{where} mask")))
    if failed:
        logger.warning("aecsad: %d calibration draws failed and were skipped", failed)
    return out

"""Anomaly-detection metrics, exact and without anomalib: AUROC, F1-max, AUPRO and sPRO.

- AUROC is the trapezoidal area under the ROC curve over all unique thresholds; a tie between a normal
  and an anomalous score counts one half (the Mann-Whitney statistic, as sklearn's ``roc_auc_score``).
- F1-max is the largest F1 over all thresholds ``t`` of the prediction ``score >= t``.
- AUPRO follows the official evaluation of MVTec AD (Bergmann et al., "The MVTec Anomaly Detection
  Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", IJCV 2021). Every
  ground-truth mask is split into its 8-connected components. At threshold ``t``, FPR(t) is the share of
  ground-truth-negative pixels of all test images (normal and anomalous) scoring ``>= t``, and PRO(t) is
  the mean over all components of the share of their pixels scoring ``>= t``. The curve of these points
  over all unique thresholds, from (0, 0), is integrated with the trapezoid rule up to ``fpr_limit`` (PRO
  linearly interpolated there) and divided by ``fpr_limit``, so a perfect map scores 1.
- sPRO follows MVTec LOCO AD (Bergmann et al., "Beyond Dents and Scratches: Logical Constraints in
  Unsupervised Anomaly Detection and Localization", IJCV 2022): each annotated region (one per mask file,
  not split into components) has a saturation ``s`` in pixels and counts as
  ``min(|region pixels scoring >= t| / s, 1)``; FPR uses the anomaly-free images only. The curve is
  integrated as for AUPRO, by default up to an FPR of 0.05.

No threshold is visited one by one. The overlap (PRO or sPRO) is a sum of per-pixel steps: an anomalous
pixel of score ``s`` adds its weight ``w`` once ``t <= s`` (``w = 1 / (components * component size)`` for
PRO; for sPRO the k-th highest pixel of a region adds ``clip(s_r - (k - 1), 0, 1) / (regions * s_r)``).
Between two neighbouring curve points the trapezoid rule draws a straight line, so the pixel's share of the
curve rises linearly from 0 at FPR ``#neg > s / N`` to ``w`` at FPR ``#neg >= s / N`` and stays there; its
area up to the limit has a closed form, and the curve's area is the sum over pixels. Only the
``ceil(limit * N) + 1`` highest normal scores can reach FPRs below the limit, so those alone are sorted
(after an in-place partition); AUROC and F1-max sort all normal scores once. Memory stays at about one copy
of the maps, in their own float dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

METRIC_NAMES = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "spro")
"""Keys of :func:`anomaly_metrics`, in this order."""

_CHUNK = 1 << 22
"""Elements per block when counting over the unsorted normal scores (bounds the temporary)."""


def _score_dtype(array: np.ndarray, name: str) -> np.dtype:
    """The float dtype scores are kept in: the array's own float dtype, at least float32."""
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {array.dtype}")
    return np.result_type(array.dtype, np.float32)


def _check_finite(array: np.ndarray, name: str) -> None:
    # min and max propagate NaN and need no temporary array
    if array.dtype.kind == "f" and array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        raise ValueError(f"{name} contain NaN or infinite values")


def _check_limit(fpr_limit: float) -> None:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.number)):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def _require_both(negatives: int, positives: int, what: str) -> None:
    if negatives == 0 or positives == 0:
        missing = "normal" if negatives == 0 else "anomalous"
        raise ValueError(f"{what} hold no {missing} samples; the metric needs both classes")


# ----------------------------------------------------------------------------- sorted-score kernels


def _auroc_sorted(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney AUROC from ascending negative and positive scores of the same dtype."""
    below = np.searchsorted(negatives, positives, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negatives, positives, side="right").sum(dtype=np.int64)
    return (int(below) + int(below_or_tied)) / (2 * positives.size * negatives.size)


def _f1_max_sorted(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Largest F1 of ``score >= t``; only thresholds at positive scores can be best."""
    first = np.flatnonzero(np.concatenate(([True], positives[1:] != positives[:-1])))
    true_pos = positives.size - first  # (U,) positives >= each unique positive score
    false_pos = negatives.size - np.searchsorted(negatives, positives[first], side="left")
    return float(np.max(2.0 * true_pos / (true_pos + false_pos + positives.size)))


def _spread(count: int, points: int) -> np.ndarray:
    """Up to ``points`` indices into ``count`` items, evenly spaced, first and last included."""
    return np.unique(np.round(np.linspace(0, count - 1, points)).astype(np.int64))


def _roc_points_sorted(
    negatives: np.ndarray, positives: np.ndarray, max_points: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) vertices of the exact ROC curve from (0, 0) to (1, 1), at most ``max_points``.

    When the curve has more vertices, the kept ones sit at evenly spaced quantiles of each class, so the
    points are spread along both axes; every returned point lies on the exact curve.
    """
    lowest = min(negatives[0], positives[0])
    if negatives.size + positives.size < max_points:
        thresholds = np.unique(np.concatenate((negatives, positives)))
    else:
        per_class = (max_points - 2) // 2
        picks = (negatives[_spread(negatives.size, per_class)], positives[_spread(positives.size, per_class)])
        thresholds = np.unique(np.concatenate((*picks, [lowest]) if per_class else ([lowest],)))
    thresholds = thresholds.astype(negatives.dtype, copy=False)[::-1]  # descending
    fpr = (negatives.size - np.searchsorted(negatives, thresholds, side="left")) / negatives.size
    tpr = (positives.size - np.searchsorted(positives, thresholds, side="left")) / positives.size
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], tpr))


class _Negatives:
    """Normal scores, sorted lazily from the top.

    ``values`` may hold ``padding`` extra entries of -inf (the places of the anomalous pixels in a copy of
    whole maps); they sort below every finite score and are never counted. ``values[start:]`` is sorted
    ascending and no smaller than any value before ``start``; ``ties_below`` counts the values before
    ``start`` that equal ``values[start]``.
    """

    def __init__(self, values: np.ndarray, padding: int = 0) -> None:
        self.values = values  # (size + padding,) sorted in place
        self.padding = padding
        self.size = values.size - padding
        self.start = values.size
        self.ties_below = 0

    def sort_top(self, count: int) -> None:
        """Make sure the ``count`` largest scores are sorted (``count >= size`` sorts them all)."""
        cut = self.values.size - min(count, self.size)
        if cut >= self.start:
            return
        rest = self.values[: self.start]
        if cut > 0:
            rest.partition(cut)
        rest[cut:].sort()
        self.start = cut
        self.ties_below = 0
        floor = self.values[cut]
        for begin in range(0, cut, _CHUNK):
            block = self.values[begin : min(begin + _CHUNK, cut)]
            self.ties_below += int(np.count_nonzero(block == floor))

    def sort_all(self) -> np.ndarray:
        """All normal scores, ascending."""
        self.sort_top(self.size)
        return self.values[self.padding :]

    def ramp_integrals(self, scores: np.ndarray, limit: float) -> tuple[int, np.ndarray]:
        """Area up to ``limit`` (in normal pixels) under each anomalous pixel's unit step of the curve.

        ``scores`` are ascending anomalous scores. Returns ``first`` and the areas of ``scores[first:]``;
        pixels before ``first`` score below every normal value that matters and add nothing.
        """
        self.sort_top(math.ceil(limit) + 1)
        top = self.values[self.start :]
        first = int(np.searchsorted(scores, top[0], side="left"))
        queries = scores[first:]
        above = top.size - np.searchsorted(top, queries, side="right")  # (Q,) normals > s
        at_or_above = top.size - np.searchsorted(top, queries, side="left")  # (Q,) normals >= s
        if self.ties_below:
            at_or_above = at_or_above + self.ties_below * (queries == top[0])
        low, high = above.astype(np.float64), at_or_above.astype(np.float64)
        reach = np.clip(limit, low, high)
        width = high - low
        ramp = np.divide((reach - low) ** 2, 2.0 * width, out=np.zeros_like(low), where=width > 0)
        return first, ramp + np.maximum(limit - high, 0.0)


# ----------------------------------------------------------------------------- image level


def _image_scores(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ascending (normal scores, anomalous scores) of image-level labels and scores, either may be empty."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D arrays of one length, got shapes {labels.shape} and "
            f"{scores.shape}"
        )
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if labels.dtype.kind not in "biuf":
        raise ValueError(f"labels must be 0 or 1, got dtype {labels.dtype}")
    anomalous = labels == 1
    if not np.all(anomalous | (labels == 0)):
        raise ValueError(f"labels must be 0 (normal) or 1 (anomalous), got values {np.unique(labels)[:5]}")
    scores = scores.astype(_score_dtype(scores, "scores"), copy=False)
    _check_finite(scores, "scores")
    return np.sort(scores[~anomalous]), np.sort(scores[anomalous])


def _image_classes(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    negatives, positives = _image_scores(labels, scores)
    _require_both(negatives.size, positives.size, "labels")
    return negatives, positives


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image AUROC of ``scores`` (N,) against ``labels`` (N,) in {0, 1}; ties count one half."""
    return _auroc_sorted(*_image_classes(labels, scores))


def image_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Largest F1 over all thresholds ``t`` of the prediction ``scores >= t``."""
    return _f1_max_sorted(*_image_classes(labels, scores))


def roc_points(
    labels: np.ndarray, scores: np.ndarray, max_points: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image ROC curve for plotting: at most ``max_points`` of its vertices, always with
    (0, 0) and (1, 1), every point on the exact curve."""
    _check_max_points(max_points)
    return _roc_points_sorted(*_image_classes(labels, scores), max_points)


def _check_max_points(max_points: int) -> None:
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ValueError(f"max_points must be an int >= 2, got {max_points!r}")


# ----------------------------------------------------------------------------- pixel level


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"masks and maps must both be (N, H, W), got shapes {masks.shape} and {maps.shape}")
    if maps.size == 0:
        raise ValueError(f"masks and maps are empty (shape {maps.shape})")
    if masks.dtype.kind not in "biu":
        raise ValueError(f"masks must be bool (or integer, nonzero = anomalous), got dtype {masks.dtype}")
    _score_dtype(maps, "maps")
    _check_finite(maps, "maps")
    return masks, maps


def _has_both_pixel_classes(masks: np.ndarray) -> bool:
    anomalous = np.count_nonzero(masks)
    return 0 < anomalous < masks.size


class PixelScores:
    """The pixels of a test set prepared once, so that several pixel metrics share one sort.

    The maps are copied once into a flat array (their float dtype, at least float32) in which the anomalous
    pixels are set to -inf, and the anomalous scores, with the 8-connected ground-truth component each
    belongs to, into another. The normal scores are sorted in place as far as a metric needs: AUPRO sorts
    only the top part, AUROC, F1-max and the ROC curve sort everything.

    Args:
        masks: (N, H, W) ground truth, bool (or integer, nonzero = anomalous).
        maps: (N, H, W) anomaly maps, higher = more anomalous.

    Raises:
        ValueError: shapes disagree, arrays are empty, maps hold NaN or infinity, or the masks hold only
            one class of pixels.
    """

    def __init__(self, masks: np.ndarray, maps: np.ndarray) -> None:
        masks, maps = _check_pixels(masks, maps)
        dtype = _score_dtype(maps, "maps")
        anomalous = int(np.count_nonzero(masks))
        _require_both(maps.size - anomalous, anomalous, "masks")
        # a copy of every pixel score, the anomalous ones replaced by -inf: cheaper than gathering the normals
        values = np.empty(maps.size, dtype=dtype)  # (N * H * W,)
        positives = np.empty(anomalous, dtype=dtype)  # (N_pos,)
        component = np.empty(anomalous, dtype=np.int32 if anomalous < 2**31 else np.int64)  # (N_pos,)
        sizes: list[np.ndarray] = []
        pixels = maps[0].size
        pos_at = components = 0
        for i, (image, mask) in enumerate(zip(maps, masks, strict=True)):
            row = values[i * pixels : (i + 1) * pixels].reshape(image.shape)
            row[...] = image
            mask = mask if mask.dtype == np.bool_ else mask != 0
            count = int(np.count_nonzero(mask))
            if count == 0:
                continue
            np.copyto(row, -np.inf, where=mask)
            positives[pos_at : pos_at + count] = image[mask]
            labels_count, labels = cv2.connectedComponents(
                np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8, ltype=cv2.CV_32S
            )
            inside = labels[mask]  # (count,) component 1..labels_count-1 of each anomalous pixel
            component[pos_at : pos_at + count] = inside + (components - 1)
            sizes.append(np.bincount(inside, minlength=labels_count)[1:])
            pos_at += count
            components += labels_count - 1
        order = np.argsort(positives, kind="stable")
        self._positives = positives[order]  # (N_pos,) ascending
        self._component = component[order]  # (N_pos,)
        self._sizes = np.concatenate(sizes).astype(np.float64)  # (components,)
        self._negatives = _Negatives(values, padding=anomalous)
        logger.debug(
            "pixel scores: %d normal and %d anomalous pixels in %d components",
            maps.size - anomalous,
            anomalous,
            components,
        )

    @property
    def components(self) -> int:
        """Number of 8-connected ground-truth components over all images."""
        return int(self._sizes.size)

    def auroc(self) -> float:
        """Pixel AUROC over all pixels of all images; ties count one half."""
        return _auroc_sorted(self._negatives.sort_all(), self._positives)

    def f1_max(self) -> float:
        """Largest pixel F1 over all thresholds ``t`` of ``map >= t``."""
        return _f1_max_sorted(self._negatives.sort_all(), self._positives)

    def roc_points(self, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) of the pixel ROC curve, at most ``max_points`` vertices, from (0, 0) to (1, 1)."""
        _check_max_points(max_points)
        return _roc_points_sorted(self._negatives.sort_all(), self._positives, max_points)

    def aupro(self, fpr_limit: float = 0.3) -> float:
        """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``."""
        _check_limit(fpr_limit)
        limit = fpr_limit * self._negatives.size  # in normal pixels
        first, areas = self._negatives.ramp_integrals(self._positives, limit)
        weights = 1.0 / self._sizes[self._component[first:]]
        return float(np.dot(weights, areas)) / (self.components * limit)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel AUROC of ``maps`` (N, H, W) against bool ``masks`` (N, H, W)."""
    return PixelScores(masks, maps).auroc()


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray) -> float:
    """Largest pixel F1 of ``maps >= t`` against ``masks`` over all thresholds ``t``."""
    return PixelScores(masks, maps).f1_max()


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (official MVTec AD definition)."""
    _check_limit(fpr_limit)
    return PixelScores(masks, maps).aupro(fpr_limit)


# ----------------------------------------------------------------------------- sPRO


def _region_steps(
    image: np.ndarray, mask: np.ndarray, saturation: float, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """(ascending scores, sPRO increments) of the pixels of one region that add to its saturated overlap."""
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape or mask.dtype.kind not in "biu":
        got = f"{mask.dtype} {mask.shape}" if isinstance(mask, np.ndarray) else type(mask).__name__
        raise ValueError(f"{where}: the mask must be a bool array of shape {image.shape}, got {got}")
    if isinstance(saturation, bool) or not isinstance(saturation, (int, float, np.number)):
        raise ValueError(f"{where}: the saturation must be a number of pixels, got {saturation!r}")
    if not (math.isfinite(saturation) and saturation > 0):
        raise ValueError(f"{where}: the saturation must be positive and finite, got {saturation!r}")
    values = np.sort(image[mask if mask.dtype == np.bool_ else mask != 0])
    if values.size == 0:
        raise ValueError(f"{where}: the region mask is empty")
    count = min(math.ceil(saturation), values.size)
    rank = np.arange(count, 0, -1, dtype=np.float64)  # 1 = the region's highest score
    return values[values.size - count :], np.clip(saturation - (rank - 1.0), 0.0, 1.0) / saturation


def spro(
    regions: Sequence[Sequence[tuple[np.ndarray, float]]], maps: np.ndarray, fpr_limit: float = 0.05
) -> float:
    """Normalised area under the saturated per-region-overlap curve up to ``fpr_limit`` (MVTec LOCO AD).

    Args:
        regions: per image, its annotated regions as (bool mask (H, W), saturation in pixels); ``[]`` marks
            an anomaly-free image. A saturation above the region's area means it is never fully found.
        maps: (N, H, W) anomaly maps.
        fpr_limit: the FPR (over the anomaly-free images) up to which the curve is integrated.
    """
    _check_limit(fpr_limit)
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.size == 0:
        raise ValueError(f"maps must be a non-empty (N, H, W) array, got shape {maps.shape}")
    if len(regions) != len(maps):
        raise ValueError(f"regions has {len(regions)} entries for {len(maps)} maps")
    dtype = _score_dtype(maps, "maps")
    _check_finite(maps, "maps")
    normal = [i for i, image_regions in enumerate(regions) if len(image_regions) == 0]
    if not normal:
        raise ValueError("spro needs anomaly-free images (empty region lists) for the false positive rate")
    if len(normal) == len(regions):
        raise ValueError("spro needs at least one annotated region")
    pixels = maps[0].size
    negatives = np.empty(len(normal) * pixels, dtype=dtype)  # (N_neg,)
    for j, i in enumerate(normal):
        negatives[j * pixels : (j + 1) * pixels] = maps[i].ravel()
    scores, steps = [], []
    for i, image_regions in enumerate(regions):
        for j, region in enumerate(image_regions):
            try:
                mask, saturation = region
            except (TypeError, ValueError):
                raise ValueError(f"region {j} of image {i} must be a (mask, saturation) pair") from None
            region_scores, region_steps = _region_steps(maps[i], mask, saturation, f"region {j} of image {i}")
            scores.append(region_scores.astype(dtype, copy=False))
            steps.append(region_steps)
    positives = np.concatenate(scores)
    order = np.argsort(positives, kind="stable")
    positives, weights = positives[order], np.concatenate(steps)[order]
    limit = fpr_limit * negatives.size
    first, areas = _Negatives(negatives).ramp_integrals(positives, limit)
    return float(np.dot(weights[first:], areas)) / (len(steps) * limit)


# ----------------------------------------------------------------------------- all at once


def anomaly_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    maps: np.ndarray | None = None,
    regions: Sequence[Sequence[tuple[np.ndarray, float]]] | None = None,
) -> dict[str, float | None]:
    """Every metric of :data:`METRIC_NAMES` that the inputs allow; the others are None.

    Image metrics need both labels; pixel metrics need masks and maps with both kinds of pixels; sPRO
    needs maps and regions with at least one region and one anomaly-free image. Malformed input (shapes
    that disagree, NaN scores, bad labels) still raises ValueError.
    """
    result: dict[str, float | None] = dict.fromkeys(METRIC_NAMES)
    negatives, positives = _image_scores(labels, scores)
    if negatives.size and positives.size:
        result["image_auroc"] = _auroc_sorted(negatives, positives)
        result["image_f1_max"] = _f1_max_sorted(negatives, positives)
    if maps is not None and len(maps) != len(negatives) + len(positives):
        raise ValueError(f"maps has {len(maps)} images for {len(negatives) + len(positives)} scores")
    if masks is not None and maps is not None:
        masks, maps = _check_pixels(masks, maps)
        if _has_both_pixel_classes(masks):
            pixels = PixelScores(masks, maps)
            result["aupro"] = pixels.aupro()
            result["pixel_auroc"] = pixels.auroc()
            result["pixel_f1_max"] = pixels.f1_max()
            del pixels  # free its copy of the maps before sPRO makes its own
    if regions is not None and maps is not None:
        annotated = sum(len(image_regions) > 0 for image_regions in regions)
        if 0 < annotated < len(regions):
            result["spro"] = spro(regions, maps)
    return result

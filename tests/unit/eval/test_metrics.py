"""Anomaly metrics: hand-computed cases, sklearn, and a slow explicit-curve reference for AUPRO and sPRO."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from kka_synth.data.images import DataError, resize_mask
from kka_synth.data.mvtec import loco_regions
from kka_synth.eval.metrics import (
    METRIC_NAMES,
    PixelScores,
    anomaly_metrics,
    aupro,
    image_auroc,
    image_f1_max,
    pixel_auroc,
    pixel_f1_max,
    roc_points,
    spro,
)

trapezoid = getattr(np, "trapezoid", None) or np.trapz

# ----------------------------------------------------------------------------- slow references


def _area_up_to(fpr: np.ndarray, overlap: np.ndarray, limit: float) -> float:
    """Trapezoid area of the curve up to ``limit`` (overlap interpolated there), divided by ``limit``."""
    keep = fpr <= limit
    x, y = fpr[keep], overlap[keep]
    if x[-1] < limit:
        j = int(np.searchsorted(fpr, limit, side="right"))
        y_limit = overlap[j - 1] + (overlap[j] - overlap[j - 1]) * (limit - fpr[j - 1]) / (
            fpr[j] - fpr[j - 1]
        )
        x, y = np.append(x, limit), np.append(y, y_limit)
    return float(trapezoid(y, x)) / limit


def _explicit_curve(thresholds, fpr_at, overlap_at) -> tuple[np.ndarray, np.ndarray]:
    """(0, 0), the point of every threshold from the highest down, then (1, 1)."""
    fpr = [0.0] + [fpr_at(t) for t in thresholds[::-1]] + [1.0]
    overlap = [0.0] + [overlap_at(t) for t in thresholds[::-1]] + [1.0]
    return np.array(fpr), np.array(overlap)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, limit: float) -> float:
    negatives = maps[~masks]
    components = []
    for image, mask in zip(maps, masks, strict=True):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        components += [image[labels == k] for k in range(1, count + 1)]
    fpr, pro = _explicit_curve(
        np.unique(maps),
        lambda t: np.mean(negatives >= t),
        lambda t: np.mean([np.mean(c >= t) for c in components]),
    )
    return _area_up_to(fpr, pro, limit)


def reference_spro(regions, maps: np.ndarray, limit: float) -> float:
    negatives = np.concatenate([maps[i].ravel() for i, r in enumerate(regions) if not r])
    parts = [(maps[i][mask], s) for i, r in enumerate(regions) for mask, s in r]
    fpr, overlap = _explicit_curve(
        np.unique(maps),
        lambda t: np.mean(negatives >= t),
        lambda t: np.mean([min(np.sum(v >= t) / s, 1.0) for v, s in parts]),
    )
    return _area_up_to(fpr, overlap, limit)


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * precision * recall / (precision + recall)))


def random_pixels(rng: np.random.Generator, images: int = 6, size: int = 12, decimals: int = 1):
    """Blobby masks on some images, maps = noise + signal in the blobs, rounded so many scores tie."""
    masks = np.zeros((images, size, size), dtype=bool)
    for i in range(1, images, 2):
        for _ in range(int(rng.integers(1, 4))):
            y, x = rng.integers(0, size - 3, size=2)
            h, w = rng.integers(1, 4, size=2)
            masks[i, y : y + h, x : x + w] = True
        masks[i] &= rng.random((size, size)) < 0.9  # ragged blobs, some split
    maps = rng.random(masks.shape) * 0.8 + masks * rng.random(masks.shape) * 0.6
    return masks, np.round(maps, decimals).astype(np.float32)


def random_regions(rng: np.random.Generator, masks: np.ndarray):
    """One sPRO region per blob row-band, with absolute or relative saturations."""
    regions = []
    for mask in masks:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        image_regions = []
        for k in range(1, count + 1):
            region = labels == k
            area = int(region.sum())
            saturation = float(rng.choice([area, max(area * 0.5, 0.5), 1.0, 2.5]))
            image_regions.append((region, min(saturation, area)))
        regions.append(image_regions)
    return regions


# ----------------------------------------------------------------------------- image level


def test_image_metrics_by_hand():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3 of 4
    assert image_auroc(labels, scores) == pytest.approx(0.75, abs=1e-9)
    # t=0.8: TP1 FP0 FN1 -> 2/3; t=0.4: TP1 FP1 -> 1/2; t=0.35: TP2 FP1 -> 4/5; t=0.1: TP2 FP2 -> 2/3
    assert image_f1_max(labels, scores) == pytest.approx(0.8, abs=1e-9)
    # ties: pos 0.5 vs neg 0.5 counts 1/2, the other three pairs 1 -> 3.5 / 4
    assert image_auroc(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.9])) == pytest.approx(
        0.875, abs=1e-9
    )


def test_perfect_and_inverted_image_scores():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert image_auroc(labels, scores) == 1.0
    assert image_f1_max(labels, scores) == 1.0
    assert image_auroc(labels, -scores) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_image_metrics_match_sklearn(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200) + 0.3 * labels, 1)  # heavy ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_roc_points_full_curve_equals_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=60)
    scores = np.round(rng.random(60), 1)
    fpr, tpr = roc_points(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


@pytest.mark.parametrize("max_points", [2, 3, 10, 51])
def test_roc_points_thinned_lie_on_the_curve(max_points: int):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=2000)
    scores = rng.random(2000) + 0.5 * labels
    fpr, tpr = roc_points(labels, scores, max_points=max_points)
    assert fpr.dtype == np.float64 and fpr.shape == tpr.shape
    assert 2 <= fpr.size <= max_points
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    exact = set(zip(ref_fpr.round(12), ref_tpr.round(12), strict=True))
    assert all(point in exact for point in zip(fpr.round(12), tpr.round(12), strict=True))


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 0, 0], [0.1, 0.2, 0.3], "no anomalous"),
        ([1, 1], [0.1, 0.2], "no normal"),
        ([0, 1], [0.1], "shapes"),
        ([], [], "empty"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 2], [0.1, 0.2], "0 \\(normal\\) or 1"),
        ([0, 1], ["a", "b"], "real numbers"),
    ],
)
def test_image_metrics_reject_degenerate_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(np.array(labels), np.array(scores))


# ----------------------------------------------------------------------------- pixel AUROC and F1-max


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_and_f1_match_sklearn(seed: int):
    masks, maps = random_pixels(np.random.default_rng(seed), images=8, size=16, decimals=1)
    labels, scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert pixel_f1_max(masks, maps) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    fpr, tpr = PixelScores(masks, maps).roc_points(max_points=10_000)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)


def test_pixel_metrics_by_hand():
    # image 0 is good: 0.1 0.2 0.3 0.4; image 1 has mask 1 1 0 1 and scores 0.9 0.4 0.5 0.6
    masks = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 1]]], dtype=bool)
    maps = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.9, 0.4, 0.5, 0.6]]])
    # negatives 0.1 0.2 0.3 0.4 0.5; positives 0.9 (beats 5), 0.6 (beats 5), 0.4 (beats 3, ties 1) -> 13.5/15
    assert pixel_auroc(masks, maps) == pytest.approx(13.5 / 15, abs=1e-9)
    # t=0.6: TP2 FP0 FN1 -> 4/5; t=0.4: TP3 FP2 -> 6/8; t=0.9: TP1 -> 2/4
    assert pixel_f1_max(masks, maps) == pytest.approx(0.8, abs=1e-9)


def test_perfect_and_inverted_maps():
    masks, _ = random_pixels(np.random.default_rng(5))
    perfect = masks + 0.1 * np.random.default_rng(6).random(masks.shape)
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_f1_max(masks, perfect) == 1.0
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, perfect, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(masks, -perfect) == 0.0
    assert aupro(masks, -perfect) == 0.0


# ----------------------------------------------------------------------------- AUPRO


def test_aupro_by_hand():
    # image 0 is good: 0.1 0.2 0.3 0.4. Image 1 (1x4) has mask 1 1 0 1: component A = {0, 1} (size 2),
    # component B = {3} (size 1), and scores 0.9 0.4 0.5 0.6. Negatives 0.1 0.2 0.3 0.4 0.5, N = 5.
    #   t=0.9: FPR 0,  PRO (1/2 + 0)/2 = 0.25
    #   t=0.6: FPR 0,  PRO (1/2 + 1)/2 = 0.75
    #   t=0.5: FPR .2, PRO .75
    #   t=0.4: FPR .4, PRO 1     (negative 0.4 and A's 0.4 tie: a straight ramp from (.2, .75) to (.4, 1))
    #   then FPR .6, .8, 1 at PRO 1.
    # Up to 0.3: .75 * .2 + (.75 + .875) / 2 * .1 = .23125 -> / .3
    # Up to 1:   .15 + (.75 + 1) / 2 * .2 + .6 = .925
    masks = np.array([[[0, 0, 0, 0]], [[1, 1, 0, 1]]], dtype=bool)
    maps = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.9, 0.4, 0.5, 0.6]]], dtype=np.float32)
    assert aupro(masks, maps) == pytest.approx(0.23125 / 0.3, abs=1e-9)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.925, abs=1e-9)
    # up to .1: PRO .75 all the way
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.75, abs=1e-9)


def test_aupro_uses_8_connectivity():
    # 4x4 image: component {(0,0), (1,1)} joins diagonally (size 2), {(3,2), (3,3)} (size 2).
    # Scores 0.9 on (0,0), (3,2), (3,3), 0.0 on (1,1), 0.5 on the 12 negatives.
    # 8-connected: PRO at t=0.9 is (1/2 + 1)/2 = 0.75, and stays there until FPR 1 -> AUPRO 0.75.
    # (4-connected it would be (1 + 0 + 1)/3.)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 2] = mask[3, 3] = True
    image = np.full((4, 4), 0.5)
    image[0, 0] = image[3, 2] = image[3, 3] = 0.9
    image[1, 1] = 0.0
    assert PixelScores(mask[None], image[None]).components == 2
    assert aupro(mask[None], image[None]) == pytest.approx(0.75, abs=1e-9)
    assert aupro(mask[None], image[None], fpr_limit=1.0) == pytest.approx(0.75, abs=1e-9)


def test_aupro_components_weigh_equally_whatever_their_size():
    # a 1-pixel and a 9-pixel component; only the small one scores high -> PRO 1/2 (pixel overlap: 1/10)
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 0, 0] = True
    mask[0, 4:7, 4:7] = True
    maps = np.where(mask, 0.0, 0.5)
    maps[0, 0, 0] = 1.0
    assert aupro(mask, maps) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_matches_explicit_curve(seed: int, limit: float):
    masks, maps = random_pixels(np.random.default_rng(seed), decimals=1 if seed % 2 else 2)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(reference_aupro(masks, maps, limit), abs=1e-9)


def test_pixel_scores_share_one_preparation_in_any_order():
    masks, maps = random_pixels(np.random.default_rng(11), images=8, size=16)
    expected = {limit: reference_aupro(masks, maps, limit) for limit in (0.01, 0.05, 0.3, 1.0)}
    pixels = PixelScores(masks, maps)
    for limit in (0.05, 0.01, 0.3, 0.05):  # grows and shrinks the sorted top part
        assert pixels.aupro(limit) == pytest.approx(expected[limit], abs=1e-9)
    assert pixels.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixels.aupro(1.0) == pytest.approx(expected[1.0], abs=1e-9)
    assert pixels.aupro(0.3) == pytest.approx(expected[0.3], abs=1e-9)
    assert pixels.f1_max() == pytest.approx(pixel_f1_max(masks, maps), abs=1e-12)


def test_pixel_metrics_keep_float64_and_accept_integer_maps_and_masks():
    masks, maps = random_pixels(np.random.default_rng(12), decimals=2)
    as_int = np.round(maps * 100).astype(np.int64)
    assert aupro(masks.astype(np.uint8), as_int) == pytest.approx(aupro(masks, maps), abs=1e-12)
    close = maps.astype(np.float64)
    close[masks] += 1e-12  # ties broken below float32 resolution
    assert pixel_auroc(masks, close) >= pixel_auroc(masks, maps)
    assert pixel_auroc(masks, close) == pytest.approx(roc_auc_score(masks.ravel(), close.ravel()), abs=1e-12)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        (np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3)), "no anomalous"),
        (np.ones((2, 3, 3), bool), np.zeros((2, 3, 3)), "no normal"),
        (np.zeros((2, 3, 3), bool), np.zeros((2, 3, 4)), "shapes"),
        (np.zeros((3, 3), bool), np.zeros((3, 3)), "shapes"),
        (np.zeros((0, 3, 3), bool), np.zeros((0, 3, 3)), "empty"),
        (np.eye(3, dtype=bool)[None], np.full((1, 3, 3), np.nan), "NaN"),
        (np.eye(3, dtype=bool)[None], np.full((1, 3, 3), np.inf), "NaN or infinite"),
        (np.eye(3)[None], np.zeros((1, 3, 3)), "masks must be bool"),
    ],
)
def test_pixel_metrics_reject_degenerate_input(masks, maps, message):
    for metric in (pixel_auroc, pixel_f1_max, aupro):
        with pytest.raises(ValueError, match=message):
            metric(masks, maps)


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5, float("nan"), True])
def test_aupro_rejects_bad_limit(limit):
    masks, maps = random_pixels(np.random.default_rng(0))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=limit)


def test_roc_points_reject_bad_max_points():
    masks, maps = random_pixels(np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_points"):
        PixelScores(masks, maps).roc_points(max_points=1)


# ----------------------------------------------------------------------------- sPRO


def _mask(row: list[int]) -> np.ndarray:
    return np.array([row], dtype=bool)


def test_spro_by_hand():
    # image 0 is good: 0.1 0.2 0.3 0.4 (N = 4). Image 1 (1x4) scores 0.9 0.8 0.3 0.05 with region R1 = {0, 1}
    # at saturation 1 and region R2 = {2, 3} at saturation 2; image 2 has a region elsewhere and a stray
    # pixel (0.95) outside it that sPRO ignores.
    #   t=0.9:  FPR 0,   R1 min(1/1, 1) = 1, R2 0, R3 0 -> 1/3
    #   t=0.4:  FPR .25, 1/3
    #   t=0.3:  FPR .5,  R2 1/2 -> 1.5/3 (ramp from (.25, 1/3) to (.5, .5): 0.3 ties a negative)
    #   t=0.2:  FPR .75 (R3's 0.2 ties: R3 found)  -> 2.5/3
    #   t=0.1:  FPR 1; t=0.05: R2 full -> 1
    # Up to .05: 1/3. Up to 1: .25/3 + (1/3 + .5)/2 * .25 + (.5 + 2.5/3)/2 * .25 + (2.5/3) * .25
    regions = [[], [(_mask([1, 1, 0, 0]), 1.0), (_mask([0, 0, 1, 1]), 2.0)], [(_mask([0, 0, 1, 0]), 1.0)]]
    maps = np.array([[[0.1, 0.2, 0.3, 0.4]], [[0.9, 0.8, 0.3, 0.05]], [[0.95, 0.0, 0.2, 0.0]]])
    assert spro(regions, maps) == pytest.approx(1 / 3, abs=1e-9)
    full = 0.25 / 3 + (1 / 3 + 0.5) / 2 * 0.25 + (0.5 + 2.5 / 3) / 2 * 0.25 + 2.5 / 3 * 0.25
    assert spro(regions, maps, fpr_limit=1.0) == pytest.approx(full, abs=1e-9)
    assert spro(regions, maps, fpr_limit=1.0) == pytest.approx(reference_spro(regions, maps, 1.0), abs=1e-12)


def test_spro_saturation_finds_a_region_with_ten_of_its_pixels():
    # a 100-pixel region with saturation 10: once its 10 best pixels lie above every normal score it is found
    region = np.zeros((20, 20), dtype=bool)
    region[5:15, 5:15] = True
    maps = np.random.default_rng(0).random((2, 20, 20)) * 0.5
    maps[1][region] = 0.0
    maps[1, 5, 5:15] = 0.9  # 10 pixels
    assert spro([[], [(region, 10.0)]], maps) == pytest.approx(1.0, abs=1e-12)
    assert spro([[], [(region, 20.0)]], maps) == pytest.approx(0.5, abs=1e-12)  # half of the saturation
    masks = np.stack([np.zeros_like(region), region])
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(0.1, abs=1e-12)  # PRO counts all 100 pixels


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_spro_matches_explicit_curve(seed: int, limit: float):
    rng = np.random.default_rng(seed)
    masks, maps = random_pixels(rng, decimals=1 if seed % 2 else 2)
    regions = random_regions(rng, masks)
    assert spro(regions, maps, fpr_limit=limit) == pytest.approx(
        reference_spro(regions, maps, limit), abs=1e-9
    )


def test_spro_with_full_saturation_equals_aupro_on_its_normals():
    # regions = components and saturation = area make sPRO the PRO curve with FPR on the good images only
    rng = np.random.default_rng(7)
    masks, maps = random_pixels(rng)
    regions = [
        [(labels == k, float(np.sum(labels == k))) for k in range(1, count + 1)]
        for labels, count in (ndimage.label(m, structure=np.ones((3, 3))) for m in masks)
    ]
    good = ~masks.any(axis=(1, 2))
    restricted = np.where(good[:, None, None], maps, -1.0)  # anomalous images' normals never fire
    restricted[masks] = maps[masks]
    n_good = good.sum() * masks[0].size
    n_all = (~masks).sum()
    # FPR over all negatives = FPR over good pixels * n_good / n_all while the -1 pixels stay below t
    limit = 0.3
    expected = aupro(masks, restricted, fpr_limit=limit * n_good / n_all)
    assert spro(regions, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("regions", "message"),
    [
        ([[], []], "at least one annotated region"),
        ([[(_mask([1, 0]), 1.0)], [(_mask([0, 1]), 1.0)]], "anomaly-free"),
        ([[]], "entries"),
        ([[], [(_mask([0, 0]), 1.0)]], "empty"),
        ([[], [(_mask([1, 0]), 0.0)]], "positive"),
        ([[], [(_mask([1, 0, 0]), 1.0)]], "shape"),
        ([[], [_mask([1, 0])]], "pair"),
    ],
)
def test_spro_rejects_degenerate_input(regions, message):
    maps = np.array([[[0.1, 0.2]], [[0.3, 0.4]]])
    with pytest.raises(ValueError, match=message):
        spro(regions, maps)


# ----------------------------------------------------------------------------- anomaly_metrics


def test_anomaly_metrics_computes_what_it_can():
    rng = np.random.default_rng(8)
    masks, maps = random_pixels(rng)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    regions = random_regions(rng, masks)
    full = anomaly_metrics(labels, scores, masks, maps, regions)
    assert tuple(full) == METRIC_NAMES
    assert full["image_auroc"] == image_auroc(labels, scores)
    assert full["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert full["pixel_f1_max"] == pytest.approx(pixel_f1_max(masks, maps), abs=1e-12)
    assert full["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert full["spro"] == pytest.approx(spro(regions, maps), abs=1e-12)

    image_only = anomaly_metrics(labels, scores)
    assert image_only["image_f1_max"] is not None
    assert all(image_only[k] is None for k in ("pixel_auroc", "pixel_f1_max", "aupro", "spro"))
    no_pixels = anomaly_metrics(labels, scores, np.zeros_like(masks), maps, [[] for _ in masks])
    assert all(no_pixels[k] is None for k in ("pixel_auroc", "pixel_f1_max", "aupro", "spro"))
    one_class = anomaly_metrics(np.ones_like(labels), scores, masks, maps)
    assert one_class["image_auroc"] is None and one_class["image_f1_max"] is None
    assert one_class["pixel_auroc"] is not None


def test_anomaly_metrics_still_rejects_malformed_input():
    masks, maps = random_pixels(np.random.default_rng(9))
    labels = masks.any(axis=(1, 2)).astype(int)
    with pytest.raises(ValueError, match="NaN"):
        anomaly_metrics(labels, np.full(labels.shape, np.nan))
    with pytest.raises(ValueError, match="shapes"):
        anomaly_metrics(labels, maps.max(axis=(1, 2)), masks[:, :4], maps)
    with pytest.raises(ValueError, match="images for"):
        anomaly_metrics(labels[:-1], maps.max(axis=(1, 2))[:-1], masks, maps)


# ----------------------------------------------------------------------------- loco_regions


def _write_mask(path: Path, shape: tuple[int, int], box: tuple[int, int, int, int], value: int) -> None:
    array = np.zeros(shape, dtype=np.uint8)
    y0, y1, x0, x1 = box
    array[y0:y1, x0:x1] = value
    Image.fromarray(array).save(path)


@pytest.fixture
def loco_folder(tmp_path: Path) -> tuple[Path, list[dict]]:
    folder = tmp_path / "ground_truth" / "logical_anomalies" / "000"
    folder.mkdir(parents=True)
    _write_mask(folder / "000.png", (40, 60), (2, 6, 4, 10), 255)  # 24 px
    _write_mask(folder / "001.png", (40, 60), (10, 20, 20, 30), 200)  # 100 px
    config = [
        {
            "defect_name": "missing",
            "pixel_value": 255,
            "saturation_threshold": 0.5,
            "relative_saturation": True,
        },
        {
            "defect_name": "extra",
            "pixel_value": 200,
            "saturation_threshold": 30,
            "relative_saturation": False,
        },
    ]
    (tmp_path / "defects_config.json").write_text(json.dumps(config))
    return folder, json.loads((tmp_path / "defects_config.json").read_text())


def test_loco_regions_saturations(loco_folder):
    folder, config = loco_folder
    regions = loco_regions(folder, config)
    assert len(regions) == 2
    (first, sat_first), (second, sat_second) = regions
    assert first.dtype == np.bool_ and first.shape == (40, 60) and first.sum() == 24
    assert second.sum() == 100
    assert sat_first == 12.0  # relative: 0.5 * 24
    assert sat_second == 30.0  # absolute pixels
    config[1]["saturation_threshold"] = 500
    assert loco_regions(folder, config)[1][1] == 100.0  # capped at the area


def test_loco_regions_resized(loco_folder):
    folder, config = loco_folder
    full = loco_regions(folder, config)
    regions = loco_regions(folder, config, size=20)
    for (mask, _), (full_mask, _) in zip(regions, full, strict=True):
        np.testing.assert_array_equal(mask, resize_mask(full_mask, 20))
    assert regions[0][1] == 0.5 * regions[0][0].sum()
    assert regions[1][1] == pytest.approx(min(30 * (20 * 20) / (40 * 60), regions[1][0].sum()))
    assert math.isclose(regions[1][1], 5.0)


def test_loco_regions_unknown_value_names_the_file(loco_folder):
    folder, config = loco_folder
    _write_mask(folder / "002.png", (40, 60), (30, 35, 0, 5), 100)
    with pytest.raises(DataError, match="002.png"):
        loco_regions(folder, config)


def test_loco_regions_rejects_mixed_values_and_vanishing_regions(loco_folder):
    folder, config = loco_folder
    _write_mask(folder / "000.png", (40, 60), (0, 1, 0, 1), 255)  # one pixel: gone at 20 x 20
    with pytest.raises(DataError, match="000.png.*no pixels left"):
        loco_regions(folder, config, size=20)
    mixed = np.zeros((40, 60), dtype=np.uint8)
    mixed[0, 0], mixed[5, 5] = 255, 200
    Image.fromarray(mixed).save(folder / "000.png")
    with pytest.raises(DataError, match="one nonzero pixel value"):
        loco_regions(folder, config)


@pytest.mark.parametrize(
    "entry",
    [
        {"pixel_value": 255, "saturation_threshold": 1.0},
        {"pixel_value": 255, "saturation_threshold": 0, "relative_saturation": True},
        {"pixel_value": 255, "saturation_threshold": "1", "relative_saturation": True},
        {"pixel_value": 255.5, "saturation_threshold": 1.0, "relative_saturation": True},
        {"pixel_value": 255, "saturation_threshold": float("inf"), "relative_saturation": False},
    ],
)
def test_loco_regions_rejects_bad_config(loco_folder, entry):
    folder, _ = loco_folder
    with pytest.raises(DataError, match="defects_config"):
        loco_regions(folder, [entry])

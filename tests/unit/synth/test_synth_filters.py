from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from skimage import data

from kka_synth.config import FilterConfig
from kka_synth.synth import ProceduralRenderer
from kka_synth.synth.filters import (
    EditLocality,
    FilterError,
    MatchCountBand,
    apply_filters,
    build_filters,
    calibrate_filters,
    change_gray,
    restore_filters,
)
from kka_synth.types import Candidate, DefectSpec, Proposal, Verdict


def candidate(image: np.ndarray, mask: np.ndarray) -> Candidate:
    return Candidate("c0", 0, Proposal("prompt", "text"), "source-0", image, mask, "procedural")


@pytest.fixture(scope="module")
def band(object_normals) -> MatchCountBand:
    """A band calibrated on the first five objects; the other three are left for the tests."""
    return MatchCountBand().calibrate(object_normals[:5], np.random.default_rng(0))


def moderate_defect(source: np.ndarray, shape: str, tone: str, seed: int) -> Candidate:
    spec = DefectSpec("part", "defect", "", (0.0, 0.0, 1.0, 1.0), 0.03, shape, tone, 0.5)
    return candidate(*ProceduralRenderer().render(source, spec, np.random.default_rng(seed)))


def test_calibration_follows_the_documented_quantile_rule(band):
    assert band.calibrated
    assert len(band.near_copy_scores) == 5 and len(band.unrelated_scores) == 20
    assert band.high == pytest.approx(np.quantile(band.near_copy_scores, 0.02))
    assert band.low == pytest.approx(np.quantile(band.unrelated_scores, 0.98))
    assert 0.0 < band.low < band.high <= 1.0


@pytest.mark.parametrize(("shape", "tone"), [("blob", "darker"), ("crack", "brighter"), ("spot", "colour")])
def test_filters_accept_a_moderate_local_defect(band, object_normals, shape, tone):
    locality = EditLocality()
    for source in object_normals[5:]:
        render = moderate_defect(source, shape, tone, seed=0)
        verdict = band(source, render)
        assert verdict.ok and verdict.reason == "" and band.low < verdict.score < band.high
        assert locality(source, render).ok


def test_filters_reject_an_identical_copy(band, object_normals):
    source = object_normals[6]
    mask = np.zeros(source.shape[:2], dtype=bool)
    mask[40:60, 40:60] = True
    copy = candidate(source.copy(), mask)
    assert band(source, copy) == Verdict(False, 1.0, "near_copy")
    verdict = EditLocality()(source, copy)
    assert not verdict.ok and verdict.reason == "no_change"
    lenient = MatchCountBand.from_dict({**band.to_dict(), "reject_near_copy": False})
    assert lenient(source, copy) == Verdict(True, 1.0, "")


def test_filters_reject_an_unrelated_image(band, object_normals, brick):
    source = object_normals[6]
    mask = np.ones(source.shape[:2], dtype=bool)
    grass = np.ascontiguousarray(np.repeat(data.grass()[:128, :128, None], 3, axis=2))
    for other in (brick, grass, np.ascontiguousarray(source[::-1])):
        verdict = band(source, candidate(other, mask))
        assert not verdict.ok and verdict.reason == "broken_structure" and verdict.score <= band.low


def test_locality_rejects_a_render_changed_outside_its_mask(object_normals):
    source = object_normals[5]
    render = moderate_defect(source, "blob", "darker", seed=1)
    assert EditLocality()(source, render).ok
    spoiled = render.image.copy()
    spoiled[:, :64] = np.clip(spoiled[:, :64].astype(np.int16) + 40, 0, 255).astype(np.uint8)
    spoiled[render.mask] = render.image[render.mask]
    verdict = EditLocality()(source, candidate(spoiled, render.mask))
    assert not verdict.ok and verdict.reason == "change_outside_mask" and verdict.score < 0.9


def test_locality_score_by_hand():
    source = np.full((20, 20, 3), 100, dtype=np.uint8)
    render = source.copy()
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    render[5:10, 5:10] = 130  # 25 px x (30 - 2) excess inside
    render[15, 15] = 150  # 1 px x (50 - 2) excess outside
    verdict = EditLocality(min_inside=0.9, dilation=1)(source, candidate(render, mask))
    assert verdict.ok and verdict.score == pytest.approx(25 * 28 / (25 * 28 + 48))
    strict = EditLocality(min_inside=0.95, dilation=1)(source, candidate(render, mask))
    assert strict == Verdict(False, pytest.approx(verdict.score), "change_outside_mask")
    faint = source.copy()
    faint[5:10, 5:10] = 101
    assert EditLocality()(source, candidate(faint, mask)).reason == "no_change"
    assert EditLocality()(source, candidate(render, np.zeros_like(mask))).reason == "empty_mask"


def test_band_accepts_sources_without_or_with_few_keypoints():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    band = MatchCountBand(low=0.2, high=0.99)
    verdict = band(flat, candidate(flat.copy(), np.ones((64, 64), dtype=bool)))
    assert verdict.ok and verdict.reason == "no_keypoints" and np.isnan(verdict.score)
    triangle = flat.copy()  # an asymmetric dark triangle: a few distinctive keypoints
    cv2.fillPoly(triangle, [np.array([[20, 18], [44, 24], [30, 46]])], (30, 30, 30))
    band = MatchCountBand(low=0.2, high=0.99, min_keypoints=10, grid_step=0)
    assert 0 < len(band.describe(triangle)[0]) < 10
    verdict = band(triangle, candidate(triangle.copy(), np.ones((64, 64), dtype=bool)))
    assert verdict.ok and verdict.reason == "few_keypoints" and np.isfinite(verdict.score)
    with pytest.raises(FilterError, match="fewer than 10"):
        MatchCountBand(min_keypoints=10, grid_step=0).calibrate([flat, triangle], np.random.default_rng(0))


def test_band_state_round_trips_through_json(band, object_normals):
    state = json.loads(json.dumps(band.to_dict()))
    restored = MatchCountBand.from_dict(state)
    assert (restored.low, restored.high) == (band.low, band.high)
    assert restored.near_copy_scores == pytest.approx(band.near_copy_scores)
    source = object_normals[7]
    render = moderate_defect(source, "hole", "darker", seed=2)
    assert restored(source, render) == band(source, render)
    with pytest.raises(FilterError, match="missing field"):
        MatchCountBand.from_dict({"low": 0.1})


def test_overlapping_references_fall_back_to_the_unrelated_median(object_normals, monkeypatch):
    band = MatchCountBand()
    scores = iter([0.5, 0.6, 0.7] + [0.4, 0.55, 0.8, 0.9, 0.3, 0.2])

    def fake_ratio(source, render):
        return next(scores), 10

    monkeypatch.setattr(band, "match_ratio", fake_ratio)
    band.calibrate(object_normals[:3], np.random.default_rng(0))
    assert band.high == pytest.approx(np.quantile([0.5, 0.6, 0.7], 0.02))
    assert band.low == pytest.approx(np.median([0.4, 0.55, 0.8, 0.9, 0.3, 0.2]))
    # When even the unrelated median is not below the upper edge, the lower edge drops to 0.
    scores = iter([0.5, 0.6, 0.7] + [0.6, 0.65, 0.8, 0.9, 0.7, 0.75])
    band.calibrate(object_normals[:3], np.random.default_rng(0))
    assert band.low == 0.0 and band.high == pytest.approx(np.quantile([0.5, 0.6, 0.7], 0.02))


def test_change_gray_is_luma_for_gray_changes_and_noise_but_shows_hue(object_normals, brick):
    darker = (brick * 0.5).astype(np.uint8)
    assert np.array_equal(change_gray(brick, darker), cv2.cvtColor(darker, cv2.COLOR_RGB2GRAY))
    source = object_normals[0]
    noise = np.random.default_rng(0).normal(0.0, 1.0, source.shape)
    noisy = np.clip(np.rint(source + noise), 0, 255).astype(np.uint8)
    assert (change_gray(source, noisy) == cv2.cvtColor(noisy, cv2.COLOR_RGB2GRAY)).mean() > 0.99
    tinted = brick.copy()
    tinted[..., 2] = np.clip(tinted[..., 2].astype(np.int16) + 60, 0, 255)
    tinted[..., 0] = np.clip(tinted[..., 0].astype(np.int16) - 30, 0, 255)
    shift = change_gray(brick, tinted).astype(np.int16) - cv2.cvtColor(tinted, cv2.COLOR_RGB2GRAY)
    assert np.abs(shift).mean() > 20


def test_band_and_locality_reject_bad_input(band, object_normals):
    source = object_normals[5]
    with pytest.raises(FilterError, match="candidate.image"):
        band(source, candidate(source[:64], np.ones((64, 128), dtype=bool)))
    with pytest.raises(FilterError, match="candidate.mask"):
        EditLocality()(source, candidate(source, np.ones((10, 10), dtype=bool)))
    with pytest.raises(FilterError, match="not calibrated"):
        MatchCountBand()(source, candidate(source, np.ones(source.shape[:2], dtype=bool)))
    with pytest.raises(FilterError, match="at least 2"):
        MatchCountBand().calibrate([source], np.random.default_rng(0))
    with pytest.raises(FilterError, match="quantiles"):
        MatchCountBand(quantiles=(0.9, 0.1))


def test_build_calibrate_restore_and_apply(object_normals):
    filters = build_filters(FilterConfig())
    assert [f.name for f in filters] == ["locality", "match_band"]
    assert [f.name for f in build_filters(FilterConfig(match_band=False))] == ["locality"]
    assert build_filters(FilterConfig(match_band=False, locality=False)) == []
    ready = MatchCountBand(low=0.1, high=0.9)
    assert build_filters(FilterConfig(), band=ready)[1] is ready
    assert build_filters(FilterConfig(match_band=False), band=ready)[0].name == "locality"
    states = calibrate_filters(filters, object_normals[:4], np.random.default_rng(1))
    assert set(states) == {"match_band"}
    restored = restore_filters(build_filters(FilterConfig()), json.loads(json.dumps(states)))
    source = object_normals[6]
    render = moderate_defect(source, "spot", "darker", seed=3)
    verdicts = apply_filters(restored, source, render)
    assert set(verdicts) == {"locality", "match_band"}
    assert verdicts == apply_filters(filters, source, render)
    copy = candidate(source.copy(), render.mask)
    first_only = apply_filters(filters, source, copy, stop_at_rejection=True)
    assert list(first_only) == ["locality"] and first_only["locality"].reason == "no_change"
    grass = np.ascontiguousarray(np.repeat(data.grass()[:128, :128, None], 3, axis=2))
    assert (
        apply_filters(filters, source, candidate(grass, render.mask))["match_band"].reason
        == "broken_structure"
    )


def test_calibrated_band_tells_a_faint_local_defect_from_a_noisy_copy():
    from skimage import data as skdata

    from kka_synth.synth import ProceduralRenderer
    from kka_synth.types import REGIONS, DefectSpec

    gray = skdata.brick()
    crops = [
        np.repeat(gray[y : y + 128, x : x + 128, None], 3, axis=2)
        for y in (0, 200, 380)
        for x in (0, 190, 380)
    ]
    band = MatchCountBand().calibrate(crops, np.random.default_rng(0))
    assert band.tolerance is not None and band.tolerance > 0
    source = crops[0]
    spec = DefectSpec("brick", "crack", "", REGIONS["center"], 0.01, "crack", "darker", 0.3)
    image, mask = ProceduralRenderer().render(source, spec, np.random.default_rng(1))
    assert band(source, candidate(image, mask)).ok
    noisy = np.clip(source + np.random.default_rng(2).normal(0, 1.0, source.shape), 0, 255).astype(np.uint8)
    verdict = band(source, candidate(noisy, mask))
    assert not verdict.ok and verdict.reason == "near_copy"

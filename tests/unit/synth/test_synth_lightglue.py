from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
from tiny_lightglue import build_lightglue, save_tiny_lightglue  # noqa: E402

from kka_synth.config import FilterConfig
from kka_synth.synth import (
    LightGlueBand,
    MatchCountBand,
    apply_filters_batch,
    band_from_dict,
    build_band,
    build_filters,
    match_distribution,
    narrow_band,
    restore_filters,
)
from kka_synth.synth.filters import FilterError
from kka_synth.types import Candidate, Proposal, Verdict
from kka_synth.utils.hub import ModelLoadError


def candidate(image: np.ndarray, mask: np.ndarray | None = None) -> Candidate:
    return Candidate("c0", 0, Proposal("prompt", "text"), "source-0", image, mask, "edit")


def painted_blob(image: np.ndarray, centre: tuple[int, int], colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` with a filled disc over 3% of its area."""
    radius = round(math.sqrt(0.03 * image.shape[0] * image.shape[1] / math.pi))
    out = image.copy()
    cv2.circle(out, centre, radius, colour, -1)
    return out


def scrambled(image: np.ndarray, block: int = 16, seed: int = 0) -> np.ndarray:
    """``image`` cut into ``block``-pixel tiles that are shuffled."""
    rows, cols = image.shape[0] // block, image.shape[1] // block
    tiles = image.reshape(rows, block, cols, block, 3).swapaxes(1, 2).reshape(rows * cols, block, block, 3)
    tiles = tiles[np.random.default_rng(seed).permutation(len(tiles))]
    return np.ascontiguousarray(
        tiles.reshape(rows, cols, block, block, 3).swapaxes(1, 2).reshape(image.shape)
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(save_tiny_lightglue(tmp_path_factory.mktemp("lightglue")))


@pytest.fixture(scope="module")
def band(model_dir, normals) -> LightGlueBand:
    """Calibrated on five brick crops; the other four are left for the tests."""
    return LightGlueBand(model=model_dir, device="cpu", max_pairs=12).calibrate(
        normals[:5], np.random.default_rng(0)
    )


def test_calibration_follows_the_shared_quantile_rule(band):
    assert len(band.near_copy_scores) == 5 and len(band.unrelated_scores) == 12
    assert band.high == pytest.approx(np.quantile(band.near_copy_scores, 0.02))
    assert band.low == pytest.approx(np.quantile(band.unrelated_scores, 0.98))
    # shifted, rotated, jittered and noisy copies keep most matches; other crops of the texture do not
    assert min(band.near_copy_scores) > 0.9 and max(band.unrelated_scores) < 0.6
    assert 0.0 < band.low < band.high < 1.0


def test_tiny_matcher_is_seeded():
    first, second = build_lightglue().state_dict(), build_lightglue().state_dict()
    assert first.keys() == second.keys() and all(first[k].equal(second[k]) for k in first)


def test_band_rejects_a_copy_and_a_scramble_and_accepts_local_edits(band, normals):
    for source in normals[5::2]:
        assert band(source, candidate(source.copy())) == Verdict(False, 1.0, "near_copy")
        verdict = band(source, candidate(scrambled(source)))
        assert not verdict.ok and verdict.reason == "broken_structure" and verdict.score <= band.low
        edits = [
            painted_blob(source, centre, colour)
            for centre in ((64, 64), (40, 90), (90, 40))
            for colour in ((40, 40, 40), (210, 210, 210), (200, 60, 60))
        ]
        for score, count in band.match_ratios([(source, edit) for edit in edits]):
            assert band.judge(score, count) == Verdict(True, score, "") and band.low < score < band.high


def test_batched_matching_equals_matching_one_pair_at_a_time(band, normals):
    small = [cv2.resize(n, (96, 96), interpolation=cv2.INTER_AREA) for n in normals[5:7]]
    pairs = [
        (normals[5], painted_blob(normals[5], (64, 64), (40, 40, 40))),
        (small[0], small[1]),
        (normals[6], normals[7]),
        (small[1], small[1].copy()),
        (normals[8], scrambled(normals[8])),
    ]
    batched = band.match_ratios(pairs)
    single = LightGlueBand.from_dict(band.to_dict(), device="cpu", batch_size=1)
    assert batched == [single.match_ratio(*pair) for pair in pairs]
    assert batched[3] == (1.0, batched[3][1]) and batched[3][1] > 0
    assert all(isinstance(count, int) and count >= band.min_keypoints for _, count in batched)


def test_state_round_trips_through_json_with_identical_verdicts(band, normals):
    state = json.loads(json.dumps(band.to_dict()))
    assert state["matcher"] == "lightglue" and "device" not in state
    restored = band_from_dict(state)
    assert isinstance(restored, LightGlueBand) and restored.model is band.model  # one shared model
    assert (restored.low, restored.high) == (band.low, band.high)
    assert restored.near_copy_scores == pytest.approx(band.near_copy_scores)
    source = normals[7]
    renders = [source.copy(), scrambled(source), painted_blob(source, (50, 70), (30, 30, 30))]
    assert [restored(source, candidate(r)) for r in renders] == [band(source, candidate(r)) for r in renders]
    with pytest.raises(FilterError, match="missing field"):
        LightGlueBand.from_dict({"matcher": "lightglue", "low": 0.1})
    with pytest.raises(FilterError, match="lightglue matcher, not sift"):
        MatchCountBand.from_dict(state)
    with pytest.raises(FilterError, match="filters.matcher is sift"):
        band_from_dict(state, FilterConfig())


def test_a_state_without_matcher_is_a_sift_band():
    state = MatchCountBand(low=0.2, high=0.9).to_dict()
    assert state.pop("matcher") == "sift"
    restored = band_from_dict(state)
    assert isinstance(restored, MatchCountBand) and (restored.low, restored.high) == (0.2, 0.9)


def test_missing_model_dir_names_the_field_and_the_offline_profile(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match=r"filters\.matcher_model.*--profile offline"):
        LightGlueBand(model=missing)
    with pytest.raises(ModelLoadError, match=r"filters\.matcher_model"):
        build_band(FilterConfig(matcher="lightglue", matcher_model=missing))


def test_build_band_picks_the_matcher_from_config(model_dir, band, normals):
    assert isinstance(build_band(FilterConfig()), MatchCountBand)
    config = FilterConfig(matcher="lightglue", matcher_model=model_dir, matcher_device="cpu")
    built = build_band(
        FilterConfig(
            matcher="lightglue", matcher_model=model_dir, matcher_device="cpu", band_quantiles=(0.1, 0.9)
        )
    )
    assert isinstance(built, LightGlueBand) and built.quantiles == (0.1, 0.9) and built.device.type == "cpu"
    filters = build_filters(config)
    assert [f.name for f in filters] == ["locality", "match_band"] and isinstance(filters[1], LightGlueBand)
    restored = restore_filters(filters, {"match_band": band.to_dict()})
    assert restored[1].model_name == model_dir and restored[1].high == band.high


def test_shared_verdict_rules_on_the_lightglue_band(band):
    assert band.judge(float("nan"), 0).reason == "no_keypoints"
    assert band.judge(0.5, band.min_keypoints - 1) == Verdict(True, 0.5, "few_keypoints")
    assert band.rejudge(Verdict(True, 0.99, "few_keypoints")) == Verdict(True, 0.99, "few_keypoints")
    assert band.rejudge(Verdict(True, 0.99, "")).reason == "near_copy"
    with pytest.raises(FilterError, match="threshold"):
        LightGlueBand(model="unused", threshold=1.5)


def test_narrow_band_takes_the_batch_quantiles_by_hand():
    band = MatchCountBand(quantiles=(0.25, 0.75), low=0.2, high=0.9)
    scores = [0.1, 0.3, 0.5, 0.7, 0.95, float("nan")]
    narrowed = narrow_band(band, scores)  # quantiles of [0.1, 0.3, 0.5, 0.7, 0.95]: q25 = 0.3, q75 = 0.7
    assert (narrowed.low, narrowed.high) == pytest.approx((0.3, 0.7)) and (band.low, band.high) == (0.2, 0.9)
    assert [narrowed.judge(s, 10).reason for s in scores[:5]] == [
        "broken_structure",
        "broken_structure",
        "",
        "near_copy",
        "near_copy",
    ]
    wide = narrow_band(band, [0.05, 0.1, 0.98, 0.99, 0.995])  # q25 = 0.1 < low, q75 = 0.99 > high
    assert (wide.low, wide.high) == (0.2, 0.9)
    assert (narrow_band(band, [0.5]).low, narrow_band(band, [0.5, 0.5, 0.5]).high) == (0.2, 0.9)


def test_apply_filters_batch_narrows_the_band_to_the_batch(band, normals):
    band = LightGlueBand.from_dict({**band.to_dict(), "quantiles": [0.25, 0.75]}, device="cpu")
    source = normals[6]
    renders = [painted_blob(source, c, (40, 40, 40)) for c in ((30, 30), (64, 64), (98, 98), (30, 98))]
    renders += [source.copy(), scrambled(source)]
    candidates = [candidate(r) for r in renders]
    sources = [source] * len(renders)
    plain = apply_filters_batch([band], sources, candidates)
    assert [v["match_band"] for v in plain] == [band(source, c) for c in candidates]
    scores = [v["match_band"].score for v in plain]
    narrowed = apply_filters_batch([band], sources, candidates, batch_band=True)
    expected = narrow_band(band, scores)
    assert expected.high < band.high and expected.low > band.low
    assert [v["match_band"] for v in narrowed] == [expected.judge(s, band.min_keypoints) for s in scores]
    # locality needs a mask: it skips candidates without one
    locality = build_filters(FilterConfig(match_band=False))
    assert apply_filters_batch(locality, sources[:1], candidates[:1]) == [{}]


def test_match_distribution_by_hand():
    summary = match_distribution([0.0, 0.05, 0.25, 0.5, 1.0, float("nan")])
    assert summary["count"] == 5 and summary["nan"] == 1
    # linear interpolation on [0, 0.05, 0.25, 0.5, 1]: q05 at position 0.2, q95 at position 3.8
    assert summary["quantiles"] == pytest.approx(
        {"q05": 0.01, "q25": 0.05, "q50": 0.25, "q75": 0.5, "q95": 0.9}
    )
    assert summary["histogram"]["edges"] == pytest.approx([i / 10 for i in range(11)])
    assert summary["histogram"]["counts"] == [2, 0, 1, 0, 0, 1, 0, 0, 0, 1]
    assert json.loads(json.dumps(summary)) == summary
    empty = match_distribution([float("nan")])
    assert empty["count"] == 0 and empty["nan"] == 1 and set(empty["quantiles"].values()) == {None}
    assert sum(empty["histogram"]["counts"]) == 0
    with pytest.raises(FilterError, match=r"\[0, 1\]"):
        match_distribution([0.5, 1.2])

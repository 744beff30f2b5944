"""The hard/easy rule, K-fold cross-fitting and the frozen judge."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from kka_synth.alignment import hardness as hardness_module
from kka_synth.alignment.deepsad import DeepSADEvaluator, EvaluatorInputError
from kka_synth.alignment.hardness import (
    SCALE_FLOOR,
    HardnessRule,
    JudgeEvaluator,
    assign_folds,
    cross_fit_hardness,
)
from kka_synth.config import EvaluatorConfig

SMALL = EvaluatorConfig(pretrain_epochs=4, epochs=8, size=64, crop=None)
FAST = {"size": 32, "channels": (8, 16, 16)}


def _key(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


def test_rule_threshold_scale_and_hardness_by_hand() -> None:
    scores = np.arange(1.0, 21.0)  # 1, 2, ..., 20
    rule = HardnessRule.calibrate(scores, 0.95)
    # numpy's linear quantile: position 0.95 * 19 = 18.05 -> 19 + 0.05 * (20 - 19)
    assert rule.threshold == pytest.approx(19.05)
    # quartiles at positions 4.75 and 14.25 -> 5.75 and 15.25; IQR 9.5
    assert rule.scale == pytest.approx(9.5 / 1.349)
    hardness = rule.hardness(np.array([19.05, 10.0, 30.0]))
    np.testing.assert_allclose(hardness, [0.0, 9.05 / (9.5 / 1.349), -10.95 / (9.5 / 1.349)])
    assert list(hardness > 0) == [False, True, False]  # at the threshold exactly is easy


def test_rule_scale_is_floored() -> None:
    rule = HardnessRule.calibrate(np.full(10, 4.0), 0.95)
    assert rule.threshold == pytest.approx(4.0)
    assert rule.scale == pytest.approx(SCALE_FLOOR * 4.0)
    with pytest.raises(EvaluatorInputError, match="at least 2 finite"):
        HardnessRule.calibrate(np.array([1.0]), 0.95)


def test_assign_folds_is_balanced_and_seeded() -> None:
    fold = assign_folds(11, 3, np.random.default_rng(7))
    assert fold.shape == (11,) and sorted(np.bincount(fold)) == [3, 4, 4]
    np.testing.assert_array_equal(fold, assign_folds(11, 3, np.random.default_rng(7)))
    assert not np.array_equal(fold, assign_folds(11, 3, np.random.default_rng(8)))


class _Recording(DeepSADEvaluator):
    """Records which images each fold's model was trained on and which it scored."""

    log: list[dict[str, set[str]]] = []

    def fit(self, normal, anomalies=None, anomaly_masks=None):  # type: ignore[override]
        self.record = {"fit": {_key(im) for im in [*normal, *(anomalies or [])]}, "scored": set()}
        _Recording.log.append(self.record)
        return super().fit(normal, anomalies, anomaly_masks)

    def pretrain(self, normal):  # type: ignore[override]
        _Recording.log.append({"pretrain": {_key(im) for im in normal}})
        return super().pretrain(normal)

    def score(self, images):  # type: ignore[override]
        self.record["scored"] |= {_key(im) for im in images}
        return super().score(images)


def test_cross_fit_never_scores_a_candidate_with_a_model_that_saw_it(
    brick_sets: dict[str, list[np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hardness_module, "DeepSADEvaluator", _Recording)
    _Recording.log = []
    anomalies = brick_sets["anomalies"][:9]
    masks = brick_sets["masks"][:9]
    config = EvaluatorConfig(pretrain_epochs=2, epochs=2, folds=3, size=64, crop=None)
    result = cross_fit_hardness(
        brick_sets["normals"][:8], brick_sets["holdout"][:6], anomalies, masks, config, seed=0, **FAST
    )
    candidates = {_key(im) for im in anomalies}
    holdout = {_key(im) for im in brick_sets["holdout"][:6]}
    pretrain, *folds = _Recording.log
    assert pretrain["pretrain"].isdisjoint(candidates | holdout)  # the shared autoencoder saw normals only
    assert len(folds) == 3 and sorted(np.bincount(result.fold)) == [3, 3, 3]
    scored_candidates: list[str] = []
    for k, record in enumerate(folds):
        assert record["fit"].isdisjoint(holdout)
        mine = record["scored"] & candidates
        assert mine == {_key(anomalies[i]) for i in np.flatnonzero(result.fold == k)}
        assert mine.isdisjoint(record["fit"])  # never scored by a model trained on it
        assert len(record["fit"] & candidates) == 6  # trained on the other two folds
        scored_candidates.extend(mine)
    assert sorted(scored_candidates) == sorted(candidates)  # each candidate scored exactly once
    assert len(result.rules) == 3 and all(len(s) == 6 for s in result.holdout_scores)


def test_rule_calls_unchanged_images_hard_and_obvious_ones_easy(
    brick_sets: dict[str, list[np.ndarray]],
) -> None:
    candidates = brick_sets["unchanged"] + brick_sets["obvious"]
    masks = brick_sets["unchanged_masks"] + brick_sets["obvious_masks"]
    result = cross_fit_hardness(
        brick_sets["normals"], brick_sets["holdout"], candidates, masks, SMALL, seed=0
    )
    assert result.hardness.shape == (14,) and result.hard.dtype == bool
    np.testing.assert_array_equal(result.hard, result.hardness > 0)
    unchanged, obvious = result.hardness[:6], result.hardness[6:]
    assert (unchanged > 0).sum() >= 4 and np.median(unchanged) > 0  # ~5% of normals exceed the 95th pct
    assert (obvious <= 0).all()
    assert unchanged.min() > obvious.max()
    assert result.labels[6:] == ["easy"] * 8
    assert result.hard_share == pytest.approx(result.hard.mean())


def test_cross_fit_edge_cases(brick_sets: dict[str, list[np.ndarray]]) -> None:
    normals, holdout = brick_sets["normals"][:8], brick_sets["holdout"][:4]
    empty = cross_fit_hardness(normals, holdout, [], None, SMALL, seed=0, **FAST)
    assert empty.hardness.shape == (0,) and empty.hard_share == 0.0
    single = cross_fit_hardness(normals, holdout, brick_sets["obvious"][:1], None, SMALL, seed=0, **FAST)
    assert single.fold.tolist() == [0] and len(single.rules) == 1
    with pytest.raises(EvaluatorInputError, match="masks has 2 entries for 1 anomalies"):
        cross_fit_hardness(normals, holdout, brick_sets["obvious"][:1], [None, None], SMALL, seed=0)
    with pytest.raises(EvaluatorInputError, match="holdout must hold at least 2"):
        cross_fit_hardness(normals, holdout[:1], brick_sets["obvious"][:1], None, SMALL, seed=0)
    with pytest.raises(EvaluatorInputError, match=r"holdout\[0\]"):
        cross_fit_hardness(normals, [holdout[0][..., :2], holdout[1]], [], None, SMALL, seed=0)


def test_judge_is_frozen_and_round_trips(brick_sets: dict[str, list[np.ndarray]], tmp_path) -> None:
    judge = JudgeEvaluator(SMALL, seed=0, **FAST)
    with pytest.raises(RuntimeError, match="before fit"):
        judge.hardness(brick_sets["obvious"])
    judge.fit(
        brick_sets["normals"][:16],
        brick_sets["anomalies"][:6],
        brick_sets["masks"][:6],
        brick_sets["holdout"],
    )
    images = brick_sets["unchanged"] + brick_sets["obvious"]
    first = judge.hardness(images)
    again = judge.hardness(images)
    np.testing.assert_array_equal(first.hardness, again.hardness)  # frozen: no refit between calls
    assert first.fold.tolist() == [0] * 14 and first.thresholds == [judge.rule.threshold]
    assert (first.hardness[6:] <= 0).all()
    with pytest.raises(RuntimeError, match="frozen"):
        judge.fit(brick_sets["normals"][:16], [], None, brick_sets["holdout"])
    judge.save(tmp_path / "judge")
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["judge.json", "judge.safetensors"]
    loaded = JudgeEvaluator.load(tmp_path / "judge")
    assert loaded.rule == judge.rule and loaded.config == judge.config
    np.testing.assert_array_equal(loaded.holdout_scores, judge.holdout_scores)
    np.testing.assert_array_equal(loaded.hardness(images).hardness, first.hardness)
    with pytest.raises(FileNotFoundError, match="no judge"):
        JudgeEvaluator.load(tmp_path / "missing")
    (tmp_path / "judge" / "judge.json").write_text("{}")
    with pytest.raises(EvaluatorInputError, match="not a valid judge rule file"):
        JudgeEvaluator.load(tmp_path / "judge")

"""How hard a kept candidate is, and the fixed rule that calls it hard or easy.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
labels a generated anomaly hard when a Deep SAD model (Ruff et al., ICLR 2020) trained on normal images and
the generated anomalies still scores it like a normal image. This module supplies that stage.

The rule, fixed before any run:

- ``t`` is the ``config.hard_quantile`` (default 0.95) quantile of the anomaly scores of *held-out* normal
  images (never used for training) under the same model that scores the candidate.
- ``s`` is a robust scale of those held-out scores: ``IQR / 1.349`` (the standard deviation of a normal
  distribution with that IQR), floored at ``SCALE_FLOOR`` times the median held-out score (and at 1e-12) so
  a degenerate spread cannot blow hardness up.
- ``hardness = (t - score) / s``. Higher hardness means harder, i.e. closer to normal.
- A candidate is HARD when ``hardness > 0`` (it scores below the 95th percentile of held-out normals, so
  the evaluator cannot tell it from a normal image) and EASY otherwise.

Two ways to apply it:

``config.name`` picks the model: ``deepsad-cnn`` is the patch-level Deep SAD trained from scratch
(:mod:`kka_synth.alignment.deepsad`), ``deepsad-dinov2`` a Deep SAD head on frozen DINOv2 features
(:mod:`kka_synth.alignment.feature_sad`). Both give one anomaly score per image, so the rule is the same.

- :func:`cross_fit_hardness` refits Deep SAD each iteration with K-fold cross-fitting: the candidates are
  split into ``config.folds`` folds and each fold is scored by a fresh model fitted on the normal images
  plus the *other* folds' candidates, so no candidate is scored by a model trained on it. The autoencoder
  pretraining sees normal images only, so it is shared by the folds.
- :class:`JudgeEvaluator` is a Deep SAD fitted once on normal images plus caller-given rule-based anomalies
  and then frozen; it scores every iteration with the same threshold and scale, so hard shares compare
  across iterations without the evaluator moving the goalposts. It saves to and loads from a folder
  (``judge.safetensors`` + ``judge.json``, which records the evaluator's name).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.alignment.deepsad import DeepSADEvaluator, EvaluatorInputError, check_images
from kka_synth.alignment.feature_sad import FeatureDeepSADEvaluator
from kka_synth.config import EVALUATORS, EvaluatorConfig

logger = logging.getLogger(__name__)

SCALE_FLOOR = 0.01
"""The scale ``s`` is at least this share of the median held-out normal score."""

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_RULE = "judge.json"

ConfusionModel = DeepSADEvaluator | FeatureDeepSADEvaluator


def evaluator_class(name: str) -> type[DeepSADEvaluator] | type[FeatureDeepSADEvaluator]:
    """The evaluator class of ``EvaluatorConfig.name`` (looked up when called)."""
    classes = {"deepsad-cnn": DeepSADEvaluator, "deepsad-dinov2": FeatureDeepSADEvaluator}
    if name not in classes:
        raise EvaluatorInputError(f"evaluator name must be one of {', '.join(EVALUATORS)}, got {name!r}")
    return classes[name]


@dataclass(frozen=True)
class HardnessRule:
    """The calibrated rule of one model: ``hardness = (threshold - score) / scale``; hard when > 0."""

    threshold: float
    scale: float
    quantile: float

    @classmethod
    def calibrate(cls, holdout_scores: np.ndarray, quantile: float) -> HardnessRule:
        """Set ``threshold`` and ``scale`` from the held-out normal images' scores (N,)."""
        scores = np.asarray(holdout_scores, dtype=np.float64)
        if scores.ndim != 1 or len(scores) < 2 or not np.isfinite(scores).all():
            raise EvaluatorInputError(
                f"holdout scores must be at least 2 finite numbers, got shape {scores.shape}"
            )
        threshold = float(np.quantile(scores, quantile))
        q25, q75 = np.quantile(scores, [0.25, 0.75])
        floor = max(SCALE_FLOOR * abs(float(np.median(scores))), 1e-12)
        return cls(threshold=threshold, scale=max(float(q75 - q25) / 1.349, floor), quantile=quantile)

    def hardness(self, scores: np.ndarray) -> np.ndarray:
        """(N,) float64 hardness of anomaly scores (N,)."""
        return (self.threshold - np.asarray(scores, dtype=np.float64)) / self.scale

    def to_dict(self) -> dict[str, float]:
        return {"threshold": self.threshold, "scale": self.scale, "quantile": self.quantile}


@dataclass
class HardnessResult:
    """Hardness of M candidates and how it was obtained."""

    hardness: np.ndarray
    """(M,) float64; higher = harder = closer to normal."""
    hard: np.ndarray
    """(M,) bool; ``hardness > 0``."""
    scores: np.ndarray
    """(M,) float64 raw Deep SAD anomaly scores."""
    fold: np.ndarray
    """(M,) int64: the fold, i.e. the model, that scored each candidate."""
    rules: list[HardnessRule] = field(default_factory=list)
    """One calibrated rule per fold."""
    holdout_scores: list[np.ndarray] = field(default_factory=list)
    """Per fold, (N_holdout,) float64 scores of the held-out normal images."""

    @property
    def thresholds(self) -> list[float]:
        return [rule.threshold for rule in self.rules]

    @property
    def scales(self) -> list[float]:
        return [rule.scale for rule in self.rules]

    @property
    def labels(self) -> list[str]:
        """Per candidate, "hard" or "easy"."""
        return ["hard" if flag else "easy" for flag in self.hard]

    @property
    def hard_share(self) -> float:
        """Share of candidates that are hard (0.0 when there are none)."""
        return float(self.hard.mean()) if len(self.hard) else 0.0


def assign_folds(count: int, folds: int, rng: np.random.Generator) -> np.ndarray:
    """(count,) int64 fold of each item: a random permutation dealt round-robin (sizes differ by <= 1)."""
    fold = np.empty(count, dtype=np.int64)
    fold[rng.permutation(count)] = np.arange(count) % folds
    return fold


def _check_masks(masks: Sequence[np.ndarray | None] | None, count: int) -> list[np.ndarray | None]:
    if masks is None:
        return [None] * count
    if len(masks) != count:
        raise EvaluatorInputError(f"masks has {len(masks)} entries for {count} anomalies")
    return list(masks)


def _check_holdout(holdout: Sequence[np.ndarray]) -> None:
    check_images(holdout, "holdout")
    if len(holdout) < 2:
        raise EvaluatorInputError(f"holdout must hold at least 2 normal images, got {len(holdout)}")


def cross_fit_hardness(
    normals: Sequence[np.ndarray],
    holdout: Sequence[np.ndarray],
    anomalies: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None] | None,
    config: EvaluatorConfig,
    seed: int,
    **evaluator_kwargs: Any,
) -> HardnessResult:
    """Hardness of every anomaly by K-fold cross-fitted Deep SAD (see the module docstring for the rule).

    ``normals`` train every fold's model; ``holdout`` normals are only scored, to calibrate each fold's
    rule; ``masks`` (bool (H, W) or None per anomaly) label the defect patches. With fewer anomalies than
    ``config.folds``, each anomaly is its own fold. ``evaluator_kwargs`` go to the class ``config.name``
    names (:class:`DeepSADEvaluator` or :class:`FeatureDeepSADEvaluator`).
    """
    check_images(normals, "normals")
    _check_holdout(holdout)
    check_images(anomalies, "anomalies")
    masks = _check_masks(masks, len(anomalies))
    count = len(anomalies)
    if count == 0:
        logger.warning("cross_fit_hardness got no anomalies; nothing to score")
        empty = np.zeros(0, dtype=np.float64)
        return HardnessResult(empty, np.zeros(0, dtype=bool), empty, np.zeros(0, dtype=np.int64))
    folds = min(config.folds, count)
    fold = assign_folds(count, folds, np.random.default_rng(seed))
    base = evaluator_class(config.name)(config, seed=seed, **evaluator_kwargs).pretrain(normals)
    scores = np.zeros(count, dtype=np.float64)
    hardness = np.zeros(count, dtype=np.float64)
    rules: list[HardnessRule] = []
    holdout_scores: list[np.ndarray] = []
    for k in range(folds):
        train = np.flatnonzero(fold != k)
        test = np.flatnonzero(fold == k)
        model = base.clone().fit(normals, [anomalies[i] for i in train], [masks[i] for i in train])
        normal_scores = model.score(holdout)
        rule = HardnessRule.calibrate(normal_scores, config.hard_quantile)
        scores[test] = model.score([anomalies[i] for i in test])
        hardness[test] = rule.hardness(scores[test])
        rules.append(rule)
        holdout_scores.append(normal_scores)
        logger.debug(
            "fold %d: %d train, %d scored, threshold %.4f, scale %.4f",
            k,
            len(train),
            len(test),
            rule.threshold,
            rule.scale,
        )
    result = HardnessResult(hardness, hardness > 0, scores, fold, rules, holdout_scores)
    logger.info(
        "cross-fitted hardness of %d candidates over %d folds: hard share %.3f",
        count,
        folds,
        result.hard_share,
    )
    return result


class JudgeEvaluator:
    """A Deep SAD fitted once and then frozen, plus its calibrated rule: one yardstick for every iteration.

    ``config.name`` picks the evaluator class. ``JudgeEvaluator(config, seed=...)``, then
    ``fit(normals, anomalies, masks, holdout)`` once, then ``hardness(images)`` as often as needed;
    ``save`` / ``load`` keep it across a resumed run.
    """

    def __init__(self, config: EvaluatorConfig | None = None, *, seed: int = 0, **evaluator_kwargs: Any):
        self.config = config or EvaluatorConfig()
        self.evaluator: ConfusionModel = evaluator_class(self.config.name)(
            self.config, seed=seed, **evaluator_kwargs
        )
        self.rule: HardnessRule | None = None
        self.holdout_scores = np.zeros(0, dtype=np.float64)

    def fit(
        self,
        normals: Sequence[np.ndarray],
        anomalies: Sequence[np.ndarray],
        masks: Sequence[np.ndarray | None] | None,
        holdout: Sequence[np.ndarray],
    ) -> JudgeEvaluator:
        """Fit once on ``normals`` plus rule-based ``anomalies``, calibrate on ``holdout`` normals; freeze."""
        if self.rule is not None:
            raise RuntimeError("the judge is already fitted and frozen; build a new JudgeEvaluator to refit")
        _check_holdout(holdout)
        masks = _check_masks(masks, len(anomalies))
        self.evaluator.fit(normals, anomalies, masks)
        self.holdout_scores = self.evaluator.score(holdout)
        self.rule = HardnessRule.calibrate(self.holdout_scores, self.config.hard_quantile)
        logger.info("judge fitted: threshold %.4f, scale %.4f", self.rule.threshold, self.rule.scale)
        return self

    def hardness(self, images: Sequence[np.ndarray]) -> HardnessResult:
        """Hardness of ``images`` under the frozen model and rule (every image is in fold 0)."""
        if self.rule is None:
            raise RuntimeError("JudgeEvaluator.hardness called before fit")
        scores = self.evaluator.score(images)
        hardness = self.rule.hardness(scores)
        fold = np.zeros(len(scores), dtype=np.int64)
        return HardnessResult(hardness, hardness > 0, scores, fold, [self.rule], [self.holdout_scores])

    def save(self, directory: str | Path) -> Path:
        """Write ``judge.safetensors`` (the model) and ``judge.json`` (the rule) into ``directory``."""
        if self.rule is None:
            raise RuntimeError("JudgeEvaluator.save called before fit")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.evaluator.save(directory / JUDGE_WEIGHTS)
        data = {
            "evaluator": self.config.name,
            **self.rule.to_dict(),
            "holdout_scores": self.holdout_scores.tolist(),
        }
        tmp = directory / (JUDGE_RULE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(directory / JUDGE_RULE)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> JudgeEvaluator:
        """Read a judge written by :meth:`save`; it scores exactly as the saved one did."""
        directory = Path(directory)
        rule_path = directory / JUDGE_RULE
        if not rule_path.is_file():
            raise FileNotFoundError(f"no judge at {directory} (missing {JUDGE_RULE})")
        try:
            data = json.loads(rule_path.read_text())
            rule = HardnessRule(float(data["threshold"]), float(data["scale"]), float(data["quantile"]))
            holdout_scores = np.asarray(data["holdout_scores"], dtype=np.float64)
            name = str(data.get("evaluator", "deepsad-cnn"))  # judges saved before the name was recorded
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as error:
            raise EvaluatorInputError(f"{rule_path} is not a valid judge rule file: {error}") from None
        evaluator = evaluator_class(name).load(directory / JUDGE_WEIGHTS)
        judge = cls(evaluator.config)
        judge.evaluator, judge.rule, judge.holdout_scores = evaluator, rule, holdout_scores
        return judge

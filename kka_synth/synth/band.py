"""What every match-count band shares: input checks, the matcher's view of a change, and :class:`MatchBand`.

A match band ("Anomaly Detection by Effectively Leveraging Synthetic Images", arXiv 2512.23227) matches the
keypoints of a render's source to the render and keeps the render when the share of matched keypoints lies
strictly inside a band calibrated on normal images. :class:`MatchBand` holds the band's edges, its calibration
rule, its verdict rules and its saved state; the matchers themselves are
:class:`~kka_synth.synth.sift.MatchCountBand` (OpenCV SIFT) and
:class:`~kka_synth.synth.lightglue.LightGlueBand` (SuperPoint + LightGlue).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from kka_synth.types import Candidate, Verdict

logger = logging.getLogger(__name__)


class FilterError(ValueError):
    """A filter got input it cannot judge (wrong image type or shape, an uncalibrated band)."""


class Filter(Protocol):
    """Judges one render against its source; ``name`` keys its verdict in :func:`apply_filters`."""

    name: str

    def __call__(self, source: np.ndarray, candidate: Candidate) -> Verdict: ...


def check_rgb(image: object, field: str) -> np.ndarray:
    """``image`` if it is an RGB uint8 array (H, W, 3); FilterError naming ``field`` otherwise."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FilterError(f"{field} must be an RGB uint8 array (H, W, 3), got {kind}")
    return image


def check_images(
    source: object, render: object, field: str = "candidate.image"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a source and its render (RGB uint8 of one shape); return both."""
    source, render = check_rgb(source, "source"), check_rgb(render, field)
    if render.shape != source.shape:
        raise FilterError(f"{field} shape {render.shape} differs from the source's {source.shape}")
    return source, render


def _check_pair(source: object, candidate: Candidate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the source and the candidate's image and mask; return the three arrays."""
    source, image = check_images(source, candidate.image)
    mask = candidate.mask
    if not isinstance(mask, np.ndarray) or mask.shape != source.shape[:2]:
        raise FilterError(
            f"candidate.mask must be a bool array of shape {source.shape[:2]}, "
            f"got {getattr(mask, 'shape', type(mask).__name__)}"
        )
    return source, image, mask.astype(bool)


CHROMA_DEADZONE = 5.0
"""Chroma change, in grey levels, that :func:`change_gray` ignores: sensor noise of one grey level per channel
exceeds it with probability about 4e-6."""

CHROMA_GAIN = 2.0
"""Grey levels of brightness that one level of chroma change beyond the dead zone counts as. With 2, moderate
colour defects from the procedural renderer pass the match band as often as darker or brighter ones."""


def change_gray(source: np.ndarray, render: np.ndarray) -> np.ndarray:
    """The render's grayscale as the matcher sees it: its luma, plus the chroma change shown as brightness.

    Plain luma barely shows a hue-only change. Per pixel the chroma change (the length of the RGB change once
    its grey part, the mean over channels, is removed) beyond :data:`CHROMA_DEADZONE`, times
    :data:`CHROMA_GAIN`, is added to the render's luma with the sign of the luma change (brighter when
    unchanged). Colourless changes and sensor noise leave the plain luma. Returns uint8 (H, W).
    """
    luma_source = cv2.cvtColor(source, cv2.COLOR_RGB2GRAY).astype(np.float32)
    luma_render = cv2.cvtColor(render, cv2.COLOR_RGB2GRAY).astype(np.float32)
    delta = render.astype(np.float32) - source.astype(np.float32)
    chroma = np.sqrt(((delta - delta.mean(axis=2, keepdims=True)) ** 2).sum(axis=2))
    boost = CHROMA_GAIN * np.maximum(chroma - CHROMA_DEADZONE, 0.0)
    sign = np.where(luma_render < luma_source, -1.0, 1.0)
    return np.clip(np.rint(luma_render + sign * boost), 0, 255).astype(np.uint8)


class MatchBand:
    """What every match-count band shares: band edges, their calibration rule, verdict rules and saved state.

    A band scores a render by its match ratio with its source (matched source keypoints / source
    keypoints: 1.0 for an identical copy, near 0 for an unrelated image) and keeps it while the ratio lies
    strictly inside (``low``, ``high``). Subclasses say how keypoints are matched (``match_ratio``) and which
    references they calibrate on; :meth:`set_edges` then applies one rule to them:

    - upper edge = the ``quantiles[0]`` quantile of near-copy references (a normal against an imperceptibly
      changed copy of itself). A render at or above it changed the source's structure no more than that:
      ``near_copy``.
    - lower edge = the ``quantiles[1]`` quantile of unrelated references (a normal against another normal of
      the same category). A render at or below it is no closer to its source than an unrelated image:
      ``broken_structure``.

    Where the two distributions overlap (images with few distinctive keypoints), the lower edge falls back to
    the unrelated median, and to 0 if that still is not below the upper edge. A source without keypoints
    cannot be judged: the verdict is ok with reason ``no_keypoints`` and score NaN. With fewer than
    ``min_keypoints`` the ratio is too coarse to judge: ok with reason ``few_keypoints`` (and the score).
    Calibration skips such normals. ``reject_near_copy=False`` keeps only the lower edge: subtle but real
    local defects often leave every keypoint matched, and the near-copy edge rejects them along with no-ops.
    """

    name = "match_band"
    matcher = ""
    """The ``FilterConfig.matcher`` name of the subclass, saved in its state."""
    keypoint_kind = ""
    """The keypoints' name in errors ("SIFT", "SuperPoint")."""

    def __init__(
        self,
        quantiles: tuple[float, float],
        min_keypoints: int,
        reject_near_copy: bool,
        low: float | None,
        high: float | None,
    ):
        if not 0.0 <= quantiles[0] < quantiles[1] <= 1.0:
            raise FilterError(
                f"{type(self).__name__} quantiles must satisfy 0 <= low < high <= 1, got {quantiles}"
            )
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))
        self.min_keypoints = int(min_keypoints)
        self.reject_near_copy = bool(reject_near_copy)
        self.low, self.high = low, high
        self.near_copy_scores: list[float] = []
        self.unrelated_scores: list[float] = []

    @property
    def calibrated(self) -> bool:
        return self.low is not None and self.high is not None

    def match_ratio(self, source: np.ndarray, render: np.ndarray) -> tuple[float, int]:
        """(matched source keypoints / source keypoints, source keypoints); NaN without source keypoints."""
        raise NotImplementedError

    def check_normals(self, normals: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The calibration normals, checked: two or more RGB uint8 images."""
        if len(normals) < 2:
            raise FilterError(
                f"{type(self).__name__}.calibrate needs at least 2 normal images, got {len(normals)}"
            )
        return [check_rgb(image, f"normals[{i}]") for i, image in enumerate(normals)]

    def match_ratios(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, int]]:
        """:meth:`match_ratio` of every (source, render) pair (a subclass may batch them)."""
        checked = [
            check_images(source, render, f"pairs[{i}] render") for i, (source, render) in enumerate(pairs)
        ]
        return [self.match_ratio(source, render) for source, render in checked]

    def set_edges(self, near: list[float], unrelated: list[float]) -> None:
        """Keep the references and set the edges from them by the rule in the class docstring."""
        if not near or not unrelated:
            raise FilterError(
                f"{type(self).__name__}.calibrate found fewer than {self.min_keypoints} {self.keypoint_kind} "
                "keypoints on every normal image"
            )
        self.near_copy_scores, self.unrelated_scores = near, unrelated
        high = float(np.quantile(near, self.quantiles[0]))
        low = float(np.quantile(unrelated, self.quantiles[1]))
        if low >= high:
            fallback = float(np.quantile(unrelated, 0.5))
            logger.warning(
                "match band references overlap (unrelated q%.2f %.3f >= near-copy q%.2f %.3f); "
                "lower edge falls back",
                self.quantiles[1],
                low,
                self.quantiles[0],
                high,
            )
            low = fallback if fallback < high else 0.0
        self.low, self.high = low, high

    def check_calibrated(self) -> None:
        if not self.calibrated:
            raise FilterError(
                f"{type(self).__name__} is not calibrated: call calibrate(normals, rng) or pass low and high"
            )

    def judge(self, score: float, keypoints: int) -> Verdict:
        """The verdict on a render whose match ratio is ``score`` with ``keypoints`` source keypoints."""
        self.check_calibrated()
        if keypoints == 0:
            return Verdict(True, score, "no_keypoints")
        if keypoints < self.min_keypoints:
            return Verdict(True, score, "few_keypoints")
        if self.reject_near_copy and score >= self.high:
            return Verdict(False, score, "near_copy")
        if score <= self.low:
            return Verdict(False, score, "broken_structure")
        return Verdict(True, score, "")

    def restore(self, state: dict[str, Any]) -> MatchBand:
        """A band rebuilt from ``state`` that keeps this band's runtime settings (none for SIFT)."""
        return type(self).from_dict(state)

    def rejudge(self, verdict: Verdict) -> Verdict:
        """This band's verdict on a render another band of the same matcher judged (e.g. after narrowing)."""
        if verdict.reason in UNJUDGED:
            return verdict
        return self.judge(verdict.score, self.min_keypoints)

    def __call__(self, source: np.ndarray, candidate: Candidate) -> Verdict:
        source, image = check_images(source, candidate.image)
        self.check_calibrated()
        return self.judge(*self.match_ratio(source, image))

    def to_dict(self) -> dict[str, Any]:
        """The state every band saves (plain JSON types); subclasses add their own settings."""
        return {
            "matcher": self.matcher,
            "quantiles": list(self.quantiles),
            "min_keypoints": self.min_keypoints,
            "reject_near_copy": self.reject_near_copy,
            "low": self.low,
            "high": self.high,
            "near_copy_scores": [round(float(s), 6) for s in self.near_copy_scores],
            "unrelated_scores": [round(float(s), 6) for s in self.unrelated_scores],
        }

    @classmethod
    def settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments saved in ``data`` (KeyError for a missing one); subclasses add theirs."""
        return {
            "quantiles": tuple(data["quantiles"]),
            "min_keypoints": data["min_keypoints"],
            "reject_near_copy": data.get("reject_near_copy", True),
            "low": data["low"],
            "high": data["high"],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], **runtime: Any) -> MatchBand:
        """Rebuild a band from :meth:`to_dict`; ``runtime`` arguments (not None) override saved ones."""
        matcher = data.get("matcher", "sift")
        if matcher != cls.matcher:
            raise FilterError(f"match band state is for the {matcher} matcher, not {cls.matcher}")
        try:
            settings = cls.settings(data)
        except KeyError as error:
            raise FilterError(f"match band state is missing field {error.args[0]!r}") from None
        band = cls(**{**settings, **{k: v for k, v in runtime.items() if v is not None}})
        band.near_copy_scores = [float(s) for s in data.get("near_copy_scores", [])]
        band.unrelated_scores = [float(s) for s in data.get("unrelated_scores", [])]
        return band


UNJUDGED = ("no_keypoints", "few_keypoints")
"""Verdict reasons of renders a band cannot judge; their scores stay out of batch statistics."""


def unrelated_pairs(count: int, max_pairs: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to ``max_pairs`` random ordered pairs (i, j), i != j, of ``count`` normals: unrelated references."""
    pairs = [(i, j) for i in range(count) for j in range(count) if i != j]
    return [pairs[choice] for choice in rng.permutation(len(pairs))[:max_pairs]]

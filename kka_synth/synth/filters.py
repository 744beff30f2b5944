"""Filters that reject failed renders: a keypoint match-count band and an edit-locality check.

The match-count band follows "Anomaly Detection by Effectively Leveraging Synthetic Images" (arXiv
2512.23227): keypoints of the source image are matched to the render; too many matches mean the render barely
changed (``near_copy``), too few mean its structure broke (``broken_structure``). That paper matches with
LightGlue; the offline profile here uses OpenCV SIFT, a brute-force matcher and Lowe's ratio test (0.75).

Every filter is ``filter(source, candidate) -> Verdict(ok, score, reason)``; a rejection always carries its
reason. :func:`build_filters` makes the list a :class:`~kka_synth.config.FilterConfig` asks for and
:func:`apply_filters` runs it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Protocol

import cv2
import numpy as np

from kka_synth.config import FilterConfig
from kka_synth.types import Candidate, Verdict

logger = logging.getLogger(__name__)


class FilterError(ValueError):
    """A filter got input it cannot judge (wrong image type or shape, an uncalibrated band)."""


class Filter(Protocol):
    """Judges one render against its source; ``name`` keys its verdict in :func:`apply_filters`."""

    name: str

    def __call__(self, source: np.ndarray, candidate: Candidate) -> Verdict: ...


def _check_rgb(image: object, field: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise FilterError(f"{field} must be an RGB uint8 array (H, W, 3), got {kind}")
    return image


def _check_pair(source: object, candidate: Candidate) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the source and the candidate's image and mask; return the three arrays."""
    source = _check_rgb(source, "source")
    image = _check_rgb(candidate.image, "candidate.image")
    if image.shape != source.shape:
        raise FilterError(f"candidate.image shape {image.shape} differs from the source's {source.shape}")
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


TOLERANCE_QUANTILE = 0.999
"""Quantile of descriptor movement under sensor noise beyond which a shared keypoint no longer matches."""


class MatchCountBand:
    """Keeps renders whose SIFT match ratio with their source lies strictly inside a calibrated band.

    The score is the match ratio: good matches (Lowe's ratio test) divided by the source's keypoints, so 1.0
    for an identical copy and near 0 for an unrelated image. SIFT sees the source's luma and the render's
    :func:`change_gray`, so colour-only defects count as changes too.

    With ``keypoints="source"`` (the default) keypoints are detected once, on the source, kept when they
    survive sensor noise (:meth:`describe`), and described at the same places on both images; with ``"both"``
    each image gets its own keypoints (the classic pipeline). On 128-pixel images the classic pipeline loses
    5-15% of its matches to detector flicker under sensor noise of one grey level, as many as a visible local
    defect costs, so a band calibrated on noisy copies rejected most real defects as near copies; shared,
    noise-stable keypoints make noisy copies score 1.0 and leave the defect's own damage as the signal.

    In that mode two more things make the matcher see what a person sees. Detected keypoints are few on small
    images (about 60 on a 128-pixel brick crop, 7 on a plain washer), so a local defect rarely touches one;
    a grid of keypoints every ``grid_step`` pixels is described as well (dense SIFT). And a changed
    descriptor still wins the ratio test at its own place, so a shared keypoint counts as matched only while
    its descriptor moved no more than sensor noise moves it (``tolerance``, the :data:`TOLERANCE_QUANTILE`
    quantile of descriptor movement on noisy copies of the calibration normals). On the demo's first
    iteration this took the near-copy rejections of procedural renders from 89 of 121 to 17, the rest being
    the smallest, faintest specs.

    The band comes from the caller's normal images (:meth:`calibrate`):

    - upper edge = the ``quantiles[0]`` quantile of near-copy references, each normal matched against itself
      plus imperceptible sensor noise (Gaussian, ``noise_sigma`` grey levels). A render at or above it changed
      the source's structure no more than sensor noise does: ``near_copy``.
    - lower edge = the ``quantiles[1]`` quantile of unrelated references, each normal matched against another
      normal of the same category. A render at or below it is no closer to its source than an unrelated
      image: ``broken_structure``.

    Where the two distributions overlap (images with few distinctive keypoints), the lower edge falls back to
    the unrelated median, and to 0 if that still is not below the upper edge. A source without keypoints
    cannot be judged: the verdict is ok with reason ``no_keypoints`` and score NaN. With fewer than
    ``min_keypoints`` the ratio is too coarse to judge: ok with reason ``few_keypoints`` (and the score).
    Calibration skips such normals. ``reject_near_copy=False`` keeps only the lower edge: subtle but real
    local defects often leave every keypoint matched, and the near-copy edge rejects them along with no-ops.
    """

    name = "match_band"

    def __init__(
        self,
        quantiles: tuple[float, float] = (0.02, 0.98),
        ratio: float = 0.75,
        noise_sigma: float = 1.0,
        max_pairs: int = 64,
        keypoints: str = "source",
        low: float | None = None,
        high: float | None = None,
        min_keypoints: int = 4,
        reject_near_copy: bool = True,
        grid_step: int = 8,
        tolerance: float | None = None,
        cache_size: int = 64,
    ):
        if not 0.0 <= quantiles[0] < quantiles[1] <= 1.0:
            raise FilterError(f"MatchCountBand quantiles must satisfy 0 <= low < high <= 1, got {quantiles}")
        if not 0.0 < ratio < 1.0:
            raise FilterError(f"MatchCountBand ratio must be in (0, 1), got {ratio}")
        if keypoints not in ("source", "both"):
            raise FilterError(f"MatchCountBand keypoints must be source or both, got {keypoints!r}")
        self.quantiles = (float(quantiles[0]), float(quantiles[1]))
        self.ratio = float(ratio)
        self.noise_sigma = float(noise_sigma)
        self.max_pairs = int(max_pairs)
        self.keypoints = keypoints
        self.min_keypoints = int(min_keypoints)
        self.reject_near_copy = bool(reject_near_copy)
        self.grid_step = int(grid_step)
        self.tolerance = tolerance
        self.low, self.high = low, high
        self.near_copy_scores: list[float] = []
        self.unrelated_scores: list[float] = []
        self.cache_size = cache_size
        self._sift = cv2.SIFT_create()
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._sources: dict[bytes, tuple[tuple, np.ndarray | None]] = {}

    @property
    def calibrated(self) -> bool:
        return self.low is not None and self.high is not None

    def describe(self, image: np.ndarray) -> tuple[tuple, np.ndarray | None]:
        """SIFT keypoints and descriptors (N, 128) of an RGB source image's luma; cached.

        With ``keypoints="source"`` only keypoints that survive sensor noise are kept: each must still pass
        the ratio test against two copies of the image with twice ``noise_sigma`` of noise (fixed seed, so
        the result depends on the image alone). Keypoints with a near-duplicate elsewhere in the image (a
        symmetric pad, a repeated pattern) fail it and would otherwise flicker between near copies.
        """
        key = hashlib.blake2b(image.tobytes(), digest_size=16).digest() + repr(image.shape).encode()
        if key not in self._sources:
            if len(self._sources) >= self.cache_size:
                self._sources.pop(next(iter(self._sources)))
            gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            keypoints = tuple(self._sift.detect(gray, None)) + self._grid(gray.shape)
            keypoints, descriptors = self._sift.compute(gray, keypoints)
            if self.keypoints == "source" and descriptors is not None and len(descriptors) >= 2:
                stable = np.ones(len(descriptors), dtype=bool)
                noise_rng = np.random.default_rng(0)
                for _ in range(2):
                    noise = noise_rng.normal(0.0, 2.0 * self.noise_sigma, image.shape)
                    noisy = np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)
                    _, noisy_desc = self._sift.compute(change_gray(image, noisy), keypoints)
                    stable &= self._good(descriptors, noisy_desc)
                keypoints = tuple(k for k, keep in zip(keypoints, stable, strict=True) if keep)
                descriptors = descriptors[stable]
            self._sources[key] = (keypoints, descriptors)
        return self._sources[key]

    def _grid(self, shape: tuple[int, ...]) -> tuple:
        """Keypoints on a regular grid (every ``grid_step`` pixels, support ``2 * grid_step``), or none."""
        if not self.grid_step:
            return ()
        step = self.grid_step
        size = float(2 * step)
        return tuple(
            cv2.KeyPoint(float(x), float(y), size)
            for y in range(step, shape[0] - step + 1, step)
            for x in range(step, shape[1] - step + 1, step)
        )

    def _good(self, source_desc: np.ndarray, render_desc: np.ndarray | None) -> np.ndarray:
        """(N,) bool: which source descriptors find a match in the render that passes Lowe's ratio test."""
        good = np.zeros(len(source_desc), dtype=bool)
        if render_desc is None or len(render_desc) < 2:
            return good
        for index, pair in enumerate(self._matcher.knnMatch(source_desc, render_desc, k=2)):
            good[index] = len(pair) == 2 and pair[0].distance < self.ratio * pair[1].distance
        return good

    def match_ratio(self, source: np.ndarray, render: np.ndarray) -> tuple[float, int]:
        """(good matches / source keypoints, source keypoints); the ratio is NaN without source keypoints."""
        keypoints, source_desc = self.describe(source)
        if source_desc is None or len(source_desc) == 0:
            return float("nan"), 0
        gray = change_gray(source, render)
        if self.keypoints == "source":
            _, render_desc = self._sift.compute(gray, keypoints)
            good = self._good(source_desc, render_desc)
            if (
                self.tolerance is not None
                and render_desc is not None
                and len(render_desc) == len(source_desc)
            ):
                good &= np.linalg.norm(source_desc - render_desc, axis=1) <= self.tolerance
        else:
            _, render_desc = self._sift.detectAndCompute(gray, None)
            good = self._good(source_desc, render_desc)
        return float(good.mean()), len(source_desc)

    def _noise_distances(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(N,) distances between the source's descriptors and a noisy copy's at the same keypoints."""
        keypoints, source_desc = self.describe(image)
        if source_desc is None or len(source_desc) == 0:
            return np.zeros(0)
        noisy = np.clip(np.rint(image + rng.normal(0.0, self.noise_sigma, image.shape)), 0, 255).astype(
            np.uint8
        )
        _, noisy_desc = self._sift.compute(change_gray(image, noisy), keypoints)
        if noisy_desc is None or len(noisy_desc) != len(source_desc):
            return np.zeros(0)
        return np.linalg.norm(source_desc - noisy_desc, axis=1)

    def calibrate(self, normals: list[np.ndarray], rng: np.random.Generator) -> MatchCountBand:
        """Set the band from near-copy and unrelated references on ``normals`` (two or more); returns self."""
        if len(normals) < 2:
            raise FilterError(f"MatchCountBand.calibrate needs at least 2 normal images, got {len(normals)}")
        normals = [_check_rgb(image, f"normals[{i}]") for i, image in enumerate(normals)]
        near, unrelated = [], []
        if self.keypoints == "source":
            self.tolerance = None
            distances = np.concatenate(
                [
                    self._noise_distances(normals[i], rng)
                    for i in rng.permutation(len(normals))[: self.max_pairs]
                ]
            )
            if len(distances):
                self.tolerance = float(np.quantile(distances, TOLERANCE_QUANTILE))
        for index in rng.permutation(len(normals))[: self.max_pairs]:
            image = normals[index]
            noisy = np.clip(np.rint(image + rng.normal(0.0, self.noise_sigma, image.shape)), 0, 255)
            score, count = self.match_ratio(image, noisy.astype(np.uint8))
            if count >= self.min_keypoints:
                near.append(score)
        pairs = [(i, j) for i in range(len(normals)) for j in range(len(normals)) if i != j]
        for choice in rng.permutation(len(pairs))[: self.max_pairs]:
            i, j = pairs[choice]
            score, count = self.match_ratio(normals[i], normals[j])
            if count >= self.min_keypoints:
                unrelated.append(score)
        if not near or not unrelated:
            raise FilterError(
                f"MatchCountBand.calibrate found fewer than {self.min_keypoints} SIFT keypoints "
                "on every normal image"
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
        logger.info("match band calibrated on %d normals: (%.3f, %.3f)", len(normals), low, high)
        return self

    def __call__(self, source: np.ndarray, candidate: Candidate) -> Verdict:
        source, image, _ = _check_pair(source, candidate)
        if not self.calibrated:
            raise FilterError(
                "MatchCountBand is not calibrated: call calibrate(normals, rng) or pass low and high"
            )
        score, keypoints = self.match_ratio(source, image)
        if keypoints == 0:
            return Verdict(True, score, "no_keypoints")
        if keypoints < self.min_keypoints:
            return Verdict(True, score, "few_keypoints")
        if self.reject_near_copy and score >= self.high:
            return Verdict(False, score, "near_copy")
        if score <= self.low:
            return Verdict(False, score, "broken_structure")
        return Verdict(True, score, "")

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the calibrated band (plain JSON types)."""
        return {
            "quantiles": list(self.quantiles),
            "ratio": self.ratio,
            "noise_sigma": self.noise_sigma,
            "max_pairs": self.max_pairs,
            "keypoints": self.keypoints,
            "min_keypoints": self.min_keypoints,
            "reject_near_copy": self.reject_near_copy,
            "grid_step": self.grid_step,
            "tolerance": self.tolerance,
            "low": self.low,
            "high": self.high,
            "near_copy_scores": [round(float(s), 6) for s in self.near_copy_scores],
            "unrelated_scores": [round(float(s), 6) for s in self.unrelated_scores],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MatchCountBand:
        try:
            band = cls(
                quantiles=tuple(data["quantiles"]),
                ratio=data["ratio"],
                noise_sigma=data["noise_sigma"],
                max_pairs=data["max_pairs"],
                keypoints=data["keypoints"],
                min_keypoints=data["min_keypoints"],
                reject_near_copy=data.get("reject_near_copy", True),
                grid_step=data.get("grid_step", 0),
                tolerance=data.get("tolerance"),
                low=data["low"],
                high=data["high"],
            )
        except KeyError as error:
            raise FilterError(f"match band state is missing field {error.args[0]!r}") from None
        band.near_copy_scores = [float(s) for s in data.get("near_copy_scores", [])]
        band.unrelated_scores = [float(s) for s in data.get("unrelated_scores", [])]
        return band


class EditLocality:
    """Keeps renders whose change lies inside their (slightly dilated) mask and is visible at all.

    The change is the per-pixel largest channel difference beyond ``noise_floor`` grey levels; the score is
    the share of its sum over the image that lies inside the mask dilated by ``dilation`` pixels (default 2,
    or 1/64 of the shorter side on large images). Below ``min_inside`` the verdict is ``change_outside_mask``.
    When the mean change over the mask is under ``min_change`` grey levels (or nothing exceeds the floor),
    nothing really changed: ``no_change``. An empty mask gives ``empty_mask``.
    """

    name = "locality"

    def __init__(
        self,
        min_inside: float = 0.9,
        noise_floor: float = 2.0,
        min_change: float = 2.0,
        dilation: int | None = None,
    ):
        if not 0.0 < min_inside <= 1.0:
            raise FilterError(f"EditLocality min_inside must be in (0, 1], got {min_inside}")
        self.min_inside = float(min_inside)
        self.noise_floor = float(noise_floor)
        self.min_change = float(min_change)
        self.dilation = dilation

    def __call__(self, source: np.ndarray, candidate: Candidate) -> Verdict:
        source, image, mask = _check_pair(source, candidate)
        if not mask.any():
            return Verdict(False, 0.0, "empty_mask")
        difference = np.abs(image.astype(np.int16) - source.astype(np.int16)).max(axis=2).astype(np.float32)
        excess = np.maximum(difference - self.noise_floor, 0.0)
        radius = self.dilation if self.dilation is not None else max(2, round(min(mask.shape) / 64))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        grown = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
        total = float(excess.sum())
        share = float(excess[grown].sum()) / total if total > 0 else 0.0
        if total == 0.0 or float(difference[mask].mean()) < self.min_change:
            return Verdict(False, share, "no_change")
        if share < self.min_inside:
            return Verdict(False, share, "change_outside_mask")
        return Verdict(True, share, "")


def build_filters(config: FilterConfig, band: MatchCountBand | None = None) -> list[Filter]:
    """The filters ``config`` turns on, cheapest first.

    ``band`` is an already calibrated (or restored) match band to use; without it a new band is made with the
    config's quantiles, which must be calibrated before use.
    """
    filters: list[Filter] = []
    if config.locality:
        filters.append(EditLocality(min_inside=config.locality_min_inside))
    if config.match_band:
        filters.append(band if band is not None else MatchCountBand(quantiles=config.band_quantiles))
    return filters


def calibrate_filters(
    filters: list[Filter], normals: list[np.ndarray], rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    """Calibrate every filter that needs it on held-out normals; returns their states by filter name."""
    states = {}
    for item in filters:
        if isinstance(item, MatchCountBand):
            states[item.name] = item.calibrate(normals, rng).to_dict()
    return states


def restore_filters(filters: list[Filter], states: dict[str, dict[str, Any]]) -> list[Filter]:
    """The filters, calibrated ones rebuilt from :func:`calibrate_filters`'s states (for a resumed run)."""
    return [
        MatchCountBand.from_dict(states[f.name]) if isinstance(f, MatchCountBand) and f.name in states else f
        for f in filters
    ]


def apply_filters(
    filters: list[Filter], source: np.ndarray, candidate: Candidate, stop_at_rejection: bool = False
) -> dict[str, Verdict]:
    """Run the filters in order and return each verdict by filter name.

    With ``stop_at_rejection`` the filters after the first rejection are skipped (and absent from the result).
    """
    verdicts: dict[str, Verdict] = {}
    for item in filters:
        verdict = item(source, candidate)
        verdicts[item.name] = verdict
        if stop_at_rejection and not verdict.ok:
            break
    return verdicts

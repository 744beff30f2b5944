"""The offline match band: OpenCV SIFT keypoints, a brute-force matcher and Lowe's ratio test (0.75).

It stands in for the LightGlue matcher of "Anomaly Detection by Effectively Leveraging Synthetic Images"
(arXiv 2512.23227) where no learned weights are available; see :class:`MatchCountBand` for how it is made
to see what a person sees on small images.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import cv2
import numpy as np

from kka_synth.synth.band import FilterError, MatchBand, change_gray, unrelated_pairs

logger = logging.getLogger(__name__)

TOLERANCE_QUANTILE = 0.999
"""Quantile of descriptor movement under sensor noise beyond which a shared keypoint no longer matches."""


class MatchCountBand(MatchBand):
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

    Calibration (:meth:`calibrate`) follows :class:`MatchBand`'s rule; the near-copy references are each
    normal matched against itself plus imperceptible sensor noise (Gaussian, ``noise_sigma`` grey levels).
    """

    matcher = "sift"
    keypoint_kind = "SIFT"

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
        super().__init__(quantiles, min_keypoints, reject_near_copy, low, high)
        if not 0.0 < ratio < 1.0:
            raise FilterError(f"MatchCountBand ratio must be in (0, 1), got {ratio}")
        if keypoints not in ("source", "both"):
            raise FilterError(f"MatchCountBand keypoints must be source or both, got {keypoints!r}")
        self.ratio = float(ratio)
        self.noise_sigma = float(noise_sigma)
        self.max_pairs = int(max_pairs)
        self.keypoints = keypoints
        self.grid_step = int(grid_step)
        self.tolerance = tolerance
        self.cache_size = cache_size
        self._sift = cv2.SIFT_create()
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._sources: dict[bytes, tuple[tuple, np.ndarray | None]] = {}

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
        normals = self.check_normals(normals)
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
        for i, j in unrelated_pairs(len(normals), self.max_pairs, rng):
            score, count = self.match_ratio(normals[i], normals[j])
            if count >= self.min_keypoints:
                unrelated.append(score)
        self.set_edges(near, unrelated)
        logger.info("match band calibrated on %d normals: (%.3f, %.3f)", len(normals), self.low, self.high)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the calibrated band (plain JSON types)."""
        return {
            **super().to_dict(),
            "ratio": self.ratio,
            "noise_sigma": self.noise_sigma,
            "max_pairs": self.max_pairs,
            "keypoints": self.keypoints,
            "grid_step": self.grid_step,
            "tolerance": self.tolerance,
        }

    @classmethod
    def settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().settings(data),
            "ratio": data["ratio"],
            "noise_sigma": data["noise_sigma"],
            "max_pairs": data["max_pairs"],
            "keypoints": data["keypoints"],
            "grid_step": data.get("grid_step", 0),
            "tolerance": data.get("tolerance"),
        }

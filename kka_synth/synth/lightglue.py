"""The LightGlue match-count band: SuperPoint keypoints matched by LightGlue, with the SIFT band's interface.

"Anomaly Detection by Effectively Leveraging Synthetic Images" (arXiv 2512.23227) keeps an edited normal
image only while the number of LightGlue matches between it and its source lies in a band set from the
distribution of match counts: too many matches mean the edit barely changed anything, too few that it broke
the image's structure. LightGlue (Lindenberger, Sarlin and Pollefeys, "LightGlue: Local Feature Matching at
Light Speed", ICCV 2023) matches SuperPoint keypoints (DeTone, Malisiewicz and Rabinovich, "SuperPoint:
Self-Supervised Interest Point Detection and Description", CVPR Workshops 2018); both run as transformers'
``LightGlueForKeypointMatching``, loaded by Hub id or local directory.

:class:`LightGlueBand` scores a render by its match ratio: source keypoints that LightGlue matches in the
render with a matching score above ``threshold``, divided by the source's keypoints. Band edges, verdicts,
saved state and per-batch narrowing are :class:`~kka_synth.synth.filters.MatchBand`'s, shared with the SIFT
band, so runs and reports treat both alike (verdict key and ``calibration.json`` slot ``match_band``).

Calibration, per category on held-out normals:

- near-copy references: each normal against an augmented copy of itself (brightness and contrast jitter of
  up to ``jitter``, a shift of up to ``shift`` pixels and a rotation of up to ``rotation`` degrees with
  reflected borders, Gaussian sensor noise of ``noise_sigma`` grey levels). LightGlue matches geometrically,
  so such copies keep most matches, and a render must lose more than they do to pass as changed;
- unrelated references: ordered pairs of different normals.

Choices made here:

- The matcher sees the source's luma and the render's :func:`~kka_synth.synth.filters.change_gray`, so a
  colour-only defect counts as a change, as in the SIFT band. The references are seen in plain luma: their
  augmentation is colourless, and a shifted copy is not pixel-aligned, so its chroma "change" would be an
  artefact.
- LightGlue's adaptive depth and width are switched off. In transformers 5.x, batched matching with early
  stopping puts the matches of pairs that stop at different layers back in the wrong order (the reordering
  in ``_concat_early_stopped_outputs``); without it every pair runs all layers and a pair's result does not
  depend on the batch it is in.
- Pairs are matched ``batch_size`` at a time, grouped by image size, at their own size (no resizing).
- One model and image processor per (model, device) is loaded per process and shared by the bands of every
  category. Source features are not cached: transformers' forward takes only pixel pairs, and reusing
  SuperPoint's output would need its private matching step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from kka_synth.synth.band import FilterError, MatchBand, change_gray, check_images, unrelated_pairs
from kka_synth.utils.hub import ModelLoadError, load_pretrained

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "ETH-CVG/lightglue_superpoint"
MODEL_FIELD = "filters.matcher_model"


@functools.lru_cache(maxsize=4)
def load_lightglue(model: str, device: str) -> tuple[Any, Any]:
    """(LightGlueForKeypointMatching in eval mode on ``device``, its image processor), loaded once per pair.

    A model without an image processor gets LightGlue's default one. Failures are ModelLoadError naming
    ``filters.matcher_model`` and the offline profile.
    """
    import transformers

    matcher = load_pretrained(
        transformers.LightGlueForKeypointMatching.from_pretrained, model, "the LightGlue matcher", MODEL_FIELD
    )
    try:
        processor = load_pretrained(
            transformers.AutoImageProcessor.from_pretrained,
            model,
            "the LightGlue image processor",
            MODEL_FIELD,
        )
    except ModelLoadError:
        logger.info("%s has no image processor; using LightGlue's default one", model)
        processor = transformers.LightGlueImageProcessorPil()
    matcher.depth_confidence = -1.0  # no early stopping: see the module docstring
    matcher.width_confidence = -1.0  # no keypoint pruning (it needs early stopping's confidences)
    logger.info("loaded LightGlue matcher %s on %s", model, device)
    return matcher.to(device).eval(), processor


def luma(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) luma of an RGB uint8 image."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


class LightGlueBand(MatchBand):
    """Keeps renders whose LightGlue match ratio with their source lies strictly inside a calibrated band.

    See the module docstring for the score and the references, and :class:`~kka_synth.synth.filters.MatchBand`
    for the edges and verdicts. ``model`` is a Hub id or local directory (``FilterConfig.matcher_model``),
    loaded here; ``device`` is auto (cuda when available), cpu, cuda, cuda:N or mps.
    """

    matcher = "lightglue"
    keypoint_kind = "SuperPoint"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        quantiles: tuple[float, float] = (0.02, 0.98),
        threshold: float = 0.1,
        noise_sigma: float = 1.0,
        jitter: float = 0.02,
        shift: float = 1.0,
        rotation: float = 1.0,
        max_pairs: int = 64,
        min_keypoints: int = 4,
        reject_near_copy: bool = True,
        batch_size: int = 16,
        low: float | None = None,
        high: float | None = None,
    ):
        super().__init__(quantiles, min_keypoints, reject_near_copy, low, high)
        for field, value, ok, bound in (
            ("threshold", threshold, 0.0 <= threshold < 1.0, "in [0, 1)"),
            ("noise_sigma", noise_sigma, noise_sigma >= 0.0, ">= 0"),
            ("jitter", jitter, 0.0 <= jitter < 0.5, "in [0, 0.5)"),
            ("shift", shift, shift >= 0.0, ">= 0"),
            ("rotation", rotation, 0.0 <= rotation <= 45.0, "in [0, 45] degrees"),
            ("max_pairs", max_pairs, max_pairs >= 1, ">= 1"),
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
        ):
            if not ok:
                raise FilterError(f"LightGlueBand {field} must be {bound}, got {value}")
        self.threshold = float(threshold)
        self.noise_sigma, self.jitter = float(noise_sigma), float(jitter)
        self.shift, self.rotation = float(shift), float(rotation)
        self.max_pairs, self.batch_size = int(max_pairs), int(batch_size)
        from kka_synth.utils.devices import resolve_device

        self.model_name, self.device_name = model, device
        self.device = resolve_device(device)
        self.model, self.processor = load_lightglue(model, str(self.device))

    def match_ratio(self, source: np.ndarray, render: np.ndarray) -> tuple[float, int]:
        return self.match_ratios([(source, render)])[0]

    def match_ratios(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, int]]:
        """(match ratio, source keypoints) of every RGB (source, render) pair, matched in batches."""
        grays = []
        for index, (source, render) in enumerate(pairs):
            source, render = check_images(source, render, f"pairs[{index}] render")
            grays.append((luma(source), change_gray(source, render)))
        return self.match_gray(grays)

    def match_gray(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, int]]:
        """(match ratio, source keypoints) of uint8 grayscale (source, render) pairs of equal shapes."""
        import torch

        results: list[tuple[float, int]] = [(float("nan"), 0)] * len(pairs)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, (source, render) in enumerate(pairs):
            if source.shape != render.shape:
                raise FilterError(f"pair {index}: render shape {render.shape} differs from {source.shape}")
            by_shape.setdefault(source.shape, []).append(index)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                images = [[pairs[i][0][..., None], pairs[i][1][..., None]] for i in chunk]
                inputs = self.processor(images, do_resize=False, return_tensors="pt")
                pixels = inputs["pixel_values"].to(self.device)  # (B, 2, 1, H, W)
                with torch.no_grad():
                    output = self.model(pixel_values=pixels)
                # matching_scores is (B, 2, N) or, without early stopping, (2B, N): zero unless mutual
                scores = output.matching_scores.reshape(len(chunk), 2, -1)[:, 0]
                keypoints = output.mask.reshape(len(chunk), 2, -1)[:, 0] > 0  # (B, N)
                matched = ((scores > self.threshold) & keypoints).sum(dim=1).tolist()
                counts = keypoints.sum(dim=1).tolist()
                for i, good, count in zip(chunk, matched, counts, strict=True):
                    results[i] = (good / count if count else float("nan"), int(count))
        return results

    def augment(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A near copy of a uint8 (H, W) image: jitter, a small shift and rotation, sensor noise."""
        height, width = gray.shape
        gain, offset = (
            1.0 + rng.uniform(-self.jitter, self.jitter),
            255.0 * rng.uniform(-self.jitter, self.jitter),
        )
        angle = rng.uniform(-self.rotation, self.rotation)
        dx, dy = rng.uniform(-self.shift, self.shift, size=2)
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, 1.0)
        matrix[:, 2] += (dx, dy)
        moved = cv2.warpAffine(
            gray.astype(np.float32),
            matrix,
            (width, height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )
        noisy = moved * gain + offset + rng.normal(0.0, self.noise_sigma, gray.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    def calibrate(self, normals: list[np.ndarray], rng: np.random.Generator) -> LightGlueBand:
        """Set the band from near-copy and unrelated references on ``normals`` (two or more); returns self."""
        grays = [luma(image) for image in self.check_normals(normals)]
        near_pairs = [
            (grays[i], self.augment(grays[i], rng)) for i in rng.permutation(len(grays))[: self.max_pairs]
        ]
        far_pairs = [(grays[i], grays[j]) for i, j in unrelated_pairs(len(grays), self.max_pairs, rng)]
        results = self.match_gray(near_pairs + far_pairs)
        near = [score for score, count in results[: len(near_pairs)] if count >= self.min_keypoints]
        unrelated = [score for score, count in results[len(near_pairs) :] if count >= self.min_keypoints]
        self.set_edges(near, unrelated)
        logger.info("LightGlue band calibrated on %d normals: (%.3f, %.3f)", len(grays), self.low, self.high)
        return self

    def restore(self, state: dict[str, Any]) -> LightGlueBand:
        return LightGlueBand.from_dict(state, model=self.model_name, device=self.device_name)

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the calibrated band (plain JSON types; the device is not kept)."""
        return {
            **super().to_dict(),
            "model": self.model_name,
            "threshold": self.threshold,
            "noise_sigma": self.noise_sigma,
            "jitter": self.jitter,
            "shift": self.shift,
            "rotation": self.rotation,
            "max_pairs": self.max_pairs,
            "batch_size": self.batch_size,
        }

    @classmethod
    def settings(cls, data: dict[str, Any]) -> dict[str, Any]:
        keys = ("model", "threshold", "noise_sigma", "jitter", "shift", "rotation", "max_pairs", "batch_size")
        return {**super().settings(data), **{key: data[key] for key in keys}}

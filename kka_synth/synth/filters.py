"""Filters that reject failed renders: a keypoint match-count band and an edit-locality check.

The match-count band follows "Anomaly Detection by Effectively Leveraging Synthetic Images" (arXiv
2512.23227): keypoints of the source image are matched to the render; too many matches mean the render
barely changed (``near_copy``), too few mean its structure broke (``broken_structure``). Two matchers exist
behind one interface (:class:`~kka_synth.synth.band.MatchBand`), picked by ``FilterConfig.matcher``:

- ``sift``: :class:`~kka_synth.synth.sift.MatchCountBand`, OpenCV SIFT, a brute-force matcher and Lowe's
  ratio test (offline);
- ``lightglue``: :class:`~kka_synth.synth.lightglue.LightGlueBand`, SuperPoint keypoints matched by
  LightGlue as in that paper (hub profile; transformers loads only when such a band is made).

Both share the edges' calibration rule, the verdict rules, the saved state and the per-batch narrowing
(:func:`narrow_band`) that the paper's thresholds from the generated set call for.

Every filter is ``filter(source, candidate) -> Verdict(ok, score, reason)``; a rejection always carries its
reason. :func:`build_filters` makes the list a :class:`~kka_synth.config.FilterConfig` asks for,
:func:`apply_filters` runs it on one candidate and :func:`apply_filters_batch` on many (the bands batched).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kka_synth.config import FilterConfig
from kka_synth.synth.band import (
    CHROMA_DEADZONE,
    CHROMA_GAIN,
    UNJUDGED,
    Filter,
    FilterError,
    MatchBand,
    _check_pair,
    change_gray,
    check_images,
    check_rgb,
    unrelated_pairs,
)
from kka_synth.synth.sift import TOLERANCE_QUANTILE, MatchCountBand
from kka_synth.types import Candidate, Verdict

if TYPE_CHECKING:
    from kka_synth.synth.lightglue import LightGlueBand

logger = logging.getLogger(__name__)


class EditLocality:
    """Keeps renders whose change lies inside their (slightly dilated) mask and is visible at all.

    The change is the per-pixel largest channel difference beyond ``noise_floor`` grey levels; the score is
    the share of its sum over the image that lies inside the mask dilated by ``dilation`` pixels (default 2,
    or 1/64 of the shorter side on large images). Below ``min_inside`` the verdict is ``change_outside_mask``.
    When the mean change over the mask is under ``min_change`` grey levels (or nothing exceeds the floor),
    nothing really changed: ``no_change``. An empty mask gives ``empty_mask``.
    """

    name = "locality"
    needs_mask = True

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


def build_band(config: FilterConfig) -> MatchCountBand | LightGlueBand:
    """A new, uncalibrated match band of ``config.matcher`` (LightGlue loads its model here)."""
    if config.matcher == "lightglue":
        from kka_synth.synth.lightglue import LightGlueBand

        return LightGlueBand(
            model=config.matcher_model, device=config.matcher_device, quantiles=config.band_quantiles
        )
    return MatchCountBand(quantiles=config.band_quantiles)


def band_from_dict(
    data: dict[str, Any], config: FilterConfig | None = None
) -> MatchCountBand | LightGlueBand:
    """Rebuild a band from its state; no ``matcher`` means SIFT (older runs). ``config`` must agree with the
    state's matcher and gives LightGlue its model and device."""
    matcher = data.get("matcher", "sift")
    if config is not None and matcher != config.matcher:
        raise FilterError(
            f"the saved match band is a {matcher} band but filters.matcher is {config.matcher}; "
            "calibrate again (remove the run's calibration.json) or set filters.matcher back"
        )
    if matcher == "lightglue":
        from kka_synth.synth.lightglue import LightGlueBand

        runtime = {} if config is None else {"model": config.matcher_model, "device": config.matcher_device}
        return LightGlueBand.from_dict(data, **runtime)
    return MatchCountBand.from_dict(data)


def narrow_band(band: MatchBand, scores: Sequence[float]) -> MatchBand:
    """A copy of ``band`` narrowed to the batch's own ``band.quantiles`` of its match ``scores``.

    arXiv 2512.23227 sets its thresholds from the generated set's match-count distribution. The lower edge
    becomes max(low, quantile ``quantiles[0]`` of the scores), the upper one min(high, quantile
    ``quantiles[1]``): a batch never widens the band. NaN scores are left out (and ``no_keypoints`` /
    ``few_keypoints`` renders should be); with fewer than two scores, or no room left between the new edges,
    the edges stay.
    """
    band.check_calibrated()
    values = np.asarray([float(s) for s in scores], dtype=float)
    values = values[np.isfinite(values)]
    narrowed = copy.copy(band)
    if len(values) >= 2:
        low = max(band.low, float(np.quantile(values, band.quantiles[0])))
        high = min(band.high, float(np.quantile(values, band.quantiles[1])))
        if low < high:
            narrowed.low, narrowed.high = low, high
        else:
            logger.warning("batch match band (%.3f, %.3f) is empty; the calibrated band stays", low, high)
    return narrowed


DISTRIBUTION_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HISTOGRAM_BINS = 10
"""Equal bins of the match-score histogram on [0, 1]."""


def match_distribution(scores: Sequence[float]) -> dict[str, Any]:
    """Match scores summed up for a report (plain JSON types): ``count`` (non-NaN scores), ``nan``,
    ``quantiles`` q05/q25/q50/q75/q95 (None without scores) and ``histogram`` (``edges``, ``counts``)."""
    values = np.asarray([float(s) for s in scores], dtype=float)
    finite = values[~np.isnan(values)]
    outside = finite[(finite < 0.0) | (finite > 1.0)]
    if len(outside):
        raise FilterError(f"match scores must lie in [0, 1] or be NaN, got {outside[0]}")
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    quantiles = {
        f"q{round(q * 100):02d}": float(np.quantile(finite, q)) if len(finite) else None
        for q in DISTRIBUTION_QUANTILES
    }
    return {
        "count": len(finite),
        "nan": len(values) - len(finite),
        "quantiles": quantiles,
        "histogram": {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]},
    }


def build_filters(config: FilterConfig, band: MatchBand | None = None) -> list[Filter]:
    """The filters ``config`` turns on, cheapest first.

    ``band`` is an already calibrated (or restored) match band to use; without it :func:`build_band` makes a
    new one, which must be calibrated before use.
    """
    filters: list[Filter] = []
    if config.locality:
        filters.append(EditLocality(min_inside=config.locality_min_inside))
    if config.match_band:
        filters.append(band if band is not None else build_band(config))
    return filters


def calibrate_filters(
    filters: list[Filter], normals: list[np.ndarray], rng: np.random.Generator
) -> dict[str, dict[str, Any]]:
    """Calibrate every filter that needs it on held-out normals; returns their states by filter name."""
    states = {}
    for item in filters:
        if isinstance(item, MatchBand):
            states[item.name] = item.calibrate(normals, rng).to_dict()
    return states


def restore_filters(filters: list[Filter], states: dict[str, dict[str, Any]]) -> list[Filter]:
    """The filters, calibrated ones rebuilt from :func:`calibrate_filters`'s states (for a resumed run).

    A restored band keeps the runtime settings (LightGlue's model and device) of the band it replaces.
    """
    return [
        f.restore(states[f.name]) if isinstance(f, MatchBand) and f.name in states else f for f in filters
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


def apply_filters_batch(
    filters: list[Filter],
    sources: Sequence[np.ndarray],
    candidates: Sequence[Candidate],
    batch_band: bool = False,
) -> list[dict[str, Verdict]]:
    """Each candidate's verdicts by filter name (as :func:`apply_filters`), every match band run batched.

    A band matches all pairs in one :meth:`MatchBand.match_ratios` call and, with ``batch_band``, is narrowed
    to the batch's scores (:func:`narrow_band`). Filters with ``needs_mask`` skip candidates without a mask.
    """
    if len(sources) != len(candidates):
        raise FilterError(f"got {len(sources)} sources for {len(candidates)} candidates")
    results: list[dict[str, Verdict]] = [{} for _ in candidates]
    for item in filters:
        if isinstance(item, MatchBand):
            item.check_calibrated()
            ratios = item.match_ratios([(s, c.image) for s, c in zip(sources, candidates, strict=True)])
            verdicts = [item.judge(score, count) for score, count in ratios]
            if batch_band:
                band = narrow_band(item, [v.score for v in verdicts if v.reason not in UNJUDGED])
                verdicts = [band.rejudge(v) for v in verdicts]
        else:
            verdicts = [
                item(s, c) if c.mask is not None or not getattr(item, "needs_mask", False) else None
                for s, c in zip(sources, candidates, strict=True)
            ]
        for result, verdict in zip(results, verdicts, strict=True):
            if verdict is not None:
                result[item.name] = verdict
    return results


__all__ = [
    "CHROMA_DEADZONE",
    "CHROMA_GAIN",
    "TOLERANCE_QUANTILE",
    "UNJUDGED",
    "EditLocality",
    "Filter",
    "FilterError",
    "MatchBand",
    "MatchCountBand",
    "apply_filters",
    "apply_filters_batch",
    "band_from_dict",
    "build_band",
    "build_filters",
    "calibrate_filters",
    "change_gray",
    "check_images",
    "check_rgb",
    "match_distribution",
    "narrow_band",
    "restore_filters",
    "unrelated_pairs",
]

"""The statistics of one loop iteration, as written to ``iterations/<k>/stats.json``.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
tracks the share of hard anomalies per iteration: it should rise as DPO pulls the proposer toward specs the
evaluator finds close to normal. Next to it stand the counts of what failed where (parse, render, filter),
the proposer's parse retries, the diversity of what it wrote (the guard against shortcut collapse), the
match band's score distribution (arXiv 2512.23227 reports it to set the band's thresholds), the DPO round's
numbers and the seconds per stage.

:func:`summarize_iteration` is pure: it reads nothing and writes nothing. The loop hands it the iteration's
candidate rows, its proposal records, the align stage's manifest entry and the stage timings.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kka_synth.eval.diversity import distinct_n, field_entropy, spec_key
from kka_synth.synth.filters import match_distribution
from kka_synth.types import DefectSpec

DPO_KEYS = ("pairs", "steps", "margin_before", "margin_after", "loss", "note")
"""The align stage's manifest fields copied into ``stats["dpo"]`` (absent ones read as None)."""


def summarize_iteration(
    k: int,
    rows: Sequence[dict[str, Any]],
    proposals: Sequence[dict[str, Any]],
    categories: Sequence[str],
    align: Mapping[str, Any],
    seconds: Mapping[str, float],
    stages: Sequence[str],
) -> dict[str, Any]:
    """The stats dict of iteration ``k``, key for key in the order ``stats.json`` holds them.

    Args:
        k: the iteration number.
        rows: the iteration's candidate rows (``candidates.parquet`` as read by ``read_candidates``), each
            with ``category``, ``text``, ``spec`` (dict or None), ``label`` (hard, easy or rejected),
            ``label_judge``, ``hardness``, ``hardness_judge``, ``reason``, ``renderer``, ``image``, ``mask``
            and ``verdicts``.
        proposals: the iteration's ``proposals.jsonl`` records; a record's ``retries`` (a list of parser
            errors, absent or empty when the first reply parsed) counts the proposer's retries.
        categories: the run's categories, in the order ``per_category`` lists them.
        align: the align stage's manifest entry (empty when the stage has not run).
        seconds: seconds spent per stage; a stage absent from it counts 0.
        stages: the stages ``seconds`` reports, in order.

    Returns:
        The stats: counts, rejection reasons, retries, hard shares (refit evaluator and fixed judge, None
        when nothing was labelled), hardness summaries (None when nothing was kept), diversity, per-category
        figures, the match-score distribution (None when no band judged), renderers, absent masks, the DPO
        round and the seconds per stage (rounded to ms).
    """
    specs = [DefectSpec.from_dict(r["spec"]) for r in rows if r["spec"] is not None]
    kept = [r for r in rows if r["label"] in ("hard", "easy")]
    hard = [r for r in kept if r["label"] == "hard"]
    reasons = Counter(r["reason"] for r in rows if r["label"] == "rejected")
    retried = [p.get("retries") or [] for p in proposals]
    retried = [errors for errors in retried if errors]
    per_category = {}
    for name in categories:
        in_category = [r for r in kept if r["category"] == name]
        per_category[name] = {
            "kept": len(in_category),
            "hard_share": hard_share(in_category, "label"),
            "hard_share_judge": hard_share(in_category, "label_judge"),
            "match_scores": match_scores([r for r in rows if r["category"] == name]),
        }
    return {
        "iteration": k,
        "proposals": len(rows),
        "parse_failures": sum(v for r, v in reasons.items() if r.startswith("parse:")),
        "render_failures": sum(v for r, v in reasons.items() if r.startswith("render:")),
        "filtered": sum(v for r, v in reasons.items() if r.startswith("filter:")),
        "rejections": dict(sorted(reasons.items())),
        # LLM backends ask a failed reply again with the parser's error: how often, why, and how many of
        # those replies parsed in the end
        "parse_retries": sum(len(errors) for errors in retried),
        "retried": len(retried),
        "retry_reasons": dict(sorted(Counter(error for errors in retried for error in errors).items())),
        "kept": len(kept),
        "hard": len(hard),
        "hard_share": hard_share(kept, "label"),
        "hard_share_judge": hard_share(kept, "label_judge"),
        "mean_hardness": float(np.mean([r["hardness"] for r in kept])) if kept else None,
        "mean_hardness_judge": float(np.mean([r["hardness_judge"] for r in kept])) if kept else None,
        # hardness is unbounded below (an obvious defect scores far beyond the threshold), so the mean
        # follows a few easy outliers; the median reads as the typical candidate
        "median_hardness": float(np.median([r["hardness"] for r in kept])) if kept else None,
        "distinct_2": distinct_n((r["text"] for r in rows), 2),
        "distinct_specs": len({spec_key(s) for s in specs}),
        "field_entropy": field_entropy(specs),
        "per_category": per_category,
        # the band's score distribution over every judged render, as arXiv 2512.23227 reports it to set its
        # thresholds; per category above, with each category's band edges in calibration.json
        "match_scores": match_scores(rows),
        "renderers": dict(Counter(r["renderer"] for r in rows if r["renderer"])),
        "masks_absent": sum(r["image"] is not None and r["mask"] is None for r in rows),
        "dpo": {key: align.get(key) for key in DPO_KEYS},
        "seconds": {stage: round(seconds.get(stage, 0.0), 3) for stage in stages},
    }


def hard_share(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """Share of ``rows`` whose ``key`` is "hard", among those where it is set (None when it is nowhere)."""
    labelled = [r for r in rows if r.get(key) is not None]
    return sum(r[key] == "hard" for r in labelled) / len(labelled) if labelled else None


def match_scores(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """:func:`~kka_synth.synth.filters.match_distribution` of the match band's scores among ``rows`` (None
    when the band judged none of them)."""
    scores = [r["verdicts"]["match_band"]["score"] for r in rows if "match_band" in r.get("verdicts", {})]
    return match_distribution(scores) if scores else None


__all__ = ["DPO_KEYS", "hard_share", "match_scores", "summarize_iteration"]

"""The stats of one iteration, from hand-built candidate rows and proposal records."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from kka_synth.eval.iteration_stats import hard_share, match_scores, summarize_iteration

STAGES = ("propose", "render", "evaluate", "align")
KEYS = [
    "iteration",
    "proposals",
    "parse_failures",
    "render_failures",
    "filtered",
    "rejections",
    "parse_retries",
    "retried",
    "retry_reasons",
    "kept",
    "hard",
    "hard_share",
    "hard_share_judge",
    "mean_hardness",
    "mean_hardness_judge",
    "median_hardness",
    "distinct_2",
    "distinct_specs",
    "field_entropy",
    "per_category",
    "match_scores",
    "renderers",
    "masks_absent",
    "dpo",
    "seconds",
]
"""The keys of stats.json, in the order the file holds them."""


def _spec(shape: str, severity: float = 0.5) -> dict[str, Any]:
    return {
        "category": "brick",
        "defect_type": "crack",
        "description": "a thin crack",
        "region": [0.1, 0.1, 0.6, 0.6],
        "size": 0.02,
        "shape": shape,
        "tone": "darker",
        "severity": severity,
    }


def _row(category: str, label: str, text: str, spec: dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
    row = {
        "category": category,
        "text": text,
        "spec": spec,
        "label": label,
        "label_judge": None,
        "hardness": None,
        "hardness_judge": None,
        "reason": "",
        "renderer": "",
        "image": None,
        "mask": None,
        "verdicts": {},
    }
    return row | fields


def _band(score: float, ok: bool = True) -> dict[str, Any]:
    return {"match_band": {"ok": ok, "score": score, "reason": "" if ok else "too_few"}}


A, B, C, D = _spec("scratch"), _spec("blob"), _spec("crack"), _spec("crack", severity=0.9)
DRAWN = {"image": "images/x.png", "mask": "masks/x.png"}
ROWS = [
    _row(
        "brick",
        "hard",
        "a b",
        A,
        label_judge="hard",
        hardness=0.5,
        hardness_judge=0.2,
        renderer="procedural",
        verdicts=_band(0.4),
        **DRAWN,
    ),
    _row(
        "brick",
        "easy",
        "a b",
        B,
        label_judge="hard",
        hardness=-1.5,
        hardness_judge=-0.4,
        renderer="perlin",
        image="images/y.png",
        verdicts=_band(0.8),
    ),
    _row(
        "brick",
        "rejected",
        "a b",
        A,
        reason="filter:match_band:too_few",
        renderer="procedural",
        verdicts=_band(0.05, ok=False),
        **DRAWN,
    ),
    _row("tile", "hard", "c d", C, hardness=2.0, hardness_judge=0.6, renderer="procedural", **DRAWN),
    _row("tile", "rejected", "oops", None, reason="parse:not_json"),
    _row("tile", "rejected", "c d", C, reason="render:no_foreground"),
    _row(
        "tile",
        "easy",
        "e f",
        D,
        label_judge="easy",
        hardness=-5.0,
        hardness_judge=-1.0,
        renderer="perlin",
        verdicts={"edit_locality": {"ok": True, "score": 0.9, "reason": ""}},
        **DRAWN,
    ),
]
PROPOSALS = [
    {"category": "brick", "text": "a b", "retries": []},
    {"category": "brick", "text": "a b"},
    {"category": "tile", "text": "c d", "retries": ["not_json: no object"]},
    {"category": "tile", "text": "oops", "retries": ["not_json: no object", "bad_tone: grey"]},
]
ALIGN = {"status": "done", "seconds": 3.0, "pairs": 4, "steps": 2, "loss": 0.5}
SECONDS = {"propose": 1.23456, "render": 2.0, "stats": 9.0}


@pytest.fixture
def stats() -> dict[str, Any]:
    return summarize_iteration(3, ROWS, PROPOSALS, ["brick", "tile", "wood"], ALIGN, SECONDS, STAGES)


def test_keys_in_the_order_of_stats_json(stats: dict[str, Any]):
    assert list(stats) == KEYS
    assert json.loads(json.dumps(stats)) == stats  # plain JSON types only


def test_counts_and_rejections(stats: dict[str, Any]):
    assert stats["iteration"] == 3 and stats["proposals"] == 7
    assert (stats["parse_failures"], stats["render_failures"], stats["filtered"]) == (1, 1, 1)
    assert list(stats["rejections"].items()) == [
        ("filter:match_band:too_few", 1),
        ("parse:not_json", 1),
        ("render:no_foreground", 1),
    ]
    assert (stats["kept"], stats["hard"]) == (4, 2)
    assert list(stats["renderers"].items()) == [("procedural", 3), ("perlin", 2)]  # first seen first
    assert stats["masks_absent"] == 1  # drawn without a mask; never-drawn rows do not count


def test_retry_counts_and_reasons(stats: dict[str, Any]):
    assert stats["parse_retries"] == 3 and stats["retried"] == 2
    assert list(stats["retry_reasons"].items()) == [("bad_tone: grey", 1), ("not_json: no object", 2)]


def test_shares_and_hardness(stats: dict[str, Any]):
    assert stats["hard_share"] == 0.5
    assert stats["hard_share_judge"] == pytest.approx(2 / 3)  # the unjudged kept row is left out
    assert stats["mean_hardness"] == pytest.approx((0.5 - 1.5 + 2.0 - 5.0) / 4)
    assert stats["median_hardness"] == pytest.approx((-1.5 + 0.5) / 2)
    assert stats["mean_hardness_judge"] == pytest.approx((0.2 - 0.4 + 0.6 - 1.0) / 4)


def test_diversity(stats: dict[str, Any]):
    assert stats["distinct_2"] == pytest.approx(3 / 6)  # bigrams (a b)x3, (c d)x2, (e f); "oops" has none
    assert stats["distinct_specs"] == 4  # A twice, C twice (once unrendered), B, D
    shape = -sum(p * math.log2(p) for p in (2 / 6, 1 / 6, 3 / 6))
    assert stats["field_entropy"]["shape"] == pytest.approx(shape)
    assert stats["field_entropy"]["tone"] == 0.0
    assert stats["field_entropy"]["severity"] == pytest.approx(-sum(p * math.log2(p) for p in (5 / 6, 1 / 6)))


def test_per_category_and_match_scores(stats: dict[str, Any]):
    brick, tile, wood = (stats["per_category"][name] for name in ("brick", "tile", "wood"))
    assert list(stats["per_category"]) == ["brick", "tile", "wood"]
    assert (brick["kept"], brick["hard_share"], brick["hard_share_judge"]) == (2, 0.5, 1.0)
    assert brick["match_scores"]["count"] == 3  # the rejected render was judged by the band too
    assert (tile["kept"], tile["hard_share"], tile["hard_share_judge"]) == (2, 0.5, 0.0)
    assert tile["match_scores"] is None  # no band verdict among tile's rows
    assert wood == {"kept": 0, "hard_share": None, "hard_share_judge": None, "match_scores": None}
    summary = stats["match_scores"]
    assert (summary["count"], summary["nan"]) == (3, 0)
    assert summary["quantiles"]["q50"] == pytest.approx(0.4)
    assert summary["histogram"]["counts"] == [1, 0, 0, 0, 1, 0, 0, 0, 1, 0]


def test_dpo_and_seconds(stats: dict[str, Any]):
    assert stats["dpo"] == {
        "pairs": 4,
        "steps": 2,
        "margin_before": None,
        "margin_after": None,
        "loss": 0.5,
        "note": None,
    }
    assert stats["seconds"] == {"propose": 1.235, "render": 2.0, "evaluate": 0.0, "align": 0.0}
    assert list(stats["seconds"]) == list(STAGES)


def test_inputs_are_left_unchanged():
    rows, proposals = copy.deepcopy(ROWS), copy.deepcopy(PROPOSALS)
    summarize_iteration(1, rows, proposals, ["brick"], ALIGN, SECONDS, STAGES)
    assert rows == ROWS and proposals == PROPOSALS


def test_no_rows():
    stats = summarize_iteration(1, [], [], ["brick"], {}, {}, STAGES)
    assert list(stats) == KEYS
    assert stats["proposals"] == stats["kept"] == stats["hard"] == stats["distinct_specs"] == 0
    assert stats["rejections"] == {} and stats["retry_reasons"] == {} and stats["renderers"] == {}
    for key in ("hard_share", "hard_share_judge", "mean_hardness", "mean_hardness_judge", "median_hardness"):
        assert stats[key] is None, key
    assert stats["distinct_2"] == 0.0 and set(stats["field_entropy"].values()) == {0.0}
    assert stats["match_scores"] is None
    assert stats["per_category"] == {
        "brick": {"kept": 0, "hard_share": None, "hard_share_judge": None, "match_scores": None}
    }
    assert set(stats["dpo"].values()) == {None}
    assert set(stats["seconds"].values()) == {0.0}


def test_no_kept_rows():
    """Everything rejected: the counts still add up, the shares and hardness summaries are None (rejected
    rows carry no hardness)."""
    rejected = [r for r in ROWS if r["label"] == "rejected"]
    stats = summarize_iteration(1, rejected, PROPOSALS, ["brick", "tile"], {}, {}, STAGES)
    assert stats["proposals"] == 3 and stats["kept"] == 0 and sum(stats["rejections"].values()) == 3
    for key in ("hard_share", "hard_share_judge", "mean_hardness", "mean_hardness_judge", "median_hardness"):
        assert stats[key] is None, key
    assert stats["match_scores"]["count"] == 1 and stats["renderers"] == {"procedural": 1}


def test_hard_share_skips_unlabelled_rows():
    rows = [{"label": "hard"}, {"label": "easy"}, {"label": None}, {}, {"label": "hard"}]
    assert hard_share(rows, "label") == pytest.approx(2 / 3)
    assert hard_share([{"label": None}, {}], "label") is None
    assert hard_share([], "label") is None


def test_match_scores_reads_only_band_verdicts():
    rows = [{"verdicts": _band(0.25)}, {"verdicts": {}}, {}, {"verdicts": _band(float("nan"))}]
    summary = match_scores(rows)
    assert (summary["count"], summary["nan"]) == (1, 1)
    assert match_scores([{"verdicts": {}}, {}]) is None

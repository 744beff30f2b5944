from __future__ import annotations

import json

import pytest

from kka_synth.agents import ProposalContext, parse_completion
from kka_synth.types import REGIONS

GOOD = {
    "defect_type": "contamination",
    "description": "dark residue inside the bottle",
    "region": "center",
    "size": 0.01,
    "shape": "spot",
    "tone": "darker",
    "severity": 0.4,
}


@pytest.fixture
def bottle() -> ProposalContext:
    return ProposalContext.for_category("bottle", "mvtec_ad")


def test_valid_reply_gives_a_spec(bottle: ProposalContext) -> None:
    proposal = parse_completion(json.dumps(GOOD), bottle, prompt="category: bottle (object)\n")
    assert proposal.error is None and proposal.spec is not None
    assert proposal.prompt == "category: bottle (object)\n" and proposal.text == json.dumps(GOOD)
    assert proposal.spec.category == "bottle" and proposal.spec.region == REGIONS["center"]
    assert proposal.spec.size == 0.01 and proposal.spec.severity == 0.4


def test_json_inside_chatter_still_parses(bottle: ProposalContext) -> None:
    assert parse_completion(f"Sure! {json.dumps(GOOD)} Hope it helps.", bottle).spec is not None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"defect_type": "broken_teeth"}, "unknown_type"),  # a zipper defect, not a bottle one
        ({"region": "middle"}, "bad_region"),
        ({"region": [0.5, 0.5, 0.2, 0.9]}, "bad_region"),
        ({"size": 0.9}, "bad_size"),
        ({"size": "large"}, "bad_size"),
        ({"shape": "dent"}, "bad_shape"),
        ({"tone": "red"}, "bad_tone"),
        ({"severity": 1.5}, "bad_severity"),
        ({"defect_type": 3}, "missing_field"),
    ],
)
def test_bad_values_give_their_reason(bottle: ProposalContext, change: dict, reason: str) -> None:
    text = json.dumps({**GOOD, **change})
    proposal = parse_completion(text, bottle)
    assert proposal.spec is None and proposal.error == reason and proposal.text == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("a scratch on the rim", "not_json"),
        ('{"defect_type": "contamination", "description": ', "not_json"),
        ("[1, 2, 3]", "not_json"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "tone"}), "missing_field"),
        ("[" * 100_000, "not_json"),
        ("9" * 5000, "not_json"),
    ],
)
def test_malformed_replies_give_their_reason(bottle: ProposalContext, text: str, reason: str) -> None:
    proposal = parse_completion(text, bottle)
    assert proposal.spec is None and proposal.error == reason


def test_unknown_category_uses_generic_types() -> None:
    context = ProposalContext.for_category("gear_wheel")
    assert context.knowledge.dataset == "generic"
    ok = parse_completion(json.dumps({**GOOD, "defect_type": "scratch", "shape": "scratch"}), context)
    assert ok.spec is not None and ok.spec.category == "gear_wheel"
    assert (
        parse_completion(json.dumps({**GOOD, "defect_type": "broken_large"}), context).error == "unknown_type"
    )

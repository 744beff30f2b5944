import json

import pytest

from kka_synth.types import REGIONS, DefectSpec, Proposal, SpecError

GOOD = {
    "defect_type": "crack",
    "description": "thin dark crack",
    "region": "top-left",
    "size": 0.02,
    "shape": "crack",
    "tone": "darker",
    "severity": 0.4,
}


def test_parse_valid_spec_with_named_region():
    spec = DefectSpec.from_text(json.dumps(GOOD), "brick", defect_types=["crack"])
    assert spec.region == REGIONS["top-left"]
    assert spec.region_name() == "top-left"
    assert spec.category == "brick" and spec.size == 0.02


def test_parse_box_region_and_surrounding_text():
    text = "Here it is: " + json.dumps({**GOOD, "region": [0.1, 0.2, 0.5, 0.6]}) + " done"
    spec = DefectSpec.from_text(text, "brick")
    assert spec.region == (0.1, 0.2, 0.5, 0.6)
    assert spec.region_name() is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("no json here", "not_json"),
        ("{broken", "not_json"),
        ("[1, 2]", "not_json"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "tone"}), "missing_field"),
        (json.dumps({**GOOD, "region": "middle-earth"}), "bad_region"),
        (json.dumps({**GOOD, "region": [0.5, 0.5, 0.2, 0.9]}), "bad_region"),
        (json.dumps({**GOOD, "size": 0.9}), "bad_size"),
        (json.dumps({**GOOD, "size": "big"}), "bad_size"),
        (json.dumps({**GOOD, "shape": "triangle"}), "bad_shape"),
        (json.dumps({**GOOD, "tone": "loud"}), "bad_tone"),
        (json.dumps({**GOOD, "severity": 1.5}), "bad_severity"),
        (json.dumps({**GOOD, "defect_type": "rust"}), "unknown_type"),
    ],
)
def test_every_failure_has_a_reason(text, reason):
    with pytest.raises(SpecError) as info:
        DefectSpec.from_text(text, "brick", defect_types=["crack"])
    assert info.value.reason == reason
    assert "\n" not in str(info.value)


def test_dict_round_trip_and_prompt():
    spec = DefectSpec.from_text(json.dumps(GOOD), "brick")
    again = DefectSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    prompt = spec.prompt()
    assert "crack" in prompt and "brick" in prompt and "top-left" in prompt


def test_proposal_round_trip_keeps_error():
    proposal = Proposal(prompt="p", text="t", spec=None, error="not_json")
    assert Proposal.from_dict(proposal.to_dict()) == proposal


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"size": ' + "9" * 5000 + "}", "not_json"),
        ("[" * 100000 + "]" * 100000, "not_json"),
        (json.dumps({**GOOD, "severity": 10**400}), "bad_severity"),
    ],
)
def test_pathological_replies_are_spec_errors(text, reason):
    with pytest.raises(SpecError) as info:
        DefectSpec.from_text(text, "brick")
    assert info.value.reason == reason

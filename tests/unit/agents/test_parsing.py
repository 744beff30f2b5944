from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from kka_synth.agents import ProposalContext, parse_completion
from kka_synth.agents.constraints import Constraints
from kka_synth.agents.guidance import retry_message, spec_json_schema
from kka_synth.agents.parsing import REASONS, REPAIRS, extract_object, parse_reply
from kka_synth.prompts import load_knowledge, load_knowledge_file
from kka_synth.prompts.templates import example_reply
from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES, SpecError

CORPUS_PATH = Path(__file__).resolve().parents[2] / "data" / "replies.jsonl"
CORPUS = [json.loads(line) for line in CORPUS_PATH.read_text("utf-8").splitlines()]
CATEGORIES = {**load_knowledge_file("mvtec_ad"), **load_knowledge_file("demo")}

GOOD = {
    "defect_type": "contamination",
    "description": "dark residue inside the bottle",
    "region": "center",
    "size": 0.01,
    "shape": "spot",
    "tone": "darker",
    "severity": 0.4,
}


def context(category: str) -> ProposalContext:
    return ProposalContext(category=category, knowledge=CATEGORIES[category])


@pytest.fixture
def bottle() -> ProposalContext:
    return context("bottle")


def with_fields(**changes: Any) -> str:
    return json.dumps({**GOOD, **changes})


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_shape() -> None:
    assert len(CORPUS) == 200
    assert all(set(line) == {"category", "reply", "expect", "mode", "retry"} for line in CORPUS)
    assert {line["category"] for line in CORPUS} <= set(CATEGORIES)
    assert {line["expect"] for line in CORPUS} == {"ok", *REASONS}
    modes = collections.Counter(line["mode"] for line in CORPUS)
    assert modes["clean"] >= 40 and len(modes) >= 25
    failures = [line for line in CORPUS if line["expect"] != "ok"]
    assert all(line["retry"] is None for line in CORPUS if line["expect"] == "ok")
    with_retry = [line for line in failures if line["retry"] is not None]
    assert 0.4 <= len(with_retry) / len(failures) <= 0.6
    retried = [parse_reply(line["retry"], context(line["category"]))[0] for line in with_retry]
    assert any(p.spec is not None for p in retried) and any(p.spec is None for p in retried)


@pytest.mark.parametrize("line", CORPUS, ids=[f"{i:03d}-{line['mode']}" for i, line in enumerate(CORPUS)])
def test_corpus_reply_gives_its_expected_outcome(line: dict) -> None:
    ctx = context(line["category"])
    proposal, detail = parse_reply(line["reply"], ctx, prompt="p")
    assert (proposal.error or "ok") == line["expect"], detail
    assert proposal.text == line["reply"] and proposal.prompt == "p"
    assert (detail == "") == (proposal.spec is not None) and "\n" not in detail
    if proposal.spec is not None:
        assert proposal.spec.category == line["category"]
        assert proposal.spec.defect_type in ctx.knowledge.defect_types
        _, repairs = extract_object(line["reply"])
        assert (repairs == []) == (line["mode"] in ("clean", "extra_keys"))
        assert set(repairs) <= set(REPAIRS)
    legacy = parse_completion(line["reply"], ctx)
    assert legacy.spec == proposal.spec
    assert legacy.error == (
        "not_json" if proposal.error in ("empty", "truncated", "refusal") else proposal.error
    )


# ------------------------------------------------------------------------------------------------ repairs
def test_clean_json_needs_no_repair() -> None:
    assert extract_object(json.dumps(GOOD)) == (GOOD, [])
    assert extract_object(json.dumps(GOOD, indent=4) + "\n") == (GOOD, [])


@pytest.mark.parametrize(
    ("text", "repairs", "field", "value"),
    [
        (f"```json\n{json.dumps(GOOD)}\n```", ["code_fence"], "size", 0.01),
        (f"Here's one: {json.dumps(GOOD)} Thanks!", ["surrounding_text"], "size", 0.01),
        (json.dumps([GOOD]), ["list_of_one"], "size", 0.01),
        (json.dumps({"spec": GOOD, "why": "subtle"}), ["wrapped"], "size", 0.01),
        (json.dumps({"defect": {"spec": GOOD}}), ["wrapped"], "size", 0.01),
        (json.dumps(GOOD)[:-1] + ",}", ["trailing_comma"], "severity", 0.4),
        (json.dumps(GOOD).replace('"', "'"), ["single_quotes"], "tone", "darker"),
        (json.dumps({**GOOD, "extra": "X"}).replace('"X"', "None"), ["python_literals"], "extra", None),
        (json.dumps(GOOD).replace(', "size"', ', // why\n "size"'), ["comments"], "size", 0.01),
        (json.dumps(GOOD).replace('"defect_type"', "defect_type"), ["unquoted_keys"], "size", 0.01),
        (
            json.dumps(GOOD).replace('"defect_type"', '"defectType"'),
            ["key_case"],
            "defect_type",
            "contamination",
        ),
        (with_fields(size="2%"), ["percent_size"], "size", 0.02),
        (with_fields(size="0.02 of the area"), ["size_text"], "size", 0.02),
        (with_fields(severity="subtle"), ["word_severity"], "severity", 0.3),
        (with_fields(severity="Very High"), ["word_severity"], "severity", 0.9),
        (with_fields(severity="40%"), ["severity_percent"], "severity", 0.4),
        (with_fields(severity="3/10"), ["severity_fraction"], "severity", 0.3),
        (with_fields(severity="0.6 (visible)"), ["severity_text"], "severity", 0.6),
        (with_fields(region="Top-Left"), ["value_case"], "region", "top-left"),
        (with_fields(region="bottom right"), ["value_spelling"], "region", "bottom-right"),
        (with_fields(tone="color"), ["value_spelling"], "tone", "colour"),
        (
            with_fields(defect_type="Broken Small"),
            ["value_case", "value_spelling"],
            "defect_type",
            "broken_small",
        ),
        (with_fields(region="[0.1, 0.2, 0.5, 0.6]"), ["region_box_text"], "region", [0.1, 0.2, 0.5, 0.6]),
        (
            with_fields(region={"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.6}),
            ["region_box_object"],
            "region",
            [0.1, 0.2, 0.5, 0.6],
        ),
        (
            with_fields(region={"x": 0.5, "y": 0.25, "width": 0.25, "height": 0.5}),
            ["region_box_object"],
            "region",
            [0.5, 0.25, 0.75, 0.75],
        ),
    ],
)
def test_each_repair_is_named_and_gives_the_value(
    text: str, repairs: list[str], field: str, value: Any
) -> None:
    data, used = extract_object(text)
    assert used == repairs
    assert data[field] == pytest.approx(value) if isinstance(value, float) else data[field] == value


def test_first_of_many_takes_the_first_spec(bottle: ProposalContext) -> None:
    second = {**GOOD, "defect_type": "broken_small", "shape": "crack"}
    text = f"Option A:\n{json.dumps(GOOD)}\nOption B:\n{json.dumps(second)}"
    data, repairs = extract_object(text)
    assert data["defect_type"] == "contamination" and repairs == ["surrounding_text", "first_of_many"]
    assert extract_object(json.dumps([second, GOOD]))[0]["defect_type"] == "broken_small"


def test_braces_and_quotes_inside_strings_do_not_end_the_object(bottle: ProposalContext) -> None:
    description = 'residue shaped like a } and a { with "quotes" and // slashes'
    text = "Here's my {draft} idea: " + json.dumps({**GOOD, "description": description}) + " (ok? {yes})"
    data, repairs = extract_object(text)
    assert data["description"] == description and repairs == ["surrounding_text"]
    proposal, _ = parse_reply(text, bottle)
    assert proposal.spec is not None and proposal.spec.description == description


def test_apostrophe_in_a_single_quoted_string_is_not_json_not_truncated() -> None:
    text = "{'defect_type': 'contamination', 'description': 'the bottle's film', 'region': 'center'}"
    with pytest.raises(SpecError) as error:
        extract_object(text)
    assert error.value.reason == "not_json"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("```json\n```", "empty"),
        ('{"defect_type": "contamination", "description": "a long', "truncated"),
        ('```json\n{"defect_type": "contamination",\n', "truncated"),
        ("{" * 100_000, "not_json"),  # opens, but no JSON follows: not a cut-off spec
        ("I'm sorry, but I can't help with that.", "refusal"),
        ("As an AI, I do not make defects.", "refusal"),
        ("a scratch on the rim, severity 0.3", "not_json"),
        ("[1, 2, 3]", "not_json"),
        ("[" * 100_000, "not_json"),
        ("{" * 5000 + "}" * 5000, "not_json"),
        ("9" * 5000, "not_json"),
        ('{"defect_type": "contamination" "size": 0.01}', "not_json"),
        ('{"defect_type": contamination}', "not_json"),
    ],
)
def test_replies_without_a_usable_object(text: str, reason: str, bottle: ProposalContext) -> None:
    with pytest.raises(SpecError) as error:
        extract_object(text)
    assert error.value.reason == reason
    proposal, detail = parse_reply(text, bottle)
    assert proposal.error == reason and proposal.spec is None and detail
    assert parse_completion(text, bottle).error == "not_json"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (with_fields(size="60%"), "bad_size"),  # 0.6 after coercion: still out of range
        (with_fields(size="3 mm"), "bad_size"),  # a length is not an area share
        (with_fields(size="0.3 of a millimetre"), "bad_size"),
        (with_fields(size=2), "bad_size"),  # meant 2%, but a number is never rescaled
        (with_fields(severity=7), "bad_severity"),  # a 1-10 scale is not guessed
        (with_fields(severity="very noticeable"), "bad_severity"),
        (with_fields(severity="-0.2"), "bad_severity"),
        (with_fields(region="upper left"), "bad_region"),
        (with_fields(region="middle"), "bad_region"),
        (with_fields(region=[120, 40, 180, 90]), "bad_region"),
        (with_fields(shape="dent"), "bad_shape"),
        (with_fields(tone="dark"), "bad_tone"),
        (with_fields(defect_type="Scratch", shape="scratch"), "unknown_type"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "tone"}), "missing_field"),
        (
            json.dumps({"type": "contamination", **{k: v for k, v in GOOD.items() if k != "defect_type"}}),
            "missing_field",
        ),
    ],
)
def test_semantic_nonsense_stays_a_rejection(text: str, reason: str, bottle: ProposalContext) -> None:
    proposal, detail = parse_reply(text, bottle)
    assert proposal.spec is None and proposal.error == reason and detail
    assert parse_completion(text, bottle).error == reason


def test_valid_json_parses_exactly_as_before(bottle: ProposalContext) -> None:
    proposal, detail = parse_reply(json.dumps(GOOD), bottle, prompt="q")
    assert detail == "" and proposal.error is None and proposal.prompt == "q"
    assert proposal.spec is not None and proposal.spec.region == REGIONS["center"]
    assert (proposal.spec.size, proposal.spec.severity, proposal.spec.tone) == (0.01, 0.4, "darker")
    assert parse_completion(json.dumps(GOOD), bottle).spec == proposal.spec


# ------------------------------------------------------------------------------------------------ constraints
def test_constraints_reject_with_their_reason(bottle: ProposalContext) -> None:
    bottle.constraints = Constraints(exclude_types=["contamination"])
    proposal, detail = parse_reply(json.dumps(GOOD), bottle)
    assert proposal.spec is None and proposal.error == "constraint_type" and "contamination" in detail
    bottle.constraints = Constraints(size_max=0.05)
    assert parse_reply(json.dumps(GOOD), bottle)[0].spec is not None


def test_constraints_without_explain_and_plain_lists(bottle: ProposalContext) -> None:
    class OnlyViolation:
        def violation(self, spec):
            return "constraint_tone" if spec.tone == "darker" else None

    bottle.constraints = OnlyViolation()  # type: ignore[assignment]
    proposal, detail = parse_reply(json.dumps(GOOD), bottle)
    assert proposal.error == "constraint_tone" and "constraint_tone" in detail
    assert parse_reply(with_fields(tone="colour"), bottle)[0].spec is not None
    bottle.constraints = ["avoid the rim"]  # type: ignore[assignment]
    assert parse_reply(json.dumps(GOOD), bottle)[0].spec is not None


# ------------------------------------------------------------------------------------------------ retry
def test_retry_message_names_the_category_types_for_unknown_type(bottle: ProposalContext) -> None:
    proposal, detail = parse_reply(with_fields(defect_type="scratch", shape="scratch"), bottle)
    message = retry_message(proposal.error, detail, bottle)
    assert "defect type 'scratch' is not known for 'bottle'" in message
    assert all(f'"{name}"' in message for name in ("broken_large", "broken_small", "contamination"))
    assert '"zipper"' not in message and "${" not in message
    assert all(f'"{key}"' in message for key in SPEC_FIELDS)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("bad_region", [f'"{name}"' for name in REGIONS]),
        ("bad_shape", [f'"{name}"' for name in SHAPES]),
        ("bad_tone", [f'"{name}"' for name in TONES]),
        ("bad_size", ["0.0005", "0.5"]),
        ("bad_severity", ["0.0", "1.0"]),
        ("truncated", ["short"]),
        ("empty", ["the reply was empty"]),
    ],
)
def test_retry_message_gives_the_allowed_values(
    reason: str, expected: list[str], bottle: ProposalContext
) -> None:
    message = retry_message(reason, "", bottle)
    assert message.startswith("Your reply was not a valid defect spec: ")
    assert all(text in message for text in expected), message


def test_retry_message_for_constraints_and_bad_reasons(bottle: ProposalContext) -> None:
    bottle.constraints = Constraints(exclude_types=["contamination"])
    message = retry_message("constraint_type", "defect type 'contamination' is excluded", bottle)
    assert "Do not use these defect types: contamination." in message
    with pytest.raises(ValueError, match="unknown parse reason 'oops'"):
        retry_message("oops", "", bottle)


# ------------------------------------------------------------------------------------------------ schema
def check_schema(schema: dict, value: Any) -> list[str]:
    """Errors of ``value`` against the subset of JSON Schema that spec_json_schema uses."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return ["not an object"]
        errors = [f"missing {key}" for key in schema.get("required", []) if key not in value]
        if schema.get("additionalProperties") is False:
            errors += [f"extra {key}" for key in value if key not in schema["properties"]]
        for key, sub in schema["properties"].items():
            if key in value:
                errors += [f"{key}: {e}" for e in check_schema(sub, value[key])]
        return errors
    if kind == "string" and not isinstance(value, str):
        return ["not a string"]
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return ["not a number"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{value!r} not in enum")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append("below minimum")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append("above maximum")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append("too long")
    return errors


def test_spec_json_schema_shape() -> None:
    knowledge = load_knowledge("bottle", "mvtec_ad")
    schema = spec_json_schema(knowledge)
    assert json.loads(json.dumps(schema)) == schema
    assert schema["type"] == "object" and schema["additionalProperties"] is False
    assert schema["required"] == list(SPEC_FIELDS) == list(schema["properties"])
    properties = schema["properties"]
    assert properties["defect_type"]["enum"] == ["broken_large", "broken_small", "contamination"]
    assert properties["region"]["enum"] == list(REGIONS)
    assert properties["shape"]["enum"] == list(SHAPES) and properties["tone"]["enum"] == list(TONES)
    assert (properties["size"]["minimum"], properties["size"]["maximum"]) == (0.0005, 0.5)
    assert (properties["severity"]["minimum"], properties["severity"]["maximum"]) == (0.0, 1.0)
    assert properties["description"] == {"type": "string", "maxLength": 200}


@pytest.mark.parametrize("category", ["bottle", "zipper", "brick", "washer"])
def test_spec_json_schema_accepts_the_example_reply(category: str) -> None:
    knowledge = CATEGORIES[category]
    assert check_schema(spec_json_schema(knowledge), json.loads(example_reply(knowledge))) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"defect_type": "broken_teeth"}, "defect_type: 'broken_teeth' not in enum"),
        ({"region": [0.1, 0.1, 0.5, 0.5]}, "region: not a string"),
        ({"region": "middle"}, "region: 'middle' not in enum"),
        ({"size": 0.9}, "size: above maximum"),
        ({"size": 0.0001}, "size: below minimum"),
        ({"size": "2%"}, "size: not a number"),
        ({"shape": "dent"}, "shape: 'dent' not in enum"),
        ({"tone": "colour", "severity": 1.5}, "severity: above maximum"),
        ({"severity": True}, "severity: not a number"),
        ({"description": "x" * 201}, "description: too long"),
        ({"rationale": "subtle"}, "extra rationale"),
    ],
)
def test_spec_json_schema_rejects_bad_specs(change: dict, error: str) -> None:
    schema = spec_json_schema(CATEGORIES["bottle"])
    assert check_schema(schema, GOOD) == []
    assert check_schema(schema, {**GOOD, **change}) == [error]
    assert check_schema(schema, {k: v for k, v in GOOD.items() if k != "tone"}) == ["missing tone"]

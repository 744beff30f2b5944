from __future__ import annotations

import pytest

from kka_synth.prompts import TemplateError, chat_messages, load_knowledge, render_prompt
from kka_synth.prompts.templates import example_reply, template_fields, template_names
from kka_synth.types import REGIONS, SPEC_FIELDS, DefectSpec


def test_compact_prompt_is_one_line() -> None:
    assert render_prompt("compact", category="bottle", kind="object") == "category: bottle (object)\n"
    assert template_fields("compact") == ["category", "kind"]


def test_missing_field_and_unknown_template_are_clear_errors() -> None:
    with pytest.raises(TemplateError, match="prompt template 'compact' needs field 'kind'"):
        render_prompt("compact", category="bottle")
    with pytest.raises(TemplateError, match=r"unknown prompt template 'nope' \(known: .*compact"):
        render_prompt("nope")
    assert {"compact", "chat_system", "chat_user"} <= set(template_names())


def test_chat_messages_carry_schema_and_knowledge() -> None:
    knowledge = load_knowledge("bottle")
    system, user = chat_messages(knowledge)
    assert system["role"] == "system" and user["role"] == "user"
    positions = [system["content"].index(f'"{key}"') for key in SPEC_FIELDS]
    assert positions == sorted(positions)
    assert all(f'"{region}"' in system["content"] for region in REGIONS)
    for name, defect in knowledge.defect_types.items():
        assert f"- {name}:" in user["content"] and defect.phrases[0] in user["content"]
    assert "Earlier defects" not in user["content"] and "Constraints" not in user["content"]
    assert "${" not in system["content"] + user["content"]


def test_chat_messages_with_examples_and_constraints() -> None:
    knowledge = load_knowledge("washer")
    shot = example_reply(knowledge)
    _, user = chat_messages(knowledge, examples=[shot], constraints=["avoid the rim"])
    assert shot in user["content"] and "- avoid the rim" in user["content"]


def test_example_reply_parses_for_its_category() -> None:
    for category in ("bottle", "pcb4", "brick"):
        knowledge = load_knowledge(category)
        spec = DefectSpec.from_text(example_reply(knowledge), category, list(knowledge.defect_types))
        assert spec.defect_type in knowledge.defect_types

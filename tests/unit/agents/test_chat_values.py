"""The pure helpers behind the chat tools: reading typed values, the constraint edits, replies as text."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from kka_synth.agents.chat_constraints import (
    constraint_field,
    constraint_values,
    held_values,
    prompt_set_listing,
    remove_values,
)
from kka_synth.agents.chat_preview import TINT, tinted
from kka_synth.agents.chat_values import (
    MAX_SPECS,
    ToolError,
    canonical_name,
    describe_spec,
    example_text,
    first_line,
    knowledge_lines,
    match_category,
    match_names,
    parse_count,
    parse_fraction,
    parse_numbers,
    proposals_reply,
    singulars,
    snake_name,
)
from kka_synth.agents.constraints import ALL, Constraints, PromptSet
from kka_synth.prompts.knowledge import CategoryKnowledge, DefectKnowledge
from kka_synth.types import SPEC_FIELDS, DefectSpec, Proposal


def _spec(region: tuple[float, float, float, float] = (0.0, 0.0, 0.5, 0.5)) -> DefectSpec:
    return DefectSpec("washer", "rust", "rust spot", region, 0.015, "spot", "colour", 0.25)


def test_singulars_and_snake_name() -> None:
    assert singulars("stains") == ["stains", "stain"]
    assert singulars("scratches") == ["scratches", "scratch", "scratche"]
    assert singulars("cavities") == ["cavities", "cavity", "caviti", "cavitie"]
    assert singulars("gas") == ["gas", "ga"]
    assert singulars("is") == ["is"]  # too short to lose its s
    assert snake_name("  Edge chips ") == "edge_chips"
    assert snake_name("top-left\tcorner") == "top_left_corner"


def test_parse_fraction_reads_percent_and_refuses_words() -> None:
    assert parse_fraction("2%", "size_max") == pytest.approx(0.02)
    assert parse_fraction(" 5 percent", "size_max") == pytest.approx(0.05)
    assert parse_fraction(0.3, "severity_max") == 0.3
    assert parse_fraction("0.25", "severity_max") == 0.25
    with pytest.raises(ToolError, match=r"^size_max must be a number such as 0.02 or 2%, got 'big'$"):
        parse_fraction("big", "size_max")


def test_parse_count_bounds_and_types() -> None:
    assert parse_count(1) == 1 and parse_count(" 16 ") == MAX_SPECS == 16
    for bad in (0, 17, True, 2.0, "three", None):
        with pytest.raises(ToolError, match="^n must be a whole number from 1 to 16"):
            parse_count(bad)
    with pytest.raises(ToolError, match="^top must be"):
        parse_count(-1, "top")


def test_parse_numbers_keeps_order_and_refuses_out_of_range() -> None:
    assert parse_numbers([3, "1", 3], 3, "washer") == [3, 1, 3]
    assert parse_numbers((2,), 2, "washer") == [2]
    with pytest.raises(ToolError, match="non-empty list of proposal numbers 1-3"):
        parse_numbers([], 3, "washer")
    with pytest.raises(ToolError, match="non-empty list"):
        parse_numbers(2, 3, "washer")
    with pytest.raises(ToolError, match=r"^no proposal 4 for washer; the last ones are 1-3$"):
        parse_numbers([1, 4], 3, "washer")
    with pytest.raises(ToolError, match="no proposal True"):
        parse_numbers([True], 3, "washer")


def test_match_category_exact_plural_prefix_and_errors() -> None:
    known = ["brick", "screw", "screw_bag", "washer"]
    assert match_category("Washers", known) == "washer"
    assert match_category("screw", known) == "screw"  # exact wins over the prefix of screw_bag
    assert match_category("screw bag", known) == "screw_bag"
    assert match_category("bri", known) == "brick"
    with pytest.raises(ToolError, match=r"'scr' matches several categories: screw, screw_bag"):
        match_category("scr", known)
    with pytest.raises(
        ToolError, match=r"^unknown category 'bottle' \(known: brick, screw, screw_bag, washer\)$"
    ):
        match_category("bottle", known)
    with pytest.raises(ToolError, match="no category in focus"):
        match_category("  ", known)


def test_canonical_name_aliases() -> None:
    assert canonical_name("regions", "Top Left") == "top-left"
    assert canonical_name("exclude_regions", "upper_right") == "top-right"
    assert canonical_name("regions", "middle") == "center"
    assert canonical_name("tones", "Dark") == "darker"
    assert canonical_name("exclude_tones", "discolored") == "colour"
    assert canonical_name("shapes", "Blobs") == "blob"
    assert canonical_name("shapes", "scratches") == "scratch"
    assert canonical_name("shapes", "zigzag") == "zigzag"  # unknown names come back normalised


def test_match_names_whole_word_then_substring() -> None:
    names = ["chip", "edge_chip", "scratch", "stain"]
    assert match_names("chips", names) == ["chip", "edge_chip"]
    assert match_names("Edge chip", names) == ["edge_chip"]
    assert match_names("scrat", names) == ["scratch"]  # no whole word: a substring of 3+ letters
    assert match_names("st", names) == []  # too short for a substring
    assert match_names("dent", names) == []


def test_describe_spec_and_example_text() -> None:
    named = Proposal("p", "t", spec=_spec())
    assert describe_spec(named) == (
        'rust at top-left, size 1.5% of the object, spot, colour, severity 0.25: "rust spot"'
    )
    boxed = Proposal("p", "t", spec=_spec((0.1, 0.2, 0.3, 0.4)))
    assert describe_spec(boxed).startswith("rust at [0.10, 0.20, 0.30, 0.40], size 1.5%")
    assert describe_spec(Proposal("p", "t", error="not_json")) == "(rejected: not_json)"
    text = example_text(named)
    assert list(json.loads(text)) == list(SPEC_FIELDS)
    assert json.loads(text)["region"] == "top-left"
    assert DefectSpec.from_text(text, "washer") == named.spec
    assert json.loads(example_text(boxed))["region"] == [0.1, 0.2, 0.3, 0.4]
    with pytest.raises(ToolError, match=r"a rejected proposal \(bad_size\) cannot be an example"):
        example_text(Proposal("p", "t", error="bad_size"))


def test_first_line_and_proposals_reply() -> None:
    assert first_line(ValueError("one\ntwo")) == "one"
    assert first_line(KeyError()) == "KeyError"
    kept = [Proposal("p", "t", spec=_spec())]
    reply = proposals_reply("washer", kept, 2, Counter({"not_json": 1, "bad_size": 3, "bad_tone": 1}), 3)
    assert reply.splitlines() == [
        "1 proposal(s) for washer:",
        f"1. {describe_spec(kept[0])}",
        "only 1 of 2 parsed after 3 rounds",
        "rejected replies: 5 (bad_size 3, bad_tone 1, not_json 1)",
    ]
    assert proposals_reply("washer", kept, 1, Counter(), 3).splitlines()[-1] == "rejected replies: 0"


def test_knowledge_lines() -> None:
    rust = DefectKnowledge("rust", ("top", "center"), ("spot",), ("colour",), (0.005, 0.02), ("a", "b", "c"))
    knowledge = CategoryKnowledge("washer", "object", ("ring", "hole"), {"rust": rust})
    assert knowledge_lines("washer", knowledge) == [
        "washer: object, components: ring, hole",
        "- rust: regions top, center; shapes spot; tones colour; size 0.5-2%; e.g. a; b",
    ]


def test_constraint_field_and_values() -> None:
    assert constraint_field("Exclude types") == "exclude_types"
    with pytest.raises(ToolError, match="unknown constraint field 'colour'"):
        constraint_field("colour")

    def types() -> list[str]:
        return ["chip", "edge_chip", "rust"]

    assert constraint_values("size_max", "2%", types, "washer") == [pytest.approx(0.02)]
    assert constraint_values("exclude_types", "chips", types, "washer") == ["chip", "edge_chip"]
    assert constraint_values("exclude_regions", "lower left", types, "washer") == ["bottom-left"]
    assert constraint_values("notes", "  near the rim ", types, "washer") == ["near the rim"]
    with pytest.raises(
        ToolError, match=r"^washer has no defect type like 'stain' \(known: chip, edge_chip, rust\)$"
    ):
        constraint_values("only_types", "stain", types, "washer")
    with pytest.raises(ToolError, match="^tones: 'purple' is not one of darker, brighter, colour$"):
        constraint_values("tones", "purple", types, "washer")
    with pytest.raises(ToolError, match="^notes needs a value$"):
        constraint_values("notes", " ", types, "washer")


def test_remove_values_and_listing() -> None:
    prompt_set = PromptSet(dataset="demo")
    prompt_set.constraints["washer"] = Constraints(exclude_types=["chip", "edge_chip", "rust"], notes=["Rim"])
    prompt_set.constraints[ALL] = Constraints(size_max=0.02)
    assert held_values("exclude_types", "chips", ["chip", "edge_chip", "rust"]) == ["chip", "edge_chip"]
    assert held_values("notes", "rim", ["Rim", "rim zone"]) == ["Rim", "rim zone"]
    assert held_values("regions", "top left", ["top-left", "top"]) == ["top-left"]
    reply = remove_values(prompt_set, "washer", "exclude_types", "chips")
    assert reply.startswith("washer: removed exclude_types chip, edge_chip\nconstraints for washer")
    assert prompt_set.constraints["washer"].exclude_types == ["rust"]
    assert remove_values(prompt_set, ALL, "size_max", "anything").startswith(
        "all categories: removed size_max 0.02"
    )
    assert prompt_set.constraints[ALL].empty
    with pytest.raises(ToolError, match="^all categories has no size_max constraint"):
        remove_values(prompt_set, ALL, "size_max", None)
    with pytest.raises(ToolError, match=r"exclude_types of washer holds no 'dent' \(it holds rust\)"):
        remove_values(prompt_set, "washer", "exclude_types", "dent")
    prompt_set.examples["washer"] = ["{}"]
    listing = prompt_set_listing(prompt_set, None).splitlines()
    assert (
        listing[0].startswith("constraints for washer: ") and listing[-1] == "washer: 1 approved example(s)"
    )
    assert prompt_set_listing(PromptSet(), None) == "no constraints and no approved examples yet"
    assert prompt_set_listing(prompt_set, "washer").splitlines()[1:] == ["approved examples: 1", "  {}"]


def test_tinted_mixes_only_masked_pixels() -> None:
    image = np.full((4, 5, 3), 100, np.uint8)
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    out = tinted(image, mask, (255, 0, 255))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    expected = np.round((1 - TINT) * 100 + TINT * np.array([255, 0, 255])).astype(np.uint8)
    assert (out[1, 2] == expected).all() and list(expected) == [162, 60, 162]
    assert (out[~mask] == 100).all()

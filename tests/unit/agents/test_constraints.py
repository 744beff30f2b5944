from __future__ import annotations

import pytest

from kka_synth.agents.constraints import ALL, ConstraintError, Constraints, PromptSet
from kka_synth.prompts.knowledge import load_knowledge
from kka_synth.types import REGIONS, DefectSpec


def _spec(**changes) -> DefectSpec:
    values = {
        "category": "bottle",
        "defect_type": "broken_small",
        "description": "small chip",
        "region": (0.1, 0.0, 0.4, 0.3),
        "size": 0.01,
        "shape": "hole",
        "tone": "darker",
        "severity": 0.3,
    }
    return DefectSpec(**{**values, **changes})


def test_violation_names_the_first_broken_constraint() -> None:
    rules = Constraints(exclude_types=["contamination"], regions=["top"], size_max=0.02, severity_max=0.5)
    assert rules.violation(_spec(region=(0.1, 0.0, 0.4, 0.3))) is None  # a box inside "top" counts
    assert rules.violation(_spec(defect_type="contamination")) == "constraint_type"
    assert rules.violation(_spec(region=REGIONS["bottom"])) == "constraint_region"
    assert rules.violation(_spec(size=0.05)) == "constraint_size"
    assert rules.violation(_spec(severity=0.8)) == "constraint_severity"
    assert Constraints(exclude_tones=["darker"]).violation(_spec()) == "constraint_tone"
    assert Constraints(shapes=["scratch"]).violation(_spec()) == "constraint_shape"
    assert (
        Constraints(only_types=["broken_large"]).explain(_spec())[1].startswith("defect type 'broken_small'")
    )
    assert Constraints().violation(_spec()) is None and Constraints().empty


def test_lines_say_every_constraint() -> None:
    rules = Constraints(exclude_types=["stain"], size_min=0.001, size_max=0.02, notes=["keep scratches thin"])
    lines = rules.lines()
    assert "Do not use these defect types: stain." in lines
    assert 'The "size" must be between 0.001 and 0.02.' in lines
    assert lines[-1] == "keep scratches thin"
    assert Constraints().lines() == []


def test_narrow_drops_types_and_values() -> None:
    bottle = load_knowledge("bottle", "mvtec_ad")
    first = next(iter(bottle.defect_types))
    narrowed = Constraints(exclude_types=[first], size_max=0.01).narrow(bottle)
    assert first not in narrowed.defect_types and narrowed.defect_types
    assert all(d.size[1] <= 0.01 for d in narrowed.defect_types.values())
    with pytest.raises(ConstraintError, match="leave no defect type to propose for 'bottle'"):
        Constraints(only_types=["no_such_type"]).narrow(bottle)
    assert Constraints().narrow(bottle) is bottle


def test_add_remove_merge() -> None:
    rules = Constraints().add("exclude_types", "stain").add("size_max", "0.02").add("exclude_types", "stain")
    assert rules.exclude_types == ["stain"] and rules.size_max == 0.02
    assert rules.remove("size_max").size_max is None
    assert rules.remove("exclude_types", "stain").remove("size_max").empty
    with pytest.raises(ConstraintError, match="holds no 'crack'"):
        rules.remove("exclude_types", "crack")
    with pytest.raises(ConstraintError, match="unknown constraint 'colour'"):
        rules.add("colour", "red")
    with pytest.raises(ConstraintError, match="size_max must be a number"):
        rules.add("size_max", "two percent")
    both = rules.merged(Constraints(exclude_types=["crack"], size_max=0.01, regions=["top", "left"]))
    assert (
        both.exclude_types == ["stain", "crack"] and both.size_max == 0.01 and both.regions == ["top", "left"]
    )
    with pytest.raises(ConstraintError, match="exclude each other"):
        Constraints(regions=["top"]).merged(Constraints(regions=["bottom"]))


def test_bad_values_are_one_line_errors() -> None:
    with pytest.raises(ConstraintError, match="regions: 'middle' is not one of"):
        Constraints(regions=["middle"])
    with pytest.raises(ConstraintError, match=r"size_max must be in \[0.0005, 0.5\]"):
        Constraints(size_max=2.0)
    with pytest.raises(ConstraintError, match="size_min .* is above size_max"):
        Constraints(size_min=0.1, size_max=0.01)


def test_prompt_set_round_trip_and_errors(tmp_path) -> None:
    prompt_set = PromptSet(
        constraints={ALL: Constraints(size_max=0.05), "bottle": Constraints(exclude_types=["contamination"])},
        examples={"bottle": ['{"defect_type": "broken_small"}']},
        dataset="mvtec_ad",
    )
    path = prompt_set.save(tmp_path / "set" / "prompts.yaml")
    loaded = PromptSet.load(path)
    assert loaded == prompt_set
    merged = loaded.for_category("bottle")
    assert merged.size_max == 0.05 and merged.exclude_types == ["contamination"]
    assert loaded.for_category("cable").exclude_types == []
    (tmp_path / "bad.yaml").write_text("constraints:\n  bottle:\n    exclude_colour: [red]\n")
    with pytest.raises(ConstraintError, match="bad.yaml: unknown constraint 'exclude_colour'"):
        PromptSet.load(tmp_path / "bad.yaml")
    with pytest.raises(ConstraintError, match="prompt set not found"):
        PromptSet.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(ConstraintError, match="must hold a mapping"):
        PromptSet.load(tmp_path / "list.yaml")

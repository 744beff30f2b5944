"""Preference pairs: ranking rule, failed completions, caps and TRL's columns."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

from kka_synth.alignment.pairs import Outcome, PairsInputError, build_pairs, pairs_to_columns
from kka_synth.types import Candidate, PreferencePair, Proposal


def _item(prompt: str, text: str, label: str, hardness: float | None = None) -> tuple[Proposal, Outcome]:
    return Proposal(prompt=prompt, text=text), Outcome(label, hardness)


def _random_items(rng: np.random.Generator, prompts: int, per_prompt: int) -> list[tuple[Proposal, Outcome]]:
    items = []
    for p in range(prompts):
        for i in range(per_prompt):
            roll = rng.random()
            if roll < 0.2:
                items.append(_item(f"prompt {p}", f"failed {p}-{i}", "rejected"))
            else:
                h = float(rng.normal())
                items.append(_item(f"prompt {p}", f"text {p}-{i}", "hard" if h > 0 else "easy", h))
    return items


def _rank(outcome: Outcome) -> tuple[int, float]:
    order = {"hard": 2, "easy": 1, "rejected": 0}
    return (order[outcome.label], -np.inf if outcome.hardness is None else outcome.hardness)


def test_pairs_by_hand() -> None:
    items = [
        _item("A", "b", "hard", 1.0),
        _item("A", "d", "rejected"),
        _item("A", "a", "hard", 2.0),
        _item("A", "c", "easy", -1.0),
        _item("B", "x", "easy", -0.5),
    ]
    pairs = build_pairs(items, pairs_per_prompt=2, max_pairs=100, rng=np.random.default_rng(0))
    got = [(p.prompt, p.chosen, p.rejected) for p in pairs]
    assert got == [("A", "a", "d"), ("A", "a", "c"), ("A", "b", "d"), ("A", "b", "c")]  # B has one text only


def test_chosen_always_harder_failed_only_rejected_and_caps() -> None:
    items = _random_items(np.random.default_rng(0), prompts=5, per_prompt=20)
    outcome = {(p.prompt, p.text): o for p, o in items}
    m = 4
    pairs = build_pairs(items, pairs_per_prompt=m, max_pairs=10_000, rng=np.random.default_rng(0))
    assert pairs and all(isinstance(p, PreferencePair) for p in pairs)
    for pair in pairs:
        chosen, rejected = outcome[(pair.prompt, pair.chosen)], outcome[(pair.prompt, pair.rejected)]
        assert chosen.label != "rejected"
        assert _rank(chosen) > _rank(rejected)
        assert pair.chosen != pair.rejected
    failed_in_rejected = [p for p in pairs if p.rejected.startswith("failed")]
    assert failed_in_rejected and not any(p.chosen.startswith("failed") for p in pairs)
    for prompt in {p.prompt for p in pairs}:
        mine = [p for p in pairs if p.prompt == prompt]
        assert len({p.chosen for p in mine}) <= m and len({p.rejected for p in mine}) <= m
        assert len(mine) <= m * m
        kept = sorted(
            (o.hardness for (pr, _), o in outcome.items() if pr == prompt and o.hardness is not None),
            reverse=True,
        )
        assert {outcome[(prompt, p.chosen)].hardness for p in mine} == set(kept[:m])  # the m hardest
    assert len(pairs) == len(set(pairs))


def test_max_pairs_cap_is_a_seeded_subset() -> None:
    items = _random_items(np.random.default_rng(1), prompts=4, per_prompt=16)
    full = build_pairs(items, 4, 10_000, np.random.default_rng(0))
    capped = build_pairs(items, 4, 10, np.random.default_rng(5))
    assert len(full) > 10 and len(capped) == 10
    assert set(capped) <= set(full)
    assert [full.index(p) for p in capped] == sorted(full.index(p) for p in capped)  # original order kept
    assert capped == build_pairs(items, 4, 10, np.random.default_rng(5))
    assert capped != build_pairs(items, 4, 10, np.random.default_rng(6))


def test_identical_texts_and_ties_give_no_pair() -> None:
    items = [
        _item("A", "same", "hard", 1.0),
        _item("A", "same", "easy", -1.0),
        _item("A", "t1", "easy", -2.0),
        _item("A", "t2", "easy", -2.0),
        _item("B", "f1", "rejected"),
        _item("B", "f2", "rejected"),
    ]
    pairs = build_pairs(items, 3, 100, np.random.default_rng(0))
    assert all(p.chosen != p.rejected for p in pairs)
    assert not any({p.chosen, p.rejected} == {"t1", "t2"} for p in pairs)  # equal hardness: no preference
    assert not any(p.prompt == "B" for p in pairs)  # only failures: nothing to prefer
    assert {(p.chosen, p.rejected) for p in pairs} == {("same", "t1"), ("same", "t2")}


def test_scored_candidates_are_accepted_as_outcomes() -> None:
    def candidate(text: str, label: str, hardness: float | None) -> tuple[Proposal, Candidate]:
        proposal = Proposal("P", text)
        return proposal, Candidate(
            "id", 0, proposal, "src", None, None, "procedural", label=label, hardness=hardness
        )

    pairs = build_pairs(
        [candidate("x", "hard", 0.5), candidate("y", "rejected", None)], 2, 8, np.random.default_rng(0)
    )
    assert pairs == [PreferencePair("P", "x", "y")]


def test_flat_triples_are_accepted() -> None:
    items = [
        (Proposal("P", "x"), "hard", 0.5),
        (Proposal("P", "y"), "easy", -0.5),
        (Proposal("P", "z"), "rejected", None),
    ]
    pairs = build_pairs(items, 2, 8, np.random.default_rng(0))
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "z"), ("x", "y"), ("y", "z")]


def test_trl_columns() -> None:
    pairs = [PreferencePair("p1", "c1", "r1"), PreferencePair("p2", "c2", "r2")]
    columns = pairs_to_columns(pairs)
    assert columns == {"prompt": ["p1", "p2"], "chosen": ["c1", "c2"], "rejected": ["r1", "r2"]}
    assert Dataset.from_dict(columns).column_names == ["prompt", "chosen", "rejected"]


def test_bad_outcomes_raise_clear_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(PairsInputError, match=r"outcome\[1\]\.label must be one of hard, easy, rejected"):
        build_pairs([_item("A", "a", "hard", 1.0), _item("A", "b", "pending")], 2, 8, rng)
    with pytest.raises(PairsInputError, match=r"outcome\[0\]\.hardness must be a finite number"):
        build_pairs([_item("A", "a", "easy", None)], 2, 8, rng)
    with pytest.raises(PairsInputError, match=r"item 0 must be \(Proposal, outcome\)"):
        build_pairs([("A", Outcome("hard", 1.0))], 2, 8, rng)  # type: ignore[list-item]
    with pytest.raises(PairsInputError, match="max_pairs"):
        build_pairs([], 2, 0, rng)


def test_diversity_guard_spreads_chosen_over_groups() -> None:
    import numpy as np

    from kka_synth.alignment.pairs import build_pairs
    from kka_synth.types import Proposal

    # Five hard "dark" completions outrank two hard "bright" ones; without the guard the two chosen are dark.
    items = [(Proposal("p", f"dark{i}"), "hard", 10.0 - i) for i in range(5)]
    items += [(Proposal("p", f"bright{i}"), "hard", 4.0 - i) for i in range(2)]
    items += [(Proposal("p", "bad"), "rejected", None)]
    group = lambda proposal: proposal.text.rstrip("0123456789")  # noqa: E731
    plain = build_pairs(items, 2, 100, np.random.default_rng(0))
    guarded = build_pairs(items, 2, 100, np.random.default_rng(0), diversity_key=group)
    assert {p.chosen for p in plain} == {"dark0", "dark1"}
    assert {p.chosen for p in guarded} == {"dark0", "bright0"}
    assert all(p.rejected != p.chosen for p in guarded)


def test_failures_fill_at_most_a_quarter_of_the_rejected_side() -> None:
    import numpy as np

    from kka_synth.alignment.pairs import build_pairs
    from kka_synth.types import Proposal

    items = [(Proposal("p", f"fail{i}"), "rejected", None) for i in range(5)]
    items += [(Proposal("p", f"easy{i}"), "easy", -1.0 - i) for i in range(3)]
    items += [(Proposal("p", f"hard{i}"), "hard", 1.0 + i) for i in range(2)]
    pairs = build_pairs(items, 4, 100, np.random.default_rng(0))
    rejected = {p.rejected for p in pairs}
    assert rejected == {"fail0", "easy0", "easy1", "easy2"}
    assert {p.chosen for p in pairs} >= {"hard0", "hard1"}

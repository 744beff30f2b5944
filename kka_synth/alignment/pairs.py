"""Preference pairs for DPO from scored proposals.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
aligns the proposer with DPO (Rafailov et al., "Direct Preference Optimization", NeurIPS 2023): for the same
prompt, the completion that led to a hard anomaly is preferred over one that led to an easy anomaly.

The rule, per prompt (proposals are grouped by ``Proposal.prompt``):

1. Rank the completions from hardest to easiest by the key ``(label rank, hardness)``, where the label rank
   is hard 2 > easy 1 > rejected 0 and a rejected completion (unparseable, unrenderable or filtered out) has
   no hardness and ranks below every kept one. Ties keep the input order.
2. Chosen candidates are up to ``pairs_per_prompt`` (m) *hard* completions, hardest first; when fewer are
   hard, the next-ranked kept ones fill the slots. With a ``diversity_key`` (the diversity guard), the hard
   ones are taken round-robin over the groups that key makes (for example a spec's tone and shape), each
   group in rank order and the groups ordered by their best member, so DPO raises every kind of hard
   defect instead of the commonest one; without it a proposer collapses onto a shortcut within a few
   rounds (one tone or severity in most completions).
   Rejected candidates are m completions: up to ``max(1, m // 4)`` failed ones (unparseable, unrenderable or
   filtered out, in input order), then the easiest kept ones. Failures are capped because the commonest
   filter failure, a near copy, comes from the faintest specs: letting them fill the rejected side taught
   the proposer to avoid faint defects as strongly as the hard side taught it to seek them.
3. Every chosen x rejected combination becomes a pair, except when the two texts are identical or the chosen
   one does not rank strictly above the rejected one. Exact duplicate pairs are dropped.
4. When more than ``max_pairs`` pairs remain, ``max_pairs`` of them are drawn without replacement with
   ``rng`` (the kept pairs stay in their original order).

Pairs use TRL's ``prompt`` / ``chosen`` / ``rejected`` columns; the texts are the proposer's raw completions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kka_synth.types import PreferencePair, Proposal

logger = logging.getLogger(__name__)

OUTCOME_LABELS = ("hard", "easy", "rejected")
_RANK = {"hard": 2, "easy": 1, "rejected": 0}


class PairsInputError(ValueError):
    """An outcome handed to :func:`build_pairs` is malformed; the message names the item and field."""


class HasOutcome(Protocol):
    """Anything with a label and a hardness: an :class:`Outcome` or a scored ``Candidate``."""

    label: str
    hardness: float | None


@dataclass(frozen=True)
class Outcome:
    """What became of one proposal: ``label`` in hard / easy / rejected, ``hardness`` (None when rejected)."""

    label: str
    hardness: float | None = None


@dataclass(frozen=True)
class _Ranked:
    text: str
    key: tuple[int, float]
    kept: bool
    group: object = None


def _round_robin(items: list[_Ranked], count: int) -> list[_Ranked]:
    """Up to ``count`` items taken one per group in turn; ``items`` are in rank order."""
    groups: dict[object, list[_Ranked]] = {}
    for item in items:
        groups.setdefault(item.group, []).append(item)
    queues = list(groups.values())  # ordered by each group's best member
    taken: list[_Ranked] = []
    while len(taken) < count and queues:
        queues = [queue for queue in queues if queue]
        for queue in queues:
            if len(taken) < count:
                taken.append(queue.pop(0))
    return taken


def _rank(index: int, outcome: HasOutcome) -> tuple[int, float]:
    label = getattr(outcome, "label", None)
    if label not in OUTCOME_LABELS:
        raise PairsInputError(
            f"outcome[{index}].label must be one of {', '.join(OUTCOME_LABELS)}, got {label!r}"
        )
    if label == "rejected":
        return (0, -math.inf)
    hardness = getattr(outcome, "hardness", None)
    if hardness is None or not math.isfinite(float(hardness)):
        raise PairsInputError(
            f"outcome[{index}].hardness must be a finite number for a {label} candidate, got {hardness!r}"
        )
    return (_RANK[label], float(hardness))


def _pairs_for_prompt(prompt: str, ranked: list[_Ranked], pairs_per_prompt: int) -> list[PreferencePair]:
    """Pairs of one prompt's completions (see the module docstring, steps 1-3)."""
    order = sorted(range(len(ranked)), key=lambda i: ranked[i].key, reverse=True)  # stable: ties keep order
    ordered = [ranked[i] for i in order]
    kept = [item for item in ordered if item.kept]
    hard = [item for item in kept if item.key[0] == _RANK["hard"]]
    chosen = _round_robin(hard, pairs_per_prompt)
    chosen += [item for item in kept if item.key[0] != _RANK["hard"]][: pairs_per_prompt - len(chosen)]
    failed = [item for item in ordered if not item.kept][: max(1, pairs_per_prompt // 4)]
    rejected = failed + kept[::-1][: pairs_per_prompt - len(failed)]
    pairs: list[PreferencePair] = []
    for good in chosen:
        for bad in rejected:
            if good.text == bad.text or not good.key > bad.key:
                continue
            pairs.append(PreferencePair(prompt=prompt, chosen=good.text, rejected=bad.text))
    return pairs


def build_pairs(
    proposals_with_outcomes: Iterable[tuple[Proposal, HasOutcome] | tuple[Proposal, str, float | None]],
    pairs_per_prompt: int,
    max_pairs: int,
    rng: np.random.Generator,
    diversity_key: Callable[[Proposal], object] | None = None,
) -> list[PreferencePair]:
    """Preference pairs from scored proposals, grouped by prompt (rule in the module docstring).

    Each item is ``(Proposal, outcome)``, where ``outcome`` is an :class:`Outcome` or anything with
    ``label`` and ``hardness`` (a scored ``Candidate``), or the flat ``(Proposal, label, hardness)``.
    ``diversity_key`` maps a proposal to its group for the diversity guard (step 2).
    """
    if pairs_per_prompt < 1:
        raise PairsInputError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    if max_pairs < 1:
        raise PairsInputError(f"max_pairs must be >= 1, got {max_pairs}")
    groups: dict[str, list[_Ranked]] = {}
    for index, item in enumerate(proposals_with_outcomes):
        if not isinstance(item, tuple) or len(item) not in (2, 3) or not isinstance(item[0], Proposal):
            raise PairsInputError(
                f"item {index} must be (Proposal, outcome) or (Proposal, label, hardness), "
                f"got {type(item).__name__}"
            )
        proposal = item[0]
        outcome = item[1] if len(item) == 2 else Outcome(item[1], item[2])  # type: ignore[misc]
        key = _rank(index, outcome)
        group = diversity_key(proposal) if diversity_key is not None else None
        groups.setdefault(proposal.prompt, []).append(_Ranked(proposal.text, key, key[0] > 0, group))
    pairs: list[PreferencePair] = []
    seen: set[PreferencePair] = set()
    for prompt, ranked in groups.items():
        for pair in _pairs_for_prompt(prompt, ranked, pairs_per_prompt):
            if pair not in seen:
                seen.add(pair)
                pairs.append(pair)
    total = len(pairs)
    if total > max_pairs:
        keep = np.sort(rng.choice(total, size=max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    logger.info(
        "built %d preference pairs from %d prompts (%d before the cap of %d)",
        len(pairs),
        len(groups),
        total,
        max_pairs,
    )
    return pairs


def pairs_to_columns(pairs: Iterable[PreferencePair]) -> dict[str, list[str]]:
    """TRL's columns: ``{"prompt": [...], "chosen": [...], "rejected": [...]}``."""
    columns: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for pair in pairs:
        columns["prompt"].append(pair.prompt)
        columns["chosen"].append(pair.chosen)
        columns["rejected"].append(pair.rejected)
    return columns

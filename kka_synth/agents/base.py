"""The proposer interface of the KKA loop and the parsing of what a proposer writes.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
an LLM, given anomaly-related knowledge of a category, proposes anomaly descriptions; DPO later prefers the
texts whose renders were hard. A :class:`Proposer` returns :class:`~kka_synth.types.Proposal` objects that
keep the raw text (what DPO trains on) and the parse result, so failed texts are counted and can be rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from kka_synth.agents.constraints import Constraints
from kka_synth.agents.parsing import parse_reply
from kka_synth.prompts.knowledge import CategoryKnowledge, load_knowledge
from kka_synth.types import Proposal

_NOT_JSON_REASONS = ("empty", "truncated", "refusal")
"""Finer reason codes of the lenient parser that :func:`parse_completion` reports as ``not_json``."""


@dataclass
class ProposalContext:
    """What a proposer knows when it proposes defects for one category."""

    category: str
    knowledge: CategoryKnowledge
    examples: list[str] = field(default_factory=list)
    """Earlier hard spec texts, shown as few-shot hints by chat backends."""
    constraints: Constraints = field(default_factory=Constraints)
    """The user's constraints: prompt lines for chat backends, a hard check on every backend's specs."""
    caption: str | None = None
    """A vision-language model's caption of a normal image of the category (chat backends only)."""

    @classmethod
    def for_category(cls, category: str, dataset: str | None = None) -> ProposalContext:
        """A context with the knowledge base's entry for ``category`` (generic when it has none)."""
        return cls(category=category, knowledge=load_knowledge(category, dataset))


@runtime_checkable
class Proposer(Protocol):
    """Anything that writes defect specs for a category."""

    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        """``n`` proposals for ``context``; the same ``seed`` gives the same texts."""
        ...


@runtime_checkable
class TrainableProposer(Proposer, Protocol):
    """A proposer DPO can train (``trainable = True``).

    The loop asks :meth:`training_model` for the plain causal LM to train and the adapter to continue from,
    runs :func:`kka_synth.alignment.dpo.train_dpo`, then hands the saved adapter to :meth:`apply_adapter`.
    On a resumed run every finished iteration's adapter is handed over again, in order.
    """

    trainable: bool
    tokenizer: Any

    def training_model(self) -> tuple[Any, Path | None]:
        """The plain (not LoRA-wrapped) model DPO trains, and the adapter to continue (None: a fresh one)."""
        ...

    def apply_adapter(self, path: str | Path) -> None:
        """Sample with the adapter saved at ``path`` from now on."""
        ...


def parse_completion(text: str, context: ProposalContext, prompt: str = "") -> Proposal:
    """Parse one completion into a :class:`Proposal`; a failure keeps the text and the reason code.

    Parsing is lenient (code fences, prose around the JSON, trailing commas and the other repairs of
    :mod:`kka_synth.agents.parsing`), and validation is strict: the defect type must be one of the
    category's known types, so a type borrowed from another category fails with reason ``unknown_type``.
    Numbers or nesting too large for Python's JSON reader count as ``not_json``, and so do the finer codes
    ``empty``, ``truncated`` and ``refusal`` of :func:`~kka_synth.agents.parsing.parse_reply`, so the
    reason codes counted in iteration stats stay those of :class:`~kka_synth.types.SpecError`.
    """
    proposal, _ = parse_reply(text, context, prompt=prompt)
    if proposal.error in _NOT_JSON_REASONS:
        proposal.error = "not_json"
    return proposal

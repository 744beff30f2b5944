"""The proposer interface of the KKA loop and the parsing of what a proposer writes.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
an LLM, given anomaly-related knowledge of a category, proposes anomaly descriptions; DPO later prefers the
texts whose renders were hard. A :class:`Proposer` returns :class:`~kka_synth.types.Proposal` objects that
keep the raw text (what DPO trains on) and the parse result, so failed texts are counted and can be rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from kka_synth.prompts.knowledge import CategoryKnowledge, load_knowledge
from kka_synth.types import DefectSpec, Proposal, SpecError


@dataclass
class ProposalContext:
    """What a proposer knows when it proposes defects for one category."""

    category: str
    knowledge: CategoryKnowledge
    examples: list[str] = field(default_factory=list)
    """Earlier hard spec texts, shown as few-shot hints by chat backends."""
    constraints: list[str] = field(default_factory=list)
    """Extra instructions for chat backends (for example "avoid the rim")."""

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


def parse_completion(text: str, context: ProposalContext, prompt: str = "") -> Proposal:
    """Parse one completion into a :class:`Proposal`; a failure keeps the text and the reason code.

    The defect type must be one of the category's known types, so a type borrowed from another category fails
    with reason ``unknown_type``. Numbers or nesting too large for Python's JSON reader count as ``not_json``.
    """
    try:
        spec = DefectSpec.from_text(text, context.category, defect_types=list(context.knowledge.defect_types))
    except SpecError as error:
        return Proposal(prompt=prompt, text=text, spec=None, error=error.reason)
    except (ValueError, OverflowError, RecursionError):
        return Proposal(prompt=prompt, text=text, spec=None, error="not_json")
    return Proposal(prompt=prompt, text=text, spec=spec, error=None)

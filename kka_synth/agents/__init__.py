"""Proposers: agents that write defect specs for the KKA loop, and the registry that builds them."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from kka_synth.agents.base import ProposalContext, Proposer, TrainableProposer, parse_completion
from kka_synth.agents.compact import AdapterError, CompactProposer
from kka_synth.agents.constraints import ConstraintError, Constraints, PromptSet
from kka_synth.agents.pretrain import CompactLMConfig
from kka_synth.config import ConfigError, ProposerConfig
from kka_synth.prompts.knowledge import parse_user_knowledge, user_knowledge_text

logger = logging.getLogger(__name__)

PROPOSERS: dict[str, str] = {
    "compact": "kka_synth.agents.compact:CompactProposer",
    "transformers": "kka_synth.agents.hf:TransformersProposer",
    "vllm": "kka_synth.agents.vllm:VLLMProposer",
    "openai": "kka_synth.agents.openai:OpenAIProposer",
}
"""Backend name (``proposer.backend``) to its class, imported on first use (vllm and langchain are extras)."""


def proposer_class(backend: str) -> type:
    """The class of ``backend``; an unknown name is a :class:`ConfigError`."""
    if backend not in PROPOSERS:
        raise ConfigError(f"unknown proposer backend {backend!r} (known: {', '.join(PROPOSERS)})")
    module, name = PROPOSERS[backend].split(":")
    return getattr(importlib.import_module(module), name)


def build_proposer(
    config: ProposerConfig, seed: int, *, knowledge_file: str | Path | None = None
) -> Proposer:
    """The proposer ``config.backend`` names.

    For ``compact``, ``config.model`` (a saved folder) skips pretraining; the other backends load
    ``config.model`` (a hub id, a local path, or the endpoint's model name).

    ``knowledge_file`` is the user's knowledge YAML (``data.knowledge``). The compact LM is pretrained with
    its categories too (one cached model per file content); a saved compact model keeps what it was trained
    on, and a warning names the file's categories it never learned. The other backends read each category's
    knowledge from the :class:`ProposalContext` alone, so for them the file only has to be valid.
    """
    text = None if knowledge_file is None else user_knowledge_text(knowledge_file)
    cls = proposer_class(config.backend)
    if config.backend != "compact":
        return cls(config, seed)
    if config.model is not None:
        proposer = cls.from_pretrained(config.model, config)
        if text is not None:
            unknown = sorted(set(parse_user_knowledge(text, str(knowledge_file))) - set(proposer.categories))
            stale = not unknown and proposer.user_knowledge != text
            if unknown or stale:
                logger.warning(
                    "compact proposer %s was not pretrained on %s (%s); its defect types may not parse",
                    config.model,
                    knowledge_file,
                    f"categories {', '.join(unknown)} are new to it" if unknown else "the file changed since",
                )
        return proposer
    return cls(config, seed, lm=CompactLMConfig(user_knowledge=text))


__all__ = [
    "PROPOSERS",
    "AdapterError",
    "CompactLMConfig",
    "CompactProposer",
    "ConstraintError",
    "Constraints",
    "PromptSet",
    "ProposalContext",
    "Proposer",
    "TrainableProposer",
    "build_proposer",
    "parse_completion",
    "proposer_class",
]

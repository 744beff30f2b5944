"""Proposers: agents that write defect specs for the KKA loop, and the registry that builds them."""

from __future__ import annotations

import importlib

from kka_synth.agents.base import ProposalContext, Proposer, TrainableProposer, parse_completion
from kka_synth.agents.compact import AdapterError, CompactProposer
from kka_synth.agents.constraints import ConstraintError, Constraints, PromptSet
from kka_synth.agents.pretrain import CompactLMConfig
from kka_synth.config import ConfigError, ProposerConfig

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


def build_proposer(config: ProposerConfig, seed: int) -> Proposer:
    """The proposer ``config.backend`` names.

    For ``compact``, ``config.model`` (a saved folder) skips pretraining; the other backends load
    ``config.model`` (a hub id, a local path, or the endpoint's model name).
    """
    cls = proposer_class(config.backend)
    if config.backend == "compact" and config.model is not None:
        return cls.from_pretrained(config.model, config)
    return cls(config, seed)


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

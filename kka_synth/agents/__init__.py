"""Proposers: agents that write defect specs for the KKA loop, and the registry that builds them."""

from __future__ import annotations

from kka_synth.agents.base import ProposalContext, Proposer, parse_completion
from kka_synth.agents.compact import AdapterError, CompactProposer
from kka_synth.agents.pretrain import CompactLMConfig
from kka_synth.config import ConfigError, ProposerConfig

PROPOSERS: dict[str, type] = {"compact": CompactProposer}
"""Backend name (``proposer.backend``) to proposer class."""


def build_proposer(config: ProposerConfig, seed: int) -> Proposer:
    """The proposer ``config.backend`` names; ``config.model`` (a saved folder) skips pretraining."""
    if config.backend == "transformers":
        raise ConfigError(
            "proposer backend 'transformers' is not available yet (the transformers, vLLM and "
            "OpenAI-compatible backends arrive with their own work); use --profile offline, which runs the "
            "compact proposer now"
        )
    if config.backend not in PROPOSERS:
        raise ConfigError(f"unknown proposer backend {config.backend!r} (known: {', '.join(PROPOSERS)})")
    if config.model is not None:
        return PROPOSERS[config.backend].from_pretrained(config.model, config)
    return PROPOSERS[config.backend](config, seed)


__all__ = [
    "PROPOSERS",
    "AdapterError",
    "CompactLMConfig",
    "CompactProposer",
    "ProposalContext",
    "Proposer",
    "build_proposer",
    "parse_completion",
]

"""A tiny compact proposer on the demo knowledge, pretrained once per session into the session cache."""

from __future__ import annotations

import pytest

from kka_synth.agents import CompactLMConfig, CompactProposer, ProposalContext
from kka_synth.config import ProposerConfig

TINY_LM = CompactLMConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    intermediate_size=128,
    specs_per_category=100,
    batch_size=16,
    learning_rate=6e-3,
    knowledge_files=("demo",),
)
TINY_STEPS = 200


def tiny_config(**changes: object) -> ProposerConfig:
    return ProposerConfig(**{"pretrain_steps": TINY_STEPS, "batch_size": 32, **changes})


@pytest.fixture(scope="session")
def tiny_lm() -> CompactLMConfig:
    return TINY_LM


@pytest.fixture(scope="session")
def make_config():
    """ProposerConfig with the tiny pretraining steps, plus any field changes."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_proposer(_private_cache: None) -> CompactProposer:
    return CompactProposer(tiny_config(), seed=0, lm=TINY_LM)


@pytest.fixture
def washer() -> ProposalContext:
    return ProposalContext.for_category("washer", "demo")

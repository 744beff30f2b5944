"""The proposers learn a user's own categories: the compact LM is pretrained on them, the LLMs are told."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from kka_synth.agents import CompactLMConfig, CompactProposer, ProposalContext, build_proposer
from kka_synth.agents import pretrain as pretrain_module
from kka_synth.agents.guidance import spec_json_schema
from kka_synth.agents.llm import LLMProposer, Message
from kka_synth.agents.pretrain import cache_key, corpus_knowledge
from kka_synth.config import ConfigError, ProposerConfig
from kka_synth.prompts.knowledge import KnowledgeError, load_knowledge, read_user_knowledge

STEPS = 150

GASKET_YAML = """\
dataset: my_gaskets
categories:
  gasket:
    kind: object
    components: [ring, lip, face]
    defect_types:
      tear:
        regions: [top, bottom, left, right]
        shapes: [crack, scratch]
        tones: [darker]
        size: [0.002, 0.03]
        phrases: [torn rubber at the lip, split in the gasket ring]
      bulge:
        regions: [center, anywhere]
        shapes: [blob]
        tones: [brighter, darker]
        size: [0.005, 0.05]
        phrases: [swollen bulge on the face, raised blister of rubber]
"""


@pytest.fixture(scope="module")
def gasket_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "my_knowledge.yaml"
    path.write_text(GASKET_YAML)
    return path


@pytest.fixture(scope="module")
def gasket_lm(tiny_lm: CompactLMConfig) -> CompactLMConfig:
    return dataclasses.replace(tiny_lm, user_knowledge=GASKET_YAML)


@pytest.fixture(scope="module")
def gasket_proposer(_private_cache: None, gasket_lm: CompactLMConfig, make_config) -> CompactProposer:
    return CompactProposer(make_config(pretrain_steps=STEPS), seed=0, lm=gasket_lm)


@pytest.fixture
def gasket(gasket_file: Path) -> ProposalContext:
    return ProposalContext("gasket", load_knowledge("gasket", None, extra=read_user_knowledge(gasket_file)))


def test_corpus_and_vocabulary_hold_the_user_categories(
    gasket_proposer: CompactProposer, gasket_lm: CompactLMConfig
) -> None:
    assert gasket_proposer.categories == ("brick", "gasket", "washer")
    assert gasket_proposer.user_knowledge == GASKET_YAML
    vocabulary = gasket_proposer.vocabulary
    assert {"tear", "bulge", "crack", "rust"} <= set(vocabulary.defect_types)
    assert {"torn", "swollen", "blister"} <= set(vocabulary.words)
    for piece in ("tear", "bulge", " blister"):  # each a single token, as the grammar needs
        assert len(gasket_proposer.tokenizer.encode(piece, add_special_tokens=False)) == 1
    assert set(gasket_lm.knowledge()) == {"brick", "washer", "gasket"}


def test_user_category_is_asked_by_its_own_name(gasket_proposer: CompactProposer, gasket) -> None:
    assert gasket.knowledge.dataset == "my_gaskets"
    assert gasket_proposer.prompt_for(gasket) == "category: gasket (object)\n"


def test_constrained_proposals_for_the_user_category_parse(
    gasket_proposer: CompactProposer, gasket: ProposalContext, make_config
) -> None:
    gasket_proposer.config = make_config(pretrain_steps=STEPS)
    proposals = gasket_proposer.propose(gasket, 64, seed=0)
    specs = [p.spec for p in proposals if p.spec is not None]
    assert {p.error for p in proposals} <= {None, "unknown_type"}
    assert len(specs) >= 56  # 7 in 8 name tear or bulge (62-64 of 64 seen); shipped types are grammatical too
    types = Counter(spec.defect_type for spec in specs)
    assert set(types) == {"tear", "bulge"} and min(types.values()) >= 8
    tears = [json.loads(p.text) for p in proposals if p.spec is not None and p.spec.defect_type == "tear"]
    assert all(t["shape"] in ("crack", "scratch") for t in tears)  # the knowledge, not just the grammar


def test_cache_key_follows_the_user_file_content(
    gasket_proposer: CompactProposer,
    gasket_lm: CompactLMConfig,
    tiny_lm: CompactLMConfig,
    gasket_file: Path,
    make_config,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = cache_key(gasket_lm, STEPS, 0)
    assert gasket_proposer.path.parent.name == key
    copy = gasket_file.with_name("copy.yaml")
    copy.write_text(gasket_file.read_text())
    assert cache_key(dataclasses.replace(tiny_lm, user_knowledge=copy.read_text()), STEPS, 0) == key
    assert key != cache_key(tiny_lm, STEPS, 0)
    edited = dataclasses.replace(
        gasket_lm, user_knowledge=GASKET_YAML.replace("torn rubber", "ripped rubber")
    )
    assert cache_key(edited, STEPS, 0) not in (key, cache_key(tiny_lm, STEPS, 0))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrained again instead of loading the cache")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    again = CompactProposer(make_config(pretrain_steps=STEPS), seed=0, lm=gasket_lm)  # the same text: a hit
    assert again.path == gasket_proposer.path
    with pytest.raises(AssertionError, match="pretrained again"):
        CompactProposer(make_config(pretrain_steps=STEPS), seed=0, lm=edited)  # another text: a miss


def test_save_and_load_keep_the_user_knowledge(
    gasket_proposer: CompactProposer, gasket: ProposalContext, tmp_path: Path, make_config
) -> None:
    gasket_proposer.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "proposer.json").read_text())["user_knowledge"] == GASKET_YAML
    loaded = CompactProposer.from_pretrained(tmp_path / "saved", make_config())
    assert loaded.categories == gasket_proposer.categories and loaded.vocabulary == gasket_proposer.vocabulary
    texts = [p.text for p in loaded.propose(gasket, 8, seed=3)]
    assert texts == [p.text for p in gasket_proposer.propose(gasket, 8, seed=3)]


def test_build_proposer_passes_the_knowledge_file(gasket_file: Path, tmp_path: Path) -> None:
    built = build_proposer(ProposerConfig(pretrain_steps=0), seed=0, knowledge_file=gasket_file)
    assert isinstance(built, CompactProposer) and built.user_knowledge == GASKET_YAML
    assert "gasket" in built.categories and {"tear", "bulge"} <= set(built.vocabulary.defect_types)
    plain = build_proposer(ProposerConfig(pretrain_steps=0), seed=0)
    assert plain.user_knowledge is None and "gasket" not in plain.categories
    assert plain.path != built.path
    bad = tmp_path / "bad.yaml"
    bad.write_text(GASKET_YAML.replace("shapes: [blob]", "shapes: [bump]"))
    with pytest.raises(KnowledgeError, match=r"bad\.yaml: categories\.gasket\.defect_types\.bulge\.shapes"):
        build_proposer(ProposerConfig(pretrain_steps=0), seed=0, knowledge_file=bad)
    with pytest.raises(KnowledgeError, match="no such knowledge file"):
        build_proposer(ProposerConfig(backend="openai", model="m"), seed=0, knowledge_file=tmp_path / "no")


def test_saved_model_without_the_user_file_warns(
    tiny_proposer: CompactProposer,
    gasket_file: Path,
    tmp_path: Path,
    make_config,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tiny_proposer.save_pretrained(tmp_path / "demo_only")
    with caplog.at_level(logging.WARNING, logger="kka_synth.agents"):
        built = build_proposer(make_config(model=str(tmp_path / "demo_only")), 0, knowledge_file=gasket_file)
    assert isinstance(built, CompactProposer) and "gasket" not in built.categories
    assert "categories gasket are new to it" in caplog.text


def test_malformed_user_text_in_the_lm_config() -> None:
    with pytest.raises(KnowledgeError, match="categories.gasket.kind"):
        CompactLMConfig(user_knowledge=GASKET_YAML.replace("kind: object", "kind: part"))
    with pytest.raises(KnowledgeError, match="dataset: 'generic' is reserved"):
        CompactLMConfig(user_knowledge=GASKET_YAML.replace("my_gaskets", "generic"))
    with pytest.raises(ConfigError, match="knowledge_files"):
        CompactLMConfig(knowledge_files=())


def test_override_of_a_shipped_category_reaches_the_corpus() -> None:
    washer = yaml.safe_load(GASKET_YAML)
    washer["categories"] = {"washer": washer["categories"]["gasket"]}
    knowledge = corpus_knowledge(("demo",), yaml.safe_dump(washer))
    assert set(knowledge["washer"].defect_types) == {"tear", "bulge"}
    assert knowledge["washer"].dataset == "my_gaskets" and knowledge["brick"].dataset == "demo"


class ScriptedLLM(LLMProposer):
    """An LLM backend that records its requests and replies with one fixed spec."""

    def __init__(self, reply: str) -> None:
        super().__init__(ProposerConfig(backend="openai", model="scripted", max_retries=0))
        self.reply = reply
        self.requests: list[Sequence[Message]] = []

    def generate(self, conversations: Sequence[Sequence[Message]], seed: int) -> list[str | None]:
        self.requests += conversations
        return [self.reply] * len(conversations)


def test_llm_backends_read_the_user_knowledge_from_the_context(gasket: ProposalContext) -> None:
    reply = json.dumps(
        {
            "defect_type": "bulge",
            "description": "raised blister of rubber",
            "region": "center",
            "size": 0.01,
            "shape": "blob",
            "tone": "brighter",
            "severity": 0.5,
        }
    )
    llm = ScriptedLLM(reply)
    proposals = llm.propose(gasket, 2, seed=0)
    assert [p.spec.defect_type if p.spec else p.error for p in proposals] == ["bulge", "bulge"]
    request = llm.requests[0][-1]["content"]
    assert all(word in request for word in ("gasket", "tear", "bulge", "torn rubber at the lip"))
    schema = spec_json_schema(gasket.knowledge)
    assert set(schema["properties"]["defect_type"]["enum"]) == {"tear", "bulge"}

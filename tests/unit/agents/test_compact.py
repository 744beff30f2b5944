from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

from kka_synth.agents import (
    AdapterError,
    CompactProposer,
    ConstraintError,
    Constraints,
    ProposalContext,
    Proposer,
    TrainableProposer,
    build_proposer,
    proposer_class,
)
from kka_synth.agents import pretrain as pretrain_module
from kka_synth.agents.compact import narrow_vocabulary
from kka_synth.agents.grammar import GrammarError
from kka_synth.config import AlignmentConfig, ConfigError, ProposerConfig
from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES, PreferencePair
from kka_synth.utils.hub import MODEL_NAME_ATTR, ModelLoadError

REASONS = {"not_json", "missing_field", "unknown_type", "bad_region", "bad_size", "bad_shape", "bad_tone",
           "bad_severity"}  # fmt: skip


def _logits(model: LlamaForCausalLM, proposer: CompactProposer) -> torch.Tensor:
    ids = proposer.tokenizer(["category: washer (object)\n"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_is_a_registered_proposer(tiny_proposer: CompactProposer) -> None:
    assert proposer_class("compact") is CompactProposer and isinstance(tiny_proposer, Proposer)
    assert isinstance(tiny_proposer, TrainableProposer) and tiny_proposer.training_model() == (
        tiny_proposer.model,
        None,
    )
    assert isinstance(tiny_proposer.model, LlamaForCausalLM)
    assert sum(p.numel() for p in tiny_proposer.model.parameters()) < 1_000_000


def test_constrained_completions_all_parse(
    tiny_proposer: CompactProposer, washer: ProposalContext, make_config
) -> None:
    tiny_proposer.config = make_config(temperature=0.7)
    proposals = tiny_proposer.propose(washer, 64, seed=0)
    assert len(proposals) == 64
    assert [p.error for p in proposals] == [None] * 64
    vocabulary = tiny_proposer.vocabulary
    grammar = tiny_proposer.grammar()
    for proposal in proposals:
        assert proposal.prompt == "category: washer (object)\n"
        data = json.loads(proposal.text)
        assert list(data) == list(SPEC_FIELDS)
        assert data["defect_type"] in washer.knowledge.defect_types
        assert data["region"] in REGIONS and data["shape"] in SHAPES and data["tone"] in TONES
        assert (
            json.dumps(data["size"]) in vocabulary.sizes
            and json.dumps(data["severity"]) in vocabulary.severities
        )
        words = data["description"].split(" ")
        assert 1 <= len(words) <= tiny_proposer.max_description_words and set(words) <= set(vocabulary.words)
        assert grammar.accepts(tiny_proposer.tokenizer.encode(proposal.text, add_special_tokens=False))


def test_constrained_failures_are_only_semantic(tiny_proposer: CompactProposer, make_config) -> None:
    tiny_proposer.config = make_config()
    for category in ("washer", "brick"):
        proposals = tiny_proposer.propose(ProposalContext.for_category(category), 32, seed=1)
        assert {p.error for p in proposals} <= {None, "unknown_type"}
        assert sum(p.spec is not None for p in proposals) >= 28


def test_unconstrained_failures_carry_reasons(
    tiny_proposer: CompactProposer, washer: ProposalContext, make_config
) -> None:
    tiny_proposer.config = make_config(constrained=False, temperature=1.5)
    proposals = tiny_proposer.propose(washer, 32, seed=0)
    assert len(proposals) == 32 and all(isinstance(p.text, str) and p.text for p in proposals)
    assert all((p.spec is None) != (p.error is None) for p in proposals)
    failures = [p for p in proposals if p.error is not None]
    assert failures and {p.error for p in failures} <= REASONS


def test_same_seed_same_texts(tiny_proposer: CompactProposer, washer: ProposalContext, make_config) -> None:
    for constrained in (True, False):
        tiny_proposer.config = make_config(constrained=constrained, batch_size=8)
        first = [p.text for p in tiny_proposer.propose(washer, 12, seed=5)]
        again = [p.text for p in tiny_proposer.propose(washer, 12, seed=5)]
        other = [p.text for p in tiny_proposer.propose(washer, 12, seed=6)]
        assert first == again and first != other and len(first) == 12


def test_sampling_leaves_the_global_rng_alone(
    tiny_proposer: CompactProposer, washer: ProposalContext, make_config
) -> None:
    tiny_proposer.config = make_config()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_proposer.propose(washer, 4, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_small_token_budget_shortens_descriptions(
    tiny_proposer: CompactProposer, washer: ProposalContext, make_config
) -> None:
    budget = tiny_proposer.grammar().max_length(2)
    tiny_proposer.config = make_config(max_new_tokens=budget)
    proposals = tiny_proposer.propose(washer, 16, seed=0)
    assert all(p.error in (None, "unknown_type") for p in proposals)
    assert all(len(json.loads(p.text)["description"].split()) <= 2 for p in proposals)
    tiny_proposer.config = make_config(max_new_tokens=4)
    with pytest.raises(GrammarError, match="max_new_tokens=4 is too small"):
        tiny_proposer.propose(washer, 2, seed=0)


def test_second_construction_loads_from_cache(
    tiny_proposer: CompactProposer, monkeypatch: pytest.MonkeyPatch, make_config, tiny_lm
) -> None:
    weights = tiny_proposer.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    settings = json.loads((tiny_proposer.path / "proposer.json").read_text())
    assert settings["pretrain"]["steps"] == make_config().pretrain_steps
    assert settings["pretrain"]["losses"][-1] < settings["pretrain"]["losses"][0]

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrained again instead of loading the cache")

    monkeypatch.setattr(pretrain_module, "pretrain", no_training)
    again = CompactProposer(make_config(), seed=0, lm=tiny_lm)
    assert again.path == tiny_proposer.path and weights.stat().st_mtime_ns == stamp
    assert [name for name in again.path.parent.iterdir() if name.name.startswith(".")] == []
    for a, b in zip(again.model.parameters(), tiny_proposer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    other_key = pretrain_module.cache_key(tiny_lm, make_config().pretrain_steps, seed=1)
    assert other_key != pretrain_module.cache_key(tiny_lm, make_config().pretrain_steps, seed=0)


def test_save_and_from_pretrained_round_trip(
    tiny_proposer: CompactProposer, tmp_path, make_config, tiny_lm
) -> None:
    tiny_proposer.save_pretrained(tmp_path / "saved")
    loaded = CompactProposer.from_pretrained(tmp_path / "saved", make_config())
    assert (
        loaded.knowledge_files == ("demo",) and loaded.max_description_words == tiny_lm.max_description_words
    )
    assert torch.equal(_logits(loaded.model, loaded), _logits(tiny_proposer.model, tiny_proposer))
    built = build_proposer(make_config(model=str(tmp_path / "saved")), seed=0)
    assert isinstance(built, CompactProposer) and built.path == tmp_path / "saved"
    with pytest.raises(FileNotFoundError, match="no compact proposer"):
        CompactProposer.from_pretrained(tmp_path / "missing")


def test_apply_adapter_merges_lora(tiny_proposer: CompactProposer, tmp_path, make_config) -> None:
    proposer = CompactProposer.from_pretrained(tiny_proposer.path, make_config())
    before = _logits(proposer.model, proposer)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(proposer.model), lora)
    expected = _logits(peft_model, proposer)
    peft_model.save_pretrained(tmp_path / "adapter")

    proposer.apply_adapter(tmp_path / "adapter")
    after = _logits(proposer.model, proposer)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.allclose(after, expected, atol=1e-4)
    assert type(proposer.model) is LlamaForCausalLM and not isinstance(proposer.model, PeftModel)
    assert not any("lora" in name for name, _ in proposer.model.named_parameters())
    proposer.apply_adapter(tmp_path / "adapter")  # a second round stacks on the merged weights
    assert not torch.allclose(_logits(proposer.model, proposer), after, atol=1e-4)
    assert all(
        p.error in (None, "unknown_type")
        for p in proposer.propose(ProposalContext.for_category("washer"), 8, 0)
    )


def test_model_name_is_stable_and_free_of_machine_paths(
    tiny_proposer: CompactProposer, tmp_path, make_config, tiny_lm
) -> None:
    key = pretrain_module.cache_key(tiny_lm, make_config().pretrain_steps, seed=0)
    assert tiny_proposer.model_name == f"kka-synth/compact-proposer@{key}"
    # what the adapters record as their base; name_or_path stays the folder PEFT reads the config from
    assert getattr(tiny_proposer.model, MODEL_NAME_ATTR) == tiny_proposer.model_name
    assert Path(tiny_proposer.model.name_or_path).is_dir()
    tiny_proposer.save_pretrained(tmp_path / "a")
    tiny_proposer.save_pretrained(tmp_path / "b")
    a = CompactProposer.from_pretrained(tmp_path / "a", make_config())
    b = CompactProposer.from_pretrained(tmp_path / "b", make_config())
    assert a.model_name == b.model_name and a.model_name.startswith("kka-synth/compact-proposer@")
    assert str(tmp_path) not in a.model_name and a.model_name != tiny_proposer.model_name


def test_dpo_adapter_names_the_compact_model_and_loads_elsewhere(
    washer: ProposalContext, tmp_path, make_config, tiny_lm
) -> None:
    """The adapter records ``kka-synth/compact-proposer@<key>``, not the cache folder, and still loads."""
    from kka_synth.alignment.dpo import preference_margin, train_dpo

    proposer = CompactProposer(make_config(), seed=0, lm=tiny_lm)  # from the session cache
    texts = [p.text for p in proposer.propose(washer, 8, seed=0)]
    prompt = proposer.prompt_for(washer)
    pairs = [PreferencePair(prompt, texts[i], texts[i + 4]) for i in range(4)]
    dpo = {**AlignmentConfig().dpo, "num_train_epochs": 2, "per_device_train_batch_size": 4}
    result = train_dpo(proposer.model, proposer.tokenizer, pairs, AlignmentConfig(dpo=dpo), tmp_path, seed=0)
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == proposer.model_name
    cache_root = str(proposer.path.parent.parent)
    for file in tmp_path.iterdir():
        if file.suffix in (".json", ".md"):
            text = file.read_text()
            assert cache_root not in text and str(tmp_path) not in text, file.name
    fresh = CompactProposer.from_pretrained(proposer.path, make_config())
    fresh.apply_adapter(tmp_path)
    assert getattr(fresh.model, MODEL_NAME_ATTR) == fresh.model_name  # kept through the merge
    margin = preference_margin(fresh.model, fresh.tokenizer, pairs)
    assert (
        margin == pytest.approx(result.margin_after, abs=1e-3) and result.margin_after > result.margin_before
    )


def test_apply_adapter_errors(tiny_proposer: CompactProposer, tmp_path, make_config) -> None:
    proposer = CompactProposer.from_pretrained(tiny_proposer.path, make_config())
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        proposer.apply_adapter(tmp_path)
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    get_peft_model(copy.deepcopy(proposer.model), lora).save_pretrained(tmp_path / "adapter")
    get_peft_model(proposer.model, lora)  # injects LoRA layers in place, as a DPO trainer would
    with pytest.raises(AdapterError, match="already carries LoRA layers"):
        proposer.apply_adapter(tmp_path / "adapter")


def test_pickle_only_adapter_is_refused(tiny_proposer: CompactProposer, tmp_path, make_config) -> None:
    proposer = CompactProposer.from_pretrained(tiny_proposer.path, make_config())
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"never read")
    with pytest.raises(AdapterError, match=r"only pickle weights \(adapter_model.bin\)") as error:
        proposer.apply_adapter(tmp_path)
    assert "\n" not in str(error.value)


def test_pickle_only_model_folder_is_refused(tiny_proposer: CompactProposer, tmp_path, make_config) -> None:
    folder = tmp_path / "saved"
    tiny_proposer.save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # only the name matters: not read
    with pytest.raises(ModelLoadError, match="only pickle weights") as error:
        CompactProposer.from_pretrained(folder, make_config())
    assert "\n" not in str(error.value) and "proposer.model" in str(error.value)


def test_build_proposer_backends(tiny_proposer: CompactProposer) -> None:
    with pytest.raises(ConfigError, match="proposer.model is required for backend 'transformers'"):
        build_proposer(ProposerConfig(backend="transformers"), seed=0)
    with pytest.raises(ConfigError, match="unknown proposer backend 'gpt'"):
        proposer_class("gpt")
    untrained = build_proposer(ProposerConfig(pretrain_steps=0), seed=0)  # the default architecture
    assert isinstance(untrained, CompactProposer) and untrained.path.parent.parent.name == "proposers"
    assert untrained.knowledge_files == ("mvtec_ad", "mvtec_loco", "visa", "demo", "generic")
    assert {"broken_large", "missing_pushpin", "weird_candle_wick"} <= set(untrained.vocabulary.defect_types)


def test_a_category_without_knowledge_is_asked_as_the_generic_category(tiny_proposer) -> None:
    context = ProposalContext.for_category("pcb_board", "folder")
    assert context.knowledge.dataset == "generic"
    prompt = tiny_proposer.prompt_for(context)
    assert "generic" in prompt and "pcb_board" not in prompt
    assert "scratch" in context.knowledge.defect_types  # the generic list, which the prompt was trained on
    known = tiny_proposer.prompt_for(ProposalContext.for_category("washer", "demo"))
    assert "washer" in known


def test_constraints_narrow_the_grammar(
    tiny_proposer: CompactProposer, washer: ProposalContext, make_config
) -> None:
    """Constraints reach the compact proposer through its grammar: every spec obeys them by construction."""
    tiny_proposer.config = make_config(temperature=1.5)
    free = tiny_proposer.propose(washer, 48, seed=3)
    types = Counter(p.spec.defect_type for p in free if p.spec is not None)
    banned = types.most_common(1)[0][0]
    rules = Constraints(exclude_types=[banned], regions=["top-left"], size_max=0.02, severity_max=0.3)
    constrained = tiny_proposer.propose(dataclasses.replace(washer, constraints=rules), 48, seed=3)
    specs = [p.spec for p in constrained if p.spec is not None]
    assert specs and all(rules.violation(spec) is None for spec in specs)
    assert all(s.defect_type != banned and s.size <= 0.02 and s.severity <= 0.3 for s in specs)
    assert all(s.region_name() == "top-left" for s in specs)
    with pytest.raises(ConstraintError, match="leave no size"):
        narrow_vocabulary(tiny_proposer.vocabulary, Constraints(size_min=0.3, size_max=0.31))

"""The transformers proposer on a tiny random chat model saved to a folder and loaded by its real loaders."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_llm import save_tiny_chat_model
from transformers import Qwen2ForCausalLM

from kka_synth.agents.base import ProposalContext, TrainableProposer
from kka_synth.agents.compact import AdapterError
from kka_synth.agents.constraints import Constraints
from kka_synth.agents.guidance import retry_message
from kka_synth.agents.hf import TransformersProposer
from kka_synth.agents.parsing import REASONS, parse_reply
from kka_synth.alignment.dpo import train_dpo
from kka_synth.config import AlignmentConfig, ProposerConfig
from kka_synth.prompts.templates import example_reply
from kka_synth.types import PreferencePair
from kka_synth.utils.hub import ModelLoadError


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def _config(model_dir: Path, **changes: object) -> ProposerConfig:
    settings = {"backend": "transformers", "model": str(model_dir), "max_new_tokens": 12, "batch_size": 4}
    return ProposerConfig(**{**settings, "constrained": False, "max_retries": 0, **changes})


@pytest.fixture(scope="module")
def proposer(model_dir: Path) -> TransformersProposer:
    return TransformersProposer(_config(model_dir))


def _logits(model: torch.nn.Module, proposer: TransformersProposer, context: ProposalContext) -> torch.Tensor:
    prompt = proposer.prompt_text(proposer.messages_for(context))
    ids = proposer.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]  # (V,) next-token logits after the prompt


def test_loads_a_trainable_chat_proposer(proposer: TransformersProposer) -> None:
    assert isinstance(proposer, TrainableProposer) and proposer.trainable
    assert isinstance(proposer.model, Qwen2ForCausalLM) and not proposer.model.training
    assert proposer.model.dtype == torch.float32 and proposer.device.type == "cpu"
    assert proposer.tokenizer.padding_side == "left" and proposer.tokenizer.pad_token == "<|endoftext|>"
    assert proposer.adapter is None


def test_prompt_text_is_the_chat_template(proposer: TransformersProposer, washer: ProposalContext) -> None:
    messages = proposer.messages_for(washer)
    prompt = proposer.prompt_text(messages)
    assert prompt.startswith("<|im_start|>system\n") and "<|im_end|>\n<|im_start|>user\n" in prompt
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "Category: washer" in prompt and messages[1]["content"] in prompt
    proposals = proposer.propose(washer, 2, seed=0)
    assert {p.prompt for p in proposals} == {prompt}


def test_same_seed_same_replies_other_seed_other_replies(
    proposer: TransformersProposer, washer: ProposalContext
) -> None:
    first = [p.text for p in proposer.propose(washer, 4, seed=3)]
    again = [p.text for p in proposer.propose(washer, 4, seed=3)]
    other = [p.text for p in proposer.propose(washer, 4, seed=4)]
    assert first == again
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 3
    assert len(set(first)) == 4  # sampled, not greedy


@pytest.mark.parametrize(("batch_size", "calls"), [(2, [2, 2, 1]), (8, [5])])
def test_batches_of_batch_size(
    proposer: TransformersProposer,
    washer: ProposalContext,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch_size: int,
    calls: list[int],
) -> None:
    sizes = []
    generate = proposer.model.generate

    def spy(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(proposer.model, "generate", spy)
    monkeypatch.setattr(proposer, "config", _config(model_dir, batch_size=batch_size))
    proposals = proposer.propose(washer, 5, seed=0)
    assert len(proposals) == 5 and sizes == calls
    assert all((p.spec is None) != (p.error is None) for p in proposals)


def test_left_padding_leaves_replies_unchanged(
    proposer: TransformersProposer, washer: ProposalContext, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Near-greedy sampling: a short conversation gives the same reply alone or padded next to a long one."""
    monkeypatch.setattr(proposer, "config", _config(model_dir, temperature=0.05, top_p=0.01))
    short = proposer.messages_for(washer)
    long = [
        *short,
        {"role": "assistant", "content": "no idea"},
        {"role": "user", "content": "Try again " * 20},
    ]
    alone = proposer.generate([short], seed=0)
    padded = proposer.generate([long, short], seed=1)
    assert padded[1] == alone[0] and alone[0]


def test_failures_are_retried_and_counted(
    proposer: TransformersProposer, washer: ProposalContext, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The random model writes garbage: every reply fails, is asked twice more, and keeps its reasons."""
    calls = []
    generate = proposer.generate

    def spy(conversations, seed):
        calls.append(len(conversations))
        return generate(conversations, seed)

    monkeypatch.setattr(proposer, "generate", spy)
    monkeypatch.setattr(proposer, "config", _config(model_dir, max_retries=2))
    proposals = proposer.propose(washer, 3, seed=0)
    failed = [p for p in proposals if p.spec is None]
    assert len(proposals) == 3 and calls[0] == 3
    assert len(calls) == 1 + (2 if failed else 0)
    for proposal in failed:
        assert proposal.attempts == 3 and proposal.error in REASONS
        assert set(proposal.retries) <= set(REASONS)


class ScriptedProposer(TransformersProposer):
    """Replies from a script instead of the model; records the conversations it was asked."""

    script: list[list[str]]
    asked: list[list[list[dict[str, str]]]]

    def generate(self, conversations, seed):
        self.asked.append([list(c) for c in conversations])
        return self.script.pop(0)


def test_retry_conversation_carries_the_parser_feedback(model_dir: Path, washer: ProposalContext) -> None:
    scripted = ScriptedProposer(_config(model_dir, max_retries=2))
    good = example_reply(washer.knowledge)
    bad = '{"defect_type": "scratch", "region": "top"}'
    scripted.script, scripted.asked = [[bad, good], [good]], []
    proposals = scripted.propose(washer, 2, seed=0)
    assert [p.retries for p in proposals] == [["missing_field"], []]
    assert all(p.spec is not None and p.text == good for p in proposals)
    assert len(scripted.asked) == 2 and len(scripted.asked[1]) == 1
    retry = scripted.asked[1][0]
    failed, detail = parse_reply(bad, washer)
    assert retry[:2] == scripted.messages_for(washer)
    assert retry[2] == {"role": "assistant", "content": bad}
    assert retry[3] == {"role": "user", "content": retry_message(failed.error, detail, washer)}
    assert "description" in retry[3]["content"]  # the missing field is named


def test_constraints_reject_and_are_fed_back(model_dir: Path, washer: ProposalContext) -> None:
    context = dataclasses.replace(washer, constraints=Constraints(exclude_types=["scratch"]))
    scripted = ScriptedProposer(_config(model_dir, max_retries=1))
    scripted.script, scripted.asked = [[example_reply(washer.knowledge)], ["{}"]], []
    (proposal,) = scripted.propose(context, 1, seed=0)
    assert proposal.retries == ["constraint_type"] and proposal.spec is None and proposal.error


def test_one_warning_when_asked_to_constrain(
    model_dir: Path, washer: ProposalContext, caplog: pytest.LogCaptureFixture
) -> None:
    proposer = TransformersProposer(_config(model_dir, constrained=True))
    with caplog.at_level(logging.WARNING, logger="kka_synth.agents.hf"):
        proposer.propose(washer, 2, seed=0)
        proposer.propose(washer, 2, seed=1)
    warnings = [r for r in caplog.records if "unconstrained" in r.getMessage()]
    assert len(warnings) == 1


def _pairs(proposer: TransformersProposer, context: ProposalContext) -> list[PreferencePair]:
    prompt = proposer.prompt_text(proposer.messages_for(context))
    good = example_reply(context.knowledge)
    worse = [json.dumps({**json.loads(good), "severity": s}) for s in (0.8, 0.9, 1.0, 0.7)]
    return [PreferencePair(prompt, good, text) for text in worse]


def test_dpo_adapters_are_applied_without_merging(
    model_dir: Path, washer: ProposalContext, tmp_path: Path
) -> None:
    proposer = TransformersProposer(_config(model_dir))
    config = AlignmentConfig(
        dpo={**AlignmentConfig().dpo, "num_train_epochs": 1, "per_device_train_batch_size": 4,
             "learning_rate": 1e-2},
        lora={"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    )  # fmt: skip
    pairs = _pairs(proposer, washer)
    base, start = proposer.training_model()
    assert start is None and base is proposer.model and not isinstance(base, PeftModel)
    before = _logits(base, proposer, washer)

    first = train_dpo(base, proposer.tokenizer, pairs, config, tmp_path / "a1", seed=0)
    proposer.apply_adapter(first.adapter_dir)
    assert isinstance(proposer.model, PeftModel) and proposer.adapter == first.adapter_dir
    with_first = _logits(proposer.model, proposer, washer)
    assert not torch.allclose(with_first, before, atol=1e-4)
    assert len(proposer.propose(washer, 2, seed=0)) == 2

    base, start = proposer.training_model()
    assert start == first.adapter_dir and not isinstance(base, PeftModel)
    assert not any("lora_" in name for name, _ in base.named_parameters())
    torch.testing.assert_close(_logits(base, proposer, washer), before)  # the base weights are untouched

    second = train_dpo(base, proposer.tokenizer, pairs, config, tmp_path / "a2", seed=1, start_adapter=start)
    assert second.margin_before == pytest.approx(first.margin_after, abs=1e-3)
    proposer.apply_adapter(second.adapter_dir)
    assert proposer.adapter == second.adapter_dir
    with_second = _logits(proposer.model, proposer, washer)
    assert not torch.allclose(with_second, with_first, atol=1e-4)
    assert sum("lora_A" in name for name, _ in proposer.model.named_parameters()) > 0


def test_apply_adapter_needs_an_adapter_folder(proposer: TransformersProposer, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        proposer.apply_adapter(tmp_path)
    assert proposer.adapter is None
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"never read")
    with pytest.raises(AdapterError, match=r"only pickle weights \(adapter_model.bin\)") as error:
        proposer.apply_adapter(tmp_path)
    assert "\n" not in str(error.value) and proposer.adapter is None


def test_missing_model_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as error:
        TransformersProposer(_config(tmp_path))
    message = str(error.value)
    assert "\n" not in message and "proposer.model" in message and "--profile offline" in message


def test_model_without_chat_template_is_refused(tmp_path: Path) -> None:
    folder = save_tiny_chat_model(tmp_path / "plain")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="has no chat template; use an instruct/chat model"):
        TransformersProposer(_config(folder))


def test_a_bos_the_tokenizer_adds_is_not_written_twice() -> None:
    """Llama-3-style tokenizers add a BOS and their template writes one: the prompt text drops the
    template's, so tokenizing it with special tokens (as generation, TRL and vLLM do) gives one BOS."""
    from kka_synth.agents.hf import chat_prompt

    class BosTokenizer:
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds_bos: bool) -> None:
            self.adds_bos = adds_bos

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<s>" + "".join(m["content"] for m in messages) + "|assistant|"

        def __call__(self, text):
            return {"input_ids": ([1] if self.adds_bos else []) + [5] * len(text)}

    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt(BosTokenizer(adds_bos=True), messages) == "hi|assistant|"
    assert chat_prompt(BosTokenizer(adds_bos=False), messages) == "<s>hi|assistant|"

"""DPO with a fresh LoRA adapter on a tiny Llama and a locally trained BPE tokenizer."""

from __future__ import annotations

import copy
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kka_synth.alignment.dpo import (
    build_dpo_config,
    build_lora_config,
    preference_margin,
    record_base_model,
    sequence_logprobs,
    train_dpo,
)
from kka_synth.config import AlignmentConfig, ConfigError
from kka_synth.types import PreferencePair

PROMPTS = ["Propose a defect for bottle:", "Propose a defect for cable:"]


def _spec(rng: np.random.Generator, severity: float) -> str:
    return json.dumps(
        {
            "defect_type": str(rng.choice(["scratch", "crack", "stain"])),
            "region": str(rng.choice(["top", "left", "center"])),
            "size": float(rng.choice([0.01, 0.05, 0.2])),
            "severity": severity,
        }
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    rng = np.random.default_rng(0)
    corpus = [_spec(rng, float(rng.choice([0.1, 0.5, 0.9]))) for _ in range(200)] + PROMPTS
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def pairs() -> list[PreferencePair]:
    """Low severity preferred over high severity, as hard anomalies would be."""
    rng = np.random.default_rng(1)
    return [PreferencePair(p, _spec(rng, 0.1), _spec(rng, 0.9)) for p in PROMPTS for _ in range(12)]


@pytest.fixture(scope="module")
def trained(tokenizer, pairs, tmp_path_factory):
    model = _model(tokenizer)
    original = copy.deepcopy(model)
    config = AlignmentConfig(
        dpo={**AlignmentConfig().dpo, "num_train_epochs": 6, "per_device_train_batch_size": 8}
    )
    out = tmp_path_factory.mktemp("adapter")
    result = train_dpo(model, tokenizer, pairs, config, out, seed=0)
    return model, original, result


def test_training_steps_and_losses(trained, pairs) -> None:
    _, _, result = trained
    assert result.steps == math.ceil(len(pairs) / 8) * 6
    assert len(result.train_loss) == result.steps and all(math.isfinite(v) for v in result.train_loss)
    assert np.mean(result.train_loss[-3:]) < np.mean(result.train_loss[:3])


def test_margin_rises(trained) -> None:
    _, _, result = trained
    assert result.margin_after > result.margin_before + 0.5


def test_nothing_printed_to_stdout(tokenizer, pairs, tmp_path, capsys) -> None:
    config = AlignmentConfig(dpo={**AlignmentConfig().dpo, "num_train_epochs": 1})
    result = train_dpo(_model(tokenizer), tokenizer, pairs[:4], config, tmp_path, seed=0)
    assert result.steps == 1 and len(result.train_loss) == 1
    assert "loss" not in capsys.readouterr().out  # no PrinterCallback


def test_adapter_saved_and_changed(trained) -> None:
    _, _, result = trained
    assert (result.adapter_dir / "adapter_config.json").is_file()
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero


def test_returned_model_is_unchanged_and_plain(trained) -> None:
    model, original, result = trained
    assert result.model is model and not isinstance(result.model, PeftModel)
    assert not any("lora" in name for name, _ in model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(original.named_parameters())[name], atol=0, rtol=0)


def test_adapter_continues_from_the_previous_round(trained, tokenizer, pairs, tmp_path) -> None:
    """start_adapter trains the saved adapter further: round 2 starts where round 1 ended, and its adapter
    alone on the base model reproduces the trained policy."""
    model, original, first = trained
    config = AlignmentConfig(dpo={**AlignmentConfig().dpo, "num_train_epochs": 1})
    second = train_dpo(model, tokenizer, pairs, config, tmp_path, seed=1, start_adapter=first.adapter_dir)
    assert second.margin_before == pytest.approx(first.margin_after, abs=1e-3)
    assert second.margin_after > second.margin_before
    assert not any("lora" in name for name, _ in model.named_parameters())
    round_two = PeftModel.from_pretrained(copy.deepcopy(original), str(second.adapter_dir)).eval()
    assert preference_margin(round_two, tokenizer, pairs) == pytest.approx(second.margin_after, abs=1e-3)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        train_dpo(model, tokenizer, pairs, config, tmp_path / "x", seed=1, start_adapter=tmp_path / "none")
    pickled = tmp_path / "pickled"
    shutil.copytree(first.adapter_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")  # not read: name only
    with pytest.raises(ValueError, match=r"only pickle weights \(adapter_model.bin\)") as error:
        train_dpo(model, tokenizer, pairs, config, tmp_path / "y", seed=1, start_adapter=pickled)
    assert "\n" not in str(error.value) and not (tmp_path / "y").exists()


def test_sequence_logprobs_match_one_by_one(tokenizer) -> None:
    model = _model(tokenizer).eval()
    prompt, texts = PROMPTS[0], ['{"a": 1}', '{"defect_type": "crack", "severity": 0.5}']
    batched = sequence_logprobs(model, tokenizer, [prompt, prompt], texts)
    for text, value in zip(texts, batched, strict=True):
        prompt_len = len(tokenizer(prompt)["input_ids"])
        ids = tokenizer(prompt + text + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
        manual = sum(logp[i - 1, ids[i]].item() for i in range(prompt_len, len(ids)))
        assert value == pytest.approx(manual, abs=1e-4)
    assert preference_margin(model, tokenizer, [PreferencePair(prompt, texts[0], texts[0])]) == 0.0


def test_bad_config_keys_give_clear_errors(tokenizer, pairs, tmp_path) -> None:
    with pytest.raises(ConfigError, match="alignment.dpo has unknown key 'learning_rat'"):
        build_dpo_config({"learning_rat": 1e-3}, tmp_path, 0, 64)
    with pytest.raises(ConfigError, match="alignment.lora has unknown key 'rank'"):
        build_lora_config({"rank": 8})
    with pytest.raises(ConfigError, match="alignment.dpo must not set 'output_dir'"):
        build_dpo_config({"output_dir": "x"}, tmp_path, 0, 64)
    with pytest.raises(ConfigError, match="alignment.dpo rejected by DPOConfig: `loss_weights` must have"):
        build_dpo_config({"loss_type": ["sigmoid"], "loss_weights": [1.0, 1.0]}, tmp_path, 0, 64)
    model = _model(tokenizer)
    with pytest.raises(ConfigError, match="unknown key 'rank'"):
        train_dpo(model, tokenizer, pairs, AlignmentConfig(lora={"rank": 8}), tmp_path, seed=0)
    assert not list(tmp_path.iterdir())  # failed before writing anything


def test_cpu_settings_and_passthrough(tmp_path) -> None:
    args = build_dpo_config({"learning_rate": 5e-4, "beta": 0.2}, tmp_path, 3, 48)
    assert args.learning_rate == 5e-4 and args.beta == 0.2 and args.seed == 3 and args.max_length == 48
    assert args.bf16 is False and args.save_strategy == "no" and args.gradient_checkpointing is False
    assert args.report_to in ("none", [], ["none"])
    lora = build_lora_config({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    assert lora.r == 4 and set(lora.target_modules) == {"q_proj", "v_proj"} and lora.task_type == "CAUSAL_LM"


def test_wrapped_model_and_empty_pairs_are_refused(tokenizer, pairs, tmp_path) -> None:
    from peft import get_peft_model

    wrapped = get_peft_model(_model(tokenizer), build_lora_config({"r": 2}))
    with pytest.raises(ValueError, match="merge the previous adapter first"):
        train_dpo(wrapped, tokenizer, pairs, AlignmentConfig(), tmp_path, seed=0)
    with pytest.raises(ValueError, match="at least one preference pair"):
        train_dpo(_model(tokenizer), tokenizer, [], AlignmentConfig(), tmp_path, seed=0)


def _front_matter(card: str) -> dict:
    head, _, _ = card.removeprefix("---\n").partition("\n---")
    return yaml.safe_load(head)


def test_adapter_names_the_given_base_model_not_the_folder(tokenizer, pairs, tmp_path) -> None:
    """A model loaded from a local folder: PEFT would record that folder's absolute path."""
    _model(tokenizer).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    assert str(tmp_path) in model.name_or_path  # what PEFT would have written
    config = AlignmentConfig(dpo={**AlignmentConfig().dpo, "num_train_epochs": 2})
    out = tmp_path / "adapter"
    result = train_dpo(model, tokenizer, pairs[:8], config, out, seed=0, base_model_name="org/tiny-llama")
    settings = json.loads((out / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "org/tiny-llama"
    assert len(settings["target_modules"]) == 14  # all-linear: q, k, v, o, gate, up, down x 2 layers
    card = (out / "README.md").read_text()
    assert _front_matter(card)["base_model"] == "org/tiny-llama"
    assert "base_model:adapter:org/tiny-llama" in _front_matter(card)["tags"]
    for name in ("adapter_config.json", "README.md"):
        assert str(tmp_path) not in (out / name).read_text(), name
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # loading reads the weights, not the name: the adapter on a fresh copy of the base is the trained policy
    fresh = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), str(out))
    margin = preference_margin(fresh, tokenizer, pairs[:8])
    assert margin == pytest.approx(result.margin_after, abs=1e-4)
    assert abs(result.margin_after - result.margin_before) > 1e-3  # the adapter changed the policy


def test_record_base_model_quotes_what_yaml_would_misread(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/data/models/tiny", "r": 4, "target_modules": ["b", "a"]})
    )
    card = "---\nbase_model: /data/models/tiny\ntags:\n- base_model:adapter:/data/models/tiny\n- lora\n---\n"
    (tmp_path / "README.md").write_text(card + "\nbase_model: body text is left alone\n")
    record_base_model(tmp_path, "my model: v2")
    settings = json.loads((tmp_path / "adapter_config.json").read_text())
    assert settings == {"base_model_name_or_path": "my model: v2", "r": 4, "target_modules": ["b", "a"]}
    text = (tmp_path / "README.md").read_text()
    assert _front_matter(text) == {
        "base_model": "my model: v2",
        "tags": ["base_model:adapter:my model: v2", "lora"],
    }
    assert text.endswith("\nbase_model: body text is left alone\n") and "/data/models" not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left
    (tmp_path / "README.md").unlink()
    record_base_model(tmp_path, "org/name")  # no model card: only the config changes
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/name"

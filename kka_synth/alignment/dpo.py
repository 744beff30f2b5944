"""One DPO round on the proposer with a fresh LoRA adapter.

Implements the alignment step of KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge
from LLMs", arXiv 2502.14880): the proposer is fine-tuned with Direct Preference Optimization (Rafailov et
al., NeurIPS 2023) to prefer completions that led to hard anomalies. Training runs through TRL's
``DPOTrainer`` with a PEFT ``LoraConfig``; with LoRA the frozen base model is the reference policy, so no
separate reference model is kept. ``AlignmentConfig.dpo`` and ``AlignmentConfig.lora`` are passed to
``trl.DPOConfig`` and ``peft.LoraConfig`` unchanged, on top of the settings a CPU run needs.

After training the adapter is saved and the LoRA layers are taken out of the model again without merging
(``unload``), so the caller decides how the adapter is used: the compact proposer merges it into its weights,
the transformers and vLLM proposers keep the base model and serve the adapter. The adapter of iteration k is
the start of iteration k+1, as in KKA: either merged into the weights DPO starts from (``start_adapter``
None, a fresh adapter on top), or loaded trainable and trained further (``start_adapter`` set, so every
adapter is a whole delta from the base model that vLLM can serve on its own). The frozen weights under the
adapter are the reference policy either way.

The saved adapter names its base model by the model's own name (``base_model_name``: the hub id for the
transformers and vLLM backends, ``kka-synth/compact-proposer@<cache key>`` for the compact one), not by the
folder it was loaded from: PEFT records the local folder's absolute path, which would tie a run directory to
one machine. Nothing reads that name back; adapters are loaded onto the project's own base model, and vLLM
takes the adapter's folder.

TRL's trainer runs under ``accelerate launch`` unchanged, so DPO on several GPUs is the same call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from kka_synth.alignment.pairs import pairs_to_columns
from kka_synth.config import AlignmentConfig, ConfigError
from kka_synth.runs import atomic_write_text
from kka_synth.types import PreferencePair
from kka_synth.utils.hub import ADAPTER_CONFIG, MODEL_NAME_ATTR, load_adapter

logger = logging.getLogger(__name__)

RESERVED_DPO_KEYS = ("output_dir", "seed")
"""Set from ``train_dpo``'s own arguments; naming them in ``alignment.dpo`` is an error."""

ADAPTER_CARD = "README.md"
"""The model card PEFT writes beside the adapter; its front matter names the base model too."""

_PLAIN_YAML = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@+-]*")
"""Names that YAML reads back unchanged without quotes."""


@dataclass
class DPOResult:
    """What one DPO round produced."""

    adapter_dir: Path
    """Folder holding the saved LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``)."""
    steps: int
    """Optimiser steps taken."""
    train_loss: list[float]
    """Logged training loss, one value per logging step."""
    margin_before: float
    """Mean over pairs of log pi(chosen | prompt) - log pi(rejected | prompt) before training."""
    margin_after: float
    """The same margin after training, measured with the adapter."""
    model: PreTrainedModel = field(repr=False)
    """The model that was passed in, with the LoRA layers taken out again (its weights are unchanged)."""


class _LossRecorder(TrainerCallback):
    """Collects the trainer's logged losses and sends them to this module's logger instead of stdout."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            logger.debug("dpo step %d: loss %.4f", state.global_step, logs["loss"])


def _check_keys(section: str, values: dict[str, Any], target: type) -> None:
    known = {f.name for f in dataclasses.fields(target) if f.init}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"alignment.{section} has unknown key {key!r} (not a field of {target.__name__})"
            )


def build_lora_config(lora: dict[str, Any]) -> LoraConfig:
    """``peft.LoraConfig(**lora)`` (task_type defaults to CAUSAL_LM); a bad key or value is a ConfigError."""
    _check_keys("lora", lora, LoraConfig)
    try:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **lora})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"alignment.lora rejected by LoraConfig: {str(error).splitlines()[0]}") from None


def build_dpo_config(dpo: dict[str, Any], output_dir: str | Path, seed: int, max_length: int) -> DPOConfig:
    """``trl.DPOConfig`` from ``dpo`` over CPU-safe defaults; a bad key or value is a ConfigError."""
    _check_keys("dpo", dpo, DPOConfig)
    for key in RESERVED_DPO_KEYS:
        if key in dpo:
            raise ConfigError(f"alignment.dpo must not set {key!r}: it comes from the run")
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing; set the new name when it
    # exists so TRL's default of True for the old one is overridden without a deprecation warning.
    fields = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    defaults: dict[str, Any] = {
        "use_cpu": not torch.cuda.is_available(),
        "bf16": False,
        "report_to": "none",
        checkpointing: bool(dpo.get("gradient_checkpointing", False)),
        "max_length": max_length,
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }
    try:
        return DPOConfig(output_dir=str(output_dir), seed=seed, **{**defaults, **dpo})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"alignment.dpo rejected by DPOConfig: {str(error).splitlines()[0]}") from None


def _yaml_scalar(text: str) -> str:
    return text if _PLAIN_YAML.fullmatch(text) else json.dumps(text)


def record_base_model(adapter_dir: str | Path, name: str) -> None:
    """Name ``name`` as the base model of the PEFT adapter in ``adapter_dir``.

    Sets ``base_model_name_or_path`` in ``adapter_config.json`` and the ``base_model`` entries of the model
    card's front matter (``README.md``, when PEFT wrote one), each file replaced atomically. Loading does not
    read the name: it only keeps a machine's folder out of the run directory.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    settings = json.loads(config_path.read_text())
    if settings.get("base_model_name_or_path") != name:
        settings["base_model_name_or_path"] = name
        atomic_write_text(config_path, json.dumps(settings, indent=2, sort_keys=True))
    card_path = adapter_dir / ADAPTER_CARD
    if not card_path.is_file():
        return
    lines = card_path.read_text().split("\n")
    if lines[0] != "---" or "---" not in lines[1:]:
        return
    changed = list(lines)
    for index in range(1, lines.index("---", 1)):  # the YAML front matter
        if lines[index].startswith("base_model:"):
            changed[index] = f"base_model: {_yaml_scalar(name)}"
        elif lines[index].startswith("- base_model:adapter:"):
            changed[index] = f"- {_yaml_scalar('base_model:adapter:' + name)}"
    if changed != lines:
        atomic_write_text(card_path, "\n".join(changed))


def _completion_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, text: str) -> tuple[list[int], int]:
    """Token ids of prompt + text + EOS and where the completion starts (as TRL tokenises it)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    eos = tokenizer.eos_token
    full_ids = tokenizer(prompt + text + ("" if text.endswith(eos) else eos))["input_ids"]
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    return full_ids, max(start, 1)  # the first token has no context to be predicted from


@torch.no_grad()
def sequence_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    texts: Sequence[str],
    batch_size: int = 32,
) -> list[float]:
    """Sum of log pi(token) over each completion's tokens (EOS included) given its prompt."""
    encoded = [_completion_ids(tokenizer, p, t) for p, t in zip(prompts, texts, strict=True)]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    totals: list[float] = []
    for begin in range(0, len(encoded), batch_size):
        chunk = encoded[begin : begin + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, L), right-padded
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # (B, L) completion tokens
        for row, (tokens, start) in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            scored[row, start : len(tokens)] = True
        attention = (torch.arange(width)[None, :] < torch.tensor([len(t) for t, _ in chunk])[:, None]).long()
        logits = model(
            input_ids=ids.to(device), attention_mask=attention.to(device)
        ).logits.float()  # (B, L, V)
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, L-1, V): predicts tokens 1..L-1
        token_lp = logprobs.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)  # (B, L-1)
        totals.extend((token_lp * scored[:, 1:].to(device)).sum(dim=1).tolist())
    model.train(was_training)
    return totals


def preference_margin(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair]
) -> float:
    """Mean over pairs of log pi(chosen | prompt) - log pi(rejected | prompt), completion log-probs summed."""
    if not pairs:
        raise ValueError("preference_margin needs at least one pair")
    prompts = [pair.prompt for pair in pairs]
    chosen = sequence_logprobs(model, tokenizer, prompts, [pair.chosen for pair in pairs])
    rejected = sequence_logprobs(model, tokenizer, prompts, [pair.rejected for pair in pairs])
    return float(sum(c - r for c, r in zip(chosen, rejected, strict=True)) / len(pairs))


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[PreferencePair],
    config: AlignmentConfig,
    output_dir: str | Path,
    seed: int,
    start_adapter: str | Path | None = None,
    base_model_name: str | None = None,
) -> DPOResult:
    """Train a LoRA adapter on ``pairs`` with DPO and save it to ``output_dir``.

    ``model`` must be a plain (not LoRA-wrapped) causal LM. Without ``start_adapter`` a fresh adapter is
    made from ``config.lora``; with it, that saved adapter is loaded trainable and trained further (its own
    LoRA settings hold). ``model`` leaves with its weights unchanged and no LoRA layers. The saved adapter
    names ``base_model_name`` as its base model (:func:`record_base_model`); None takes the name the model
    carries (``MODEL_NAME_ATTR``, which the compact proposer sets to its stable name), else its
    ``name_or_path``.

    Raises ValueError for no pairs, a LoRA-wrapped model or a tokenizer without EOS, and
    :class:`~kka_synth.utils.hub.AdapterError` (a ValueError) for a ``start_adapter`` folder without an
    adapter or with only pickle weights.
    """
    if not pairs:
        raise ValueError("train_dpo needs at least one preference pair")
    if isinstance(model, PeftModel):
        raise ValueError("train_dpo needs a plain model: merge the previous adapter first (merge_and_unload)")
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has no eos_token; DPO appends it to every completion")
    output_dir = Path(output_dir)
    carried = getattr(model, MODEL_NAME_ATTR, None) or getattr(model, "name_or_path", None)
    base_model_name = base_model_name or carried or None
    lora_config = build_lora_config(config.lora)
    longest = max(
        len(_completion_ids(tokenizer, p.prompt, text)[0]) for p in pairs for text in (p.chosen, p.rejected)
    )
    dpo_config = build_dpo_config(config.dpo, output_dir, seed, max_length=longest)
    if start_adapter is not None:
        trained: PreTrainedModel = load_adapter(model, start_adapter, is_trainable=True)
        peft_config = None
    else:
        trained, peft_config = model, lora_config
    margin_before = preference_margin(trained, tokenizer, pairs)
    recorder = _LossRecorder()
    trainer = DPOTrainer(
        model=trained,
        args=dpo_config,
        train_dataset=Dataset.from_dict(pairs_to_columns(pairs)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[recorder],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    output_dir.mkdir(parents=True, exist_ok=True)
    if trainer.accelerator.is_main_process:
        peft_model.save_pretrained(str(output_dir))
        if base_model_name is not None:
            record_base_model(output_dir, base_model_name)
    peft_model.eval()
    margin_after = preference_margin(peft_model, tokenizer, pairs)
    base = peft_model.unload()
    base.eval()
    steps = int(trainer.state.global_step)
    logger.info(
        "dpo: %d pairs, %d steps, margin %.3f -> %.3f, adapter in %s",
        len(pairs),
        steps,
        margin_before,
        margin_after,
        output_dir,
    )
    return DPOResult(output_dir, steps, recorder.losses, margin_before, margin_after, base)

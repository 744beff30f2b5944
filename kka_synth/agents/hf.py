"""The ``transformers`` proposer: any chat causal LM (a Hub id or a local folder), sampled with ``generate``.

This is the hub-profile LLM of KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from
LLMs", arXiv 2502.14880): an instruct model (Qwen2.5-1.5B-Instruct, say) reads the category's anomaly-related
knowledge through its own chat template and writes one defect spec per reply. Prompting, parsing and retries
come from :class:`~kka_synth.agents.llm.LLMProposer`; this backend only templates conversations and samples
them, batched and seeded.

DPO aligns it with a LoRA adapter per iteration, kept apart from the base weights (never merged): the loop
trains on :meth:`TransformersProposer.training_model` (the plain base model and the adapter to continue from)
and hands the new adapter to :meth:`TransformersProposer.apply_adapter`, which wraps the base with it for
sampling. Each adapter continues the previous one, so the latest holds all of the training.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kka_synth.agents.llm import LLMProposer, Message
from kka_synth.config import ProposerConfig
from kka_synth.utils.devices import resolve_device, resolve_dtype
from kka_synth.utils.hub import ModelLoadError, check_adapter_dir, load_adapter, load_pretrained

logger = logging.getLogger(__name__)

WHAT = "the proposer LLM"
FIELD = "proposer.model"


def load_chat_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` (a Hub id or local folder), checked to carry a chat template.

    The model's config is read first, so a folder without a model says so instead of failing on the
    tokenizer. Padding goes on the left (batched generation) and falls back to the EOS token.
    """
    from transformers import AutoConfig, AutoTokenizer

    load_pretrained(AutoConfig.from_pretrained, model, WHAT, FIELD)
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, model, WHAT, FIELD)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"{FIELD} {model!r} has no chat template; use an instruct/chat model")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"{FIELD} {model!r}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def chat_prompt(tokenizer: Any, messages: Sequence[Message]) -> str:
    """``messages`` rendered by the tokenizer's chat template, ending where the assistant's reply starts.

    When the tokenizer adds a BOS token by itself (Llama 3 style) and the template writes one too, the
    template's is dropped from the text: the text is then tokenized with special tokens, as TRL's DPO and vLLM
    tokenize a text prompt, so sampling and training both see exactly one BOS.
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


class TransformersProposer(LLMProposer):
    """The ``transformers`` backend: a chat causal LM sampled with ``model.generate``.

    Sampling is free (no grammar); parsing with retries catches what the model gets wrong. With
    ``config.constrained`` set, one warning says so.

    Args:
        config: the ``proposer`` section; ``model`` is a Hub id or a local folder of a chat model.
        seed: unused (the model comes pretrained); accepted so every backend is built the same way.
    """

    trainable = True

    def __init__(self, config: ProposerConfig, seed: int = 0) -> None:
        super().__init__(config)
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.device, cuda_auto="bfloat16")
        self.tokenizer = load_chat_tokenizer(config.model)
        model = load_pretrained(AutoModelForCausalLM.from_pretrained, config.model, WHAT, FIELD, dtype=dtype)
        self.model: Any = model.to(self.device).eval()
        """The sampling model: the base model, or a ``PeftModel`` around it once an adapter is applied."""
        self.adapter: Path | None = None
        """The adapter sampled with (the latest one applied), or None."""
        self._warned_unconstrained = False
        logger.info("loaded %s on %s (%s)", config.model, self.device, dtype)

    # LLMProposer -------------------------------------------------------------------------------------
    def prompt_text(self, messages: Sequence[Message]) -> str:
        """The prompt rendered by the model's chat template (what DPO pairs are keyed and trained on)."""
        return chat_prompt(self.tokenizer, messages)

    @torch.no_grad()
    def generate(self, conversations: Sequence[Sequence[Message]], seed: int) -> list[str | None]:
        """One sampled reply per conversation, in batches of ``config.batch_size``; seeded by ``seed``."""
        if self.config.constrained and not self._warned_unconstrained:
            logger.warning(
                "proposer.constrained is set, but the transformers backend samples unconstrained "
                "(parsing and retries catch malformed replies); use backend vllm for guided decoding"
            )
            self._warned_unconstrained = True
        prompts = [self.prompt_text(conversation) for conversation in conversations]
        device = self.device
        replies: list[str | None] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.config.batch_size):
                chunk = prompts[start : start + self.config.batch_size]
                # special tokens on: a BOS the template wrote was taken out of the text (see chat_prompt);
                # input_ids (B, L), left-padded
                batch = self.tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                length = batch["input_ids"].shape[1]
                output = self.model.generate(
                    **batch,
                    do_sample=True,
                    temperature=self.config.temperature,
                    top_p=self.config.top_p,
                    top_k=0,
                    max_new_tokens=self.config.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self._eos_ids(),
                )  # (B, L + new tokens)
                replies += self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        return replies

    def _eos_ids(self) -> list[int]:
        """The tokenizer's EOS and those of the model's generation config (chat models often list two)."""
        ids = [self.tokenizer.eos_token_id]
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids += configured if isinstance(configured, list) else [configured]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # DPO ---------------------------------------------------------------------------------------------
    def base_model(self) -> Any:
        """The plain base model; the current adapter's LoRA layers are taken out (not merged) first."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model = self.model.unload()
        return self.model

    def training_model(self) -> tuple[Any, Path | None]:
        """(the plain base model, the adapter to continue or None) for the next DPO round.

        Until :meth:`apply_adapter` is called again, sampling runs on the base model without the adapter.
        """
        return self.base_model(), self.adapter

    def apply_adapter(self, path: str | Path) -> None:
        """Sample with the PEFT adapter saved at ``path``, in place of any previous one (not merged).

        Raises :class:`~kka_synth.utils.hub.AdapterError` (one line) for a folder without an adapter or with
        only pickle weights, before the current adapter is taken off.
        """
        path = check_adapter_dir(path)
        base = self.base_model()
        self.model = load_adapter(base, path).eval()
        self.adapter = path
        logger.info("sampling %s with LoRA adapter %s", self.config.model, path)

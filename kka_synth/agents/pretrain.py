"""Pretraining and caching of the compact proposer's language model.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
begins from an LLM that knows each category's anomalies. The offline profile builds that starting point: a
small ``LlamaForCausalLM`` from a ``LlamaConfig`` and a local BPE tokenizer, trained with AdamW on the
knowledge corpus of :mod:`kka_synth.agents.corpus` (loss on the completion tokens only). The result is saved
with ``save_pretrained`` under ``cache_dir("proposers", <key>)``, where the key hashes the knowledge files
(the user's own file included, by content), the architecture, the steps and the seed; the write goes to a
temporary folder that is renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kka_synth.agents.corpus import CorpusExample, SpecVocabulary, build_corpus, train_tokenizer
from kka_synth.config import ConfigError
from kka_synth.prompts.knowledge import (
    KNOWLEDGE_FILES,
    CategoryKnowledge,
    all_knowledge,
    knowledge_digest,
    parse_user_knowledge,
)
from kka_synth.utils.cache import cache_dir

logger = logging.getLogger(__name__)

SETTINGS_FILE = "proposer.json"
"""Saved next to the model and tokenizer: the knowledge files, the user's knowledge text, the description cap
and the pretraining log."""

USER_SOURCE = "the proposer's user knowledge"
"""How errors name a user knowledge text that reached the proposer without its file name."""

CORPUS_VERSION = 1
"""Bump when the corpus or tokenizer format changes, so cached models are rebuilt."""


@dataclass(frozen=True)
class CompactLMConfig:
    """Architecture, corpus and pretraining settings of the compact proposer (steps are in ProposerConfig)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 128
    vocab_size: int = 8192
    """Upper bound of the BPE vocabulary; the trained one is smaller when the corpus needs fewer merges."""
    specs_per_category: int = 200
    batch_size: int = 64
    learning_rate: float = 8e-3
    max_description_words: int = 8
    knowledge_files: tuple[str, ...] = KNOWLEDGE_FILES
    user_knowledge: str | None = None
    """YAML text of the user's knowledge file (``data.knowledge``): its categories join the corpus and the
    vocabulary, replacing shipped ones of the same name; the cache key hashes it."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "specs_per_category"):
            if getattr(self, name) < 1:
                raise ConfigError(f"compact LM {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"compact LM hidden_size {self.hidden_size} is not divisible by num_heads")
        if self.max_positions < 64:
            raise ConfigError(f"compact LM max_positions must be >= 64, got {self.max_positions}")
        if self.vocab_size < 300:
            raise ConfigError(f"compact LM vocab_size must be >= 300, got {self.vocab_size}")
        if self.batch_size < 1 or not 0 < self.learning_rate < 1:
            raise ConfigError("compact LM batch_size must be >= 1 and learning_rate in (0, 1)")
        if not 1 <= self.max_description_words <= 16:
            raise ConfigError(
                f"compact LM max_description_words must be in [1, 16], got {self.max_description_words}"
            )
        unknown = [name for name in self.knowledge_files if name not in KNOWLEDGE_FILES]
        if unknown or not self.knowledge_files:
            raise ConfigError(f"compact LM knowledge_files must name files of {', '.join(KNOWLEDGE_FILES)}")
        if self.user_knowledge is not None:
            parse_user_knowledge(self.user_knowledge, USER_SOURCE)

    def knowledge(self) -> dict[str, CategoryKnowledge]:
        """Every category the model learns: the knowledge files, then the user's categories."""
        return corpus_knowledge(self.knowledge_files, self.user_knowledge)


def corpus_knowledge(
    knowledge_files: tuple[str, ...], user_knowledge: str | None = None
) -> dict[str, CategoryKnowledge]:
    """The shipped files' categories merged with those of ``user_knowledge`` (a YAML text), which win."""
    extra = None if user_knowledge is None else parse_user_knowledge(user_knowledge, USER_SOURCE)
    return all_knowledge(knowledge_files, extra=extra)


def cache_key(lm: CompactLMConfig, steps: int, seed: int) -> str:
    """Hash of everything that determines the pretrained weights."""
    settings = asdict(lm)
    del settings["user_knowledge"]  # in the digest, by content; absent, the key is the one without it
    payload = {
        "corpus_version": CORPUS_VERSION,
        "knowledge": knowledge_digest(lm.knowledge_files, lm.user_knowledge),
        "lm": settings,
        "steps": steps,
        "seed": seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def build_model(lm: CompactLMConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` sized for ``tokenizer`` (seeded, global RNG untouched)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=lm.hidden_size,
        intermediate_size=lm.intermediate_size,
        num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_heads,
        max_position_embeddings=lm.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _encode(
    corpus: list[CorpusExample], tokenizer: PreTrainedTokenizerBase, max_positions: int
) -> list[tuple[list[int], int]]:
    """(token ids with BOS and EOS, prompt length with BOS) per example."""
    prompts = tokenizer([example.prompt for example in corpus])["input_ids"]
    completions = tokenizer([example.completion for example in corpus], add_special_tokens=False)["input_ids"]
    encoded = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = prompt + completion + [tokenizer.eos_token_id]
        if len(ids) > max_positions:
            raise ConfigError(f"a corpus text has {len(ids)} tokens, more than max_positions={max_positions}")
        encoded.append((ids, len(prompt)))
    return encoded


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    corpus: list[CorpusExample],
    steps: int,
    lm: CompactLMConfig,
    seed: int,
) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on ``corpus``; returns the loss of every step.

    The loss covers the completion and EOS only. The learning rate warms up over 5% of the steps, then
    follows a cosine down to a tenth.
    """
    encoded = _encode(corpus, tokenizer, lm.max_positions)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lm.learning_rate, betas=(0.9, 0.98), weight_decay=0.01
    )
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            rows = [encoded[i] for i in rng.integers(len(encoded), size=lm.batch_size)]
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(rows), width), -100, dtype=torch.long)  # (B, T)
            attention = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
            for row, (ids, prompt_length) in enumerate(rows):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
                attention[row, : len(ids)] = 1
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    return losses


def load_or_pretrain(lm: CompactLMConfig, steps: int, seed: int) -> Path:
    """The cached model folder for these settings, pretraining and saving it first when it is missing."""
    key = cache_key(lm, steps, seed)
    folder = cache_dir("proposers", key)
    target = folder / "model"
    if (target / SETTINGS_FILE).is_file():
        logger.info("loading the compact proposer from the cache (%s)", key)
        return target
    logger.info("pretraining the compact proposer (%d steps, seed %d); cached as %s", steps, seed, key)
    started = time.perf_counter()
    knowledge = lm.knowledge()
    corpus = build_corpus(knowledge, lm.specs_per_category, seed)
    tokenizer = train_tokenizer(
        [example.prompt + example.completion for example in corpus],
        SpecVocabulary.from_knowledge(knowledge),
        lm.vocab_size,
    )
    model = build_model(lm, tokenizer, seed)
    losses = pretrain(model, tokenizer, corpus, steps, lm, seed)
    seconds = time.perf_counter() - started
    if losses:
        logger.info("pretrained in %.1f s, loss %.3f -> %.3f", seconds, losses[0], losses[-1])
    temporary = folder / f".model-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        settings = {
            "knowledge_files": list(lm.knowledge_files),
            "user_knowledge": lm.user_knowledge,
            "max_description_words": lm.max_description_words,
            "pretrain": {"steps": steps, "seed": seed, "seconds": round(seconds, 2), "losses": losses},
        }
        (temporary / SETTINGS_FILE).write_text(json.dumps(settings))
        os.rename(temporary, target)
    except OSError:
        if not (target / SETTINGS_FILE).is_file():
            raise
        logger.info("another process cached the same proposer first; using its copy")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target

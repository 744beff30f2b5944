"""The offline proposer: a compact Llama-style causal LM that writes defect specs as JSON.

It stands in for the LLM of KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from
LLMs", arXiv 2502.14880) when no pretrained weights can be used: a few-layer ``LlamaForCausalLM`` and a local
BPE tokenizer are pretrained on first use on specs sampled from the knowledge base (all categories of all
knowledge files, so one model serves any dataset, plus the user's own file when ``data.knowledge`` names one),
then cached. Sampling is seeded and batched, and by default
constrained to the spec grammar. DPO aligns it by training a LoRA adapter on :attr:`CompactProposer.model`;
:meth:`CompactProposer.apply_adapter` merges that adapter so the next round samples with it. The model goes
by :attr:`CompactProposer.model_name` (``kka-synth/compact-proposer@<cache key>``), which its adapters record
as their base model in place of the cache folder's path on this machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from kka_synth.agents.base import ProposalContext, parse_completion
from kka_synth.agents.constraints import ConstraintError, Constraints
from kka_synth.agents.corpus import SpecVocabulary, compact_prompt
from kka_synth.agents.grammar import SpecGrammar, SpecGrammarProcessor
from kka_synth.agents.pretrain import (
    SETTINGS_FILE,
    CompactLMConfig,
    cache_key,
    corpus_knowledge,
    load_or_pretrain,
)
from kka_synth.config import ProposerConfig
from kka_synth.prompts.knowledge import GENERIC
from kka_synth.types import Proposal
from kka_synth.utils.hub import (
    MODEL_NAME_ATTR,
    AdapterError,
    check_adapter_dir,
    load_adapter,
    load_pretrained,
)

logger = logging.getLogger(__name__)

WHAT = "the compact proposer"
FIELD = "proposer.model"
NAME = "kka-synth/compact-proposer"
"""Prefix of :attr:`CompactProposer.model_name`."""

__all__ = ["AdapterError", "CompactProposer", "narrow_vocabulary"]


class CompactProposer:
    """The ``compact`` backend: a small causal LM pretrained on the knowledge base.

    ``CompactProposer(config, seed)`` loads the pretrained model from the cache, or pretrains and caches it on
    first use (see :func:`kka_synth.agents.pretrain.load_or_pretrain`). ``model_dir`` loads a saved model
    folder instead, as :meth:`from_pretrained` does.

    Args:
        config: sampling settings and ``pretrain_steps``; the defaults of :class:`ProposerConfig` when None.
        seed: seed of the corpus, the initial weights and the pretraining batches.
        lm: architecture, corpus and pretraining settings.
        model_dir: a folder saved by :meth:`save_pretrained` (skips the cache).
    """

    def __init__(
        self,
        config: ProposerConfig | None = None,
        seed: int = 0,
        *,
        lm: CompactLMConfig | None = None,
        model_dir: str | Path | None = None,
    ) -> None:
        self.config = config or ProposerConfig()
        lm = lm or CompactLMConfig()
        if model_dir is None:
            model_dir = load_or_pretrain(lm, self.config.pretrain_steps, seed)
            tag = cache_key(lm, self.config.pretrain_steps, seed)
        else:
            tag = None
        model_dir = Path(model_dir)
        settings = _read_settings(model_dir, lm)
        self.path = model_dir
        self.knowledge_files = tuple(settings["knowledge_files"])
        self.user_knowledge: str | None = settings.get("user_knowledge")
        self.max_description_words = int(settings["max_description_words"])
        self.model = load_pretrained(LlamaForCausalLM.from_pretrained, str(model_dir), WHAT, FIELD)
        self.model_name = f"{NAME}@{tag or weights_digest(model_dir)}"
        """Stable name of the model, free of machine paths: ``kka-synth/compact-proposer@<cache key>``, or
        ``@<hash of the weights>`` for a saved folder. The model carries it (``MODEL_NAME_ATTR``), so the
        LoRA adapters DPO trains on it record it as their base model."""
        setattr(self.model, MODEL_NAME_ATTR, self.model_name)
        self.model.eval()
        self.tokenizer = load_pretrained(PreTrainedTokenizerFast.from_pretrained, str(model_dir), WHAT, FIELD)
        self.tokenizer.padding_side = "left"
        knowledge = corpus_knowledge(self.knowledge_files, self.user_knowledge)
        self.categories = tuple(sorted(knowledge))
        """The categories the model was pretrained on (the user's included)."""
        self.vocabulary = SpecVocabulary.from_knowledge(knowledge)
        self._grammars: dict[tuple[int, str], SpecGrammar] = {}

    @classmethod
    def from_pretrained(cls, path: str | Path, config: ProposerConfig | None = None) -> CompactProposer:
        """Load a compact proposer saved with :meth:`save_pretrained` (model, tokenizer, settings)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no compact proposer at {path} (config.json missing)")
        return cls(config, model_dir=path)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the model, the tokenizer and the grammar settings to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        settings = {
            "knowledge_files": list(self.knowledge_files),
            "user_knowledge": self.user_knowledge,
            "max_description_words": self.max_description_words,
        }
        (path / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))

    def prompt_for(self, context: ProposalContext) -> str:
        """The one-line prompt the model continues (examples and constraints are for chat backends).

        A category without its own knowledge entry (a folder dataset, say) is asked as the generic category:
        its defect list is the generic one, and the compact model was pretrained on that prompt, while its own
        name is a prompt the model never saw, which it answers with other categories' defect types. A category
        of the user's knowledge file is asked by its own name, which pretraining saw when
        ``lm.user_knowledge`` held that file.
        """
        if context.knowledge.dataset == GENERIC:
            return compact_prompt(context.knowledge, GENERIC)
        return compact_prompt(context.knowledge, context.category)

    def grammar(self, constraints: Constraints | None = None) -> SpecGrammar:
        """The spec grammar, with the description cap shrunk to fit ``config.max_new_tokens``.

        With ``constraints`` the value lists shrink to what they allow (see :func:`narrow_vocabulary`), so
        every sampled spec obeys them; notes, which no grammar can read, are ignored.
        """
        vocabulary, key = self.vocabulary, ""
        if constraints is not None and not constraints.empty:
            vocabulary = narrow_vocabulary(self.vocabulary, constraints)
            key = json.dumps({k: v for k, v in constraints.to_dict().items() if k != "notes"}, sort_keys=True)
        full = self._grammars.get((self.max_description_words, key))
        if full is None:
            full = SpecGrammar(
                self.tokenizer, vocabulary, self.max_description_words, self.model.config.vocab_size
            )
            self._grammars[(self.max_description_words, key)] = full
        words = full.words_within(self.config.max_new_tokens)
        if (words, key) not in self._grammars:
            logger.info("description cap lowered to %d words to fit max_new_tokens", words)
            self._grammars[(words, key)] = SpecGrammar(
                self.tokenizer, vocabulary, words, self.model.config.vocab_size
            )
        return self._grammars[(words, key)]

    def _processors(self, prompt_length: int, constraints: Constraints | None = None) -> LogitsProcessorList:
        # The grammar masks first, so temperature and top-p only reshape the allowed tokens.
        processors = LogitsProcessorList()
        if self.config.constrained:
            processors.append(SpecGrammarProcessor(self.grammar(constraints), prompt_length))
        if self.config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.config.temperature))
        if self.config.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.config.top_p))
        return processors

    @torch.no_grad()
    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        """Sample ``n`` completions for ``context`` in batches of ``config.batch_size``, seeded by ``seed``.

        Each :class:`Proposal` holds the prompt, the completion decoded without the prompt, and the parse
        result (a spec, or the reason it failed).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if context.examples or context.constraints.notes:
            logger.debug("the compact proposer ignores few-shot examples and free-text notes")
        prompt = self.prompt_for(context)
        generation = GenerationConfig(
            do_sample=True,
            max_new_tokens=self.config.max_new_tokens,
            top_k=0,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        device = self.model.device
        texts: list[str] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, n, self.config.batch_size):
                size = min(self.config.batch_size, n - start)
                batch = self.tokenizer([prompt] * size, return_tensors="pt", padding=True).to(device)
                length = batch["input_ids"].shape[1]
                output = self.model.generate(
                    **batch,
                    generation_config=generation,
                    logits_processor=self._processors(length, context.constraints),
                )  # (size, length + new tokens)
                texts += self.tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
        proposals = [parse_completion(text, context, prompt=prompt) for text in texts]
        valid = sum(p.spec is not None for p in proposals)
        logger.debug("%s: %d of %d proposals parsed", context.category, valid, n)
        return proposals

    trainable = True
    """DPO trains it (see :class:`kka_synth.agents.base.TrainableProposer`)."""

    def training_model(self) -> tuple[LlamaForCausalLM, None]:
        """The model DPO trains, earlier adapters merged in, so each round starts a fresh adapter."""
        return self.model, None

    def apply_adapter(self, path: str | Path) -> None:
        """Load a PEFT LoRA adapter saved with ``save_pretrained`` onto :attr:`model` and merge it.

        After this :attr:`model` is a plain ``LlamaForCausalLM`` again, so a later DPO round can train a new
        adapter on it.

        Raises:
            AdapterError: no adapter at ``path``, an adapter saved only as a pickle (``adapter_model.bin``),
                or a model that already carries LoRA layers.
        """
        path = check_adapter_dir(path)
        if any("lora_" in name for name, _ in self.model.named_parameters()):
            raise AdapterError(
                "the proposer's model already carries LoRA layers; "
                "train DPO on a copy of it or merge them first"
            )
        merged = load_adapter(self.model, path).merge_and_unload()
        setattr(merged, MODEL_NAME_ATTR, self.model_name)
        self.model = merged.eval()
        logger.info("merged LoRA adapter %s into the compact proposer", path)


def weights_digest(folder: Path) -> str:
    """Hash of the safetensors weights in ``folder``: the same weights give the same name on any machine."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def narrow_vocabulary(vocabulary: SpecVocabulary, constraints: Constraints) -> SpecVocabulary:
    """``vocabulary`` with the types, regions, shapes, tones, sizes and severities ``constraints`` allow.

    Raises :class:`~kka_synth.agents.constraints.ConstraintError` when a field has no value left.
    """
    types = tuple(
        t
        for t in vocabulary.defect_types
        if t not in constraints.exclude_types and (not constraints.only_types or t in constraints.only_types)
    )

    def within(values: tuple[str, ...], low: float | None, high: float | None) -> tuple[str, ...]:
        return tuple(
            v for v in values if (low is None or float(v) >= low) and (high is None or float(v) <= high)
        )

    narrowed = dataclasses.replace(
        vocabulary,
        defect_types=types,
        regions=constraints.narrow_values("region", vocabulary.regions),
        shapes=constraints.narrow_values("shape", vocabulary.shapes),
        tones=constraints.narrow_values("tone", vocabulary.tones),
        sizes=within(vocabulary.sizes, constraints.size_min, constraints.size_max),
        severities=within(vocabulary.severities, constraints.severity_min, constraints.severity_max),
    )
    for name in ("defect_types", "regions", "shapes", "tones", "sizes", "severities"):
        if not getattr(narrowed, name):
            raise ConstraintError(
                f"the constraints leave no {name.replace('_', ' ')[:-1]} the compact proposer knows"
            )
    return narrowed


def _read_settings(model_dir: Path, lm: CompactLMConfig) -> dict:
    path = model_dir / SETTINGS_FILE
    if not path.is_file():
        return {
            "knowledge_files": list(lm.knowledge_files),
            "user_knowledge": lm.user_knowledge,
            "max_description_words": lm.max_description_words,
        }
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg})") from None
    missing = [key for key in ("knowledge_files", "max_description_words") if key not in settings]
    if missing:
        raise ValueError(f"{path} lacks {missing[0]}")
    if not isinstance(settings.get("user_knowledge"), (str, type(None))):
        raise ValueError(f"{path}: user_knowledge must be a YAML text or null")
    return settings

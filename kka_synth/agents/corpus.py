"""The compact proposer's language: spec texts sampled from the knowledge base, and a BPE tokenizer for them.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
starts from an LLM that already knows which anomalies a category shows. Offline there is no such LLM, so the
compact proposer learns that knowledge from a corpus: for every category of the knowledge files, random specs
drawn from its defect types (regions, shapes, tones, size range, phrases), each written as
``prompt + completion`` where the completion is the spec's JSON with the keys in :data:`SPEC_FIELDS` order.

The tokenizer splits text into pieces before byte-level BPE, so that each JSON key (with its quotes and
separators), each value and each description word becomes one token when frequent enough:
``{"defect_type": "`` | ``broken_large`` | ``", "description": "`` | ``large`` | `` chip`` | ... | ``}``.
A spec is then about 20-30 tokens, and a token never crosses a piece boundary, which the grammar of
:mod:`kka_synth.agents.grammar` relies on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kka_synth.prompts.knowledge import SEVERITY_LADDER, CategoryKnowledge
from kka_synth.prompts.templates import render_prompt
from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES

PAD, BOS, EOS = "<pad>", "<s>", "</s>"

PIECE_PATTERN = r'(?:\{|"?, )"[a-z_]+": "?|\}| ?[A-Za-z][A-Za-z0-9_\-]*|\d+(?:\.\d+)?'
"""Pre-tokenizer pieces: a JSON key with its separators, a closing brace, a word (with its leading space),
or a number. Text between matches forms pieces of its own."""

STRING_FIELDS = ("defect_type", "description", "region", "shape", "tone")
"""Spec fields written as JSON strings; the others (size, severity) are numbers."""


def number_text(value: float) -> str:
    """How a ladder value is written in a spec (``0.02``, ``0.7``, ``1.0``)."""
    return json.dumps(float(value))


def spec_text(values: Mapping[str, Any]) -> str:
    """The canonical completion for ``values``: one JSON object, keys in :data:`SPEC_FIELDS` order."""
    return json.dumps({key: values[key] for key in SPEC_FIELDS})


def field_separators() -> list[str]:
    """The literal text before each field's value and after the last one (``len(SPEC_FIELDS) + 1`` pieces).

    Derived from :func:`spec_text` itself, so the grammar and the corpus cannot disagree.
    """
    marker, number = "@@", 12345
    sample = {key: (marker if key in STRING_FIELDS else number) for key in SPEC_FIELDS}
    text = spec_text(sample).replace(str(number), marker)
    parts = text.split(marker)
    if len(parts) != len(SPEC_FIELDS) + 1:
        raise RuntimeError("spec_text changed shape; field_separators cannot split it")
    return parts


def sample_spec(knowledge: CategoryKnowledge, rng: np.random.Generator) -> dict[str, Any]:
    """One random spec of ``knowledge``'s category: a defect type and values it allows."""
    names = list(knowledge.defect_types)
    defect = knowledge.defect_types[names[rng.integers(len(names))]]
    sizes = defect.sizes()
    return {
        "defect_type": defect.name,
        "description": defect.phrases[rng.integers(len(defect.phrases))],
        "region": defect.regions[rng.integers(len(defect.regions))],
        "size": sizes[rng.integers(len(sizes))],
        "shape": defect.shapes[rng.integers(len(defect.shapes))],
        "tone": defect.tones[rng.integers(len(defect.tones))],
        "severity": SEVERITY_LADDER[rng.integers(len(SEVERITY_LADDER))],
    }


def compact_prompt(knowledge: CategoryKnowledge, category: str | None = None) -> str:
    """The compact proposer's prompt for a category (``category`` overrides the knowledge's name)."""
    return render_prompt("compact", category=category or knowledge.name, kind=knowledge.kind)


@dataclass(frozen=True)
class CorpusExample:
    """One training text of the compact proposer."""

    prompt: str
    completion: str


def build_corpus(
    knowledge: Mapping[str, CategoryKnowledge], per_category: int, seed: int
) -> list[CorpusExample]:
    """``per_category`` random specs for every category of ``knowledge``, in a seeded order."""
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    rng = np.random.default_rng(seed)
    examples = [
        CorpusExample(compact_prompt(entry), spec_text(sample_spec(entry, rng)))
        for name in sorted(knowledge)
        for entry in [knowledge[name]]
        for _ in range(per_category)
    ]
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


@dataclass(frozen=True)
class SpecVocabulary:
    """Every value the spec grammar may write, as text."""

    defect_types: tuple[str, ...]
    regions: tuple[str, ...]
    sizes: tuple[str, ...]
    shapes: tuple[str, ...]
    tones: tuple[str, ...]
    severities: tuple[str, ...]
    words: tuple[str, ...]
    """Description words (every word of every phrase)."""

    @classmethod
    def from_knowledge(cls, knowledge: Mapping[str, CategoryKnowledge]) -> SpecVocabulary:
        defects = [d for entry in knowledge.values() for d in entry.defect_types.values()]
        if not defects:
            raise ValueError("the knowledge holds no defect types")
        sizes = sorted({s for d in defects for s in d.sizes()})
        return cls(
            defect_types=tuple(sorted({d.name for d in defects})),
            regions=tuple(REGIONS),
            sizes=tuple(number_text(s) for s in sizes),
            shapes=SHAPES,
            tones=TONES,
            severities=tuple(number_text(s) for s in SEVERITY_LADDER),
            words=tuple(sorted({w for d in defects for p in d.phrases for w in p.split()})),
        )

    def values(self, field: str) -> tuple[str, ...]:
        """The allowed values of a spec field other than description."""
        table = {
            "defect_type": self.defect_types,
            "region": self.regions,
            "size": self.sizes,
            "shape": self.shapes,
            "tone": self.tones,
            "severity": self.severities,
        }
        if field not in table:
            raise KeyError(f"no value list for spec field {field!r}")
        return table[field]


def train_tokenizer(
    texts: Iterable[str], vocabulary: SpecVocabulary, vocab_size: int = 8192
) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on ``texts`` plus every vocabulary piece, wrapped for transformers.

    Each vocabulary piece is added twice, so every value and word is frequent enough to become one token
    (when ``vocab_size`` allows). The tokenizer prepends BOS to every encoded text; EOS ends completions.
    """
    pieces = [*vocabulary.defect_types, *vocabulary.regions, *vocabulary.sizes, *vocabulary.shapes]
    pieces += [*vocabulary.tones, *vocabulary.severities, *vocabulary.words]
    pieces += [f" {word}" for word in vocabulary.words]
    pieces += field_separators()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([*texts, *pieces, *pieces], trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return wrapped

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerFast

from kka_synth.agents import CompactProposer
from kka_synth.agents.corpus import (
    SpecVocabulary,
    build_corpus,
    field_separators,
    number_text,
    spec_text,
)
from kka_synth.prompts.knowledge import SEVERITY_LADDER, all_knowledge, load_knowledge
from kka_synth.types import SPEC_FIELDS, DefectSpec


def test_corpus_covers_every_category_and_parses() -> None:
    knowledge = all_knowledge()
    corpus = build_corpus(knowledge, per_category=3, seed=1)
    assert len(corpus) == 3 * len(knowledge)
    assert corpus == build_corpus(knowledge, per_category=3, seed=1)
    assert corpus != build_corpus(knowledge, per_category=3, seed=2)
    seen = set()
    for example in corpus:
        category = example.prompt.split()[1]
        seen.add(category)
        entry = knowledge[category]
        assert example.prompt == f"category: {category} ({entry.kind})\n"
        data = json.loads(example.completion)
        assert list(data) == list(SPEC_FIELDS)
        defect = entry.defect_types[data["defect_type"]]
        assert data["region"] in defect.regions and data["shape"] in defect.shapes
        assert data["tone"] in defect.tones and data["description"] in defect.phrases
        assert data["size"] in defect.sizes() and data["severity"] in SEVERITY_LADDER
        DefectSpec.from_text(example.completion, category, list(entry.defect_types))
    assert seen == set(knowledge)


def test_field_separators_rebuild_a_spec() -> None:
    separators = field_separators()
    assert separators[0] == '{"defect_type": "' and separators[-1] == "}"
    values = {"defect_type": "dent", "description": "a b", "region": "top", "size": 0.02}
    values |= {"shape": "blob", "tone": "darker", "severity": 0.7}
    pieces = [
        piece
        for separator, key in zip(separators, SPEC_FIELDS, strict=False)
        for piece in (separator, values[key] if isinstance(values[key], str) else number_text(values[key]))
    ]
    assert "".join(pieces) + separators[-1] == spec_text(values)


def test_vocabulary_lists_every_value() -> None:
    vocabulary = SpecVocabulary.from_knowledge(all_knowledge(("demo",)))
    assert set(vocabulary.defect_types) >= {"crack", "rust", "efflorescence"}
    assert "1.0" in vocabulary.severities and "0.1" in vocabulary.severities
    assert set(vocabulary.words) >= {"rust", "mortar", "ring"}


def test_tokenizer_round_trip_and_one_token_pieces(tiny_proposer: CompactProposer) -> None:
    tokenizer = tiny_proposer.tokenizer
    vocabulary = tiny_proposer.vocabulary
    for text in ('{"defect_type": "rust", "description": "rust spot", "size": 0.02}', "Grüße ✓ 12,5 %\n\t"):
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    singles = [*field_separators(), *vocabulary.defect_types, *vocabulary.regions, *vocabulary.shapes]
    singles += [*vocabulary.tones, *vocabulary.sizes, *vocabulary.severities, *vocabulary.words]
    singles += [f" {word}" for word in vocabulary.words]
    for piece in singles:
        assert len(tokenizer.encode(piece, add_special_tokens=False)) == 1, piece


def test_spec_is_short_and_prompt_is_a_token_prefix(tiny_proposer: CompactProposer) -> None:
    tokenizer = tiny_proposer.tokenizer
    knowledge = all_knowledge(("demo",))
    for example in build_corpus(knowledge, per_category=5, seed=0):
        completion = tokenizer.encode(example.completion, add_special_tokens=False)
        assert 14 <= len(completion) <= 40
        prompt_ids = tokenizer(example.prompt)["input_ids"]
        both = tokenizer(example.prompt + example.completion)["input_ids"]
        assert both[: len(prompt_ids)] == prompt_ids and both[len(prompt_ids) :] == completion
        eos = tokenizer(example.prompt + example.completion + tokenizer.eos_token)["input_ids"]
        assert eos[-1] == tokenizer.eos_token_id


def test_tokenizer_saves_and_reloads(tiny_proposer: CompactProposer, tmp_path) -> None:
    tiny_proposer.tokenizer.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "category: washer (object)\n" + load_knowledge("washer").defect_types["rust"].phrases[0]
    assert again(text)["input_ids"] == tiny_proposer.tokenizer(text)["input_ids"]
    assert (again.pad_token, again.bos_token, again.eos_token) == ("<pad>", "<s>", "</s>")

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kka_synth.agents import CompactProposer
from kka_synth.agents.corpus import build_corpus, spec_text
from kka_synth.agents.grammar import GrammarError, SpecGrammar, SpecGrammarProcessor
from kka_synth.prompts.knowledge import all_knowledge

BASE = {
    "defect_type": "rust",
    "description": "rust spot on the metal",
    "region": "top-left",
    "size": 0.02,
    "shape": "stain",
    "tone": "colour",
    "severity": 0.3,
}


@pytest.fixture(scope="module")
def grammar(tiny_proposer: CompactProposer) -> SpecGrammar:
    return SpecGrammar(tiny_proposer.tokenizer, tiny_proposer.vocabulary, max_words=6)


def _ids(proposer: CompactProposer, text: str) -> list[int]:
    return proposer.tokenizer.encode(text, add_special_tokens=False)


def test_accepts_corpus_specs(grammar: SpecGrammar, tiny_proposer: CompactProposer) -> None:
    eos = tiny_proposer.tokenizer.eos_token_id
    for example in build_corpus(all_knowledge(("demo",)), per_category=20, seed=3):
        assert grammar.accepts(_ids(tiny_proposer, example.completion))
        assert grammar.accepts([*_ids(tiny_proposer, example.completion), eos])


@pytest.mark.parametrize(
    "change",
    [
        {"region": "middle"},  # not a region name
        {"size": 0.0123},  # not on the size ladder
        {"severity": 0.35},  # not on the severity ladder
        {"shape": "dent"},
        {"defect_type": "wobble"},  # in no knowledge file
        {"description": "rust spot on the zebra"},  # an unknown word
        {"description": "rust spot on the metal ring on the ring"},  # longer than max_words
        {"description": ""},
    ],
)
def test_rejects_values_outside_the_vocabularies(
    grammar: SpecGrammar, tiny_proposer: CompactProposer, change: dict
) -> None:
    assert grammar.accepts(_ids(tiny_proposer, spec_text(BASE)))
    assert not grammar.accepts(_ids(tiny_proposer, spec_text({**BASE, **change})))


def test_rejects_wrong_key_order_and_unfinished_text(
    grammar: SpecGrammar, tiny_proposer: CompactProposer
) -> None:
    swapped = spec_text(BASE).replace(
        '"shape": "stain", "tone": "colour"', '"tone": "colour", "shape": "stain"'
    )
    assert not grammar.accepts(_ids(tiny_proposer, swapped))
    assert not grammar.accepts(_ids(tiny_proposer, spec_text(BASE)[:-1]))


def test_type_of_another_category_is_allowed(grammar: SpecGrammar, tiny_proposer: CompactProposer) -> None:
    # efflorescence is a brick defect; semantic validity is left to parse_completion
    assert grammar.accepts(_ids(tiny_proposer, spec_text({**BASE, "defect_type": "efflorescence"})))


def test_processor_masks_step_by_step(grammar: SpecGrammar, tiny_proposer: CompactProposer) -> None:
    prompt = tiny_proposer.tokenizer(["category: washer (object)\n"] * 2, return_tensors="pt")["input_ids"]
    spec = _ids(tiny_proposer, spec_text(BASE))
    processor = SpecGrammarProcessor(grammar, prompt.shape[1])
    vocab = grammar.vocab_size
    ids = prompt
    for token in spec:
        scores = processor(ids, torch.zeros(2, vocab))
        allowed = torch.isfinite(scores)
        assert allowed[:, token].all()
        ids = torch.cat([ids, torch.tensor([[token], [token]])], dim=1)
    first = SpecGrammarProcessor(grammar, prompt.shape[1])(prompt, torch.zeros(2, vocab))
    assert torch.isfinite(first).sum(dim=1).tolist() == [1, 1]  # only '{"defect_type": "'
    last = processor(ids, torch.zeros(2, vocab))
    eos = tiny_proposer.tokenizer.eos_token_id
    assert torch.isfinite(last).sum(dim=1).tolist() == [1, 1] and torch.isfinite(last[:, eos]).all()


def test_budget_lowers_the_description_cap(grammar: SpecGrammar) -> None:
    assert grammar.words_within(200) == 6
    assert grammar.max_length(1) < grammar.max_length(6)
    assert grammar.words_within(grammar.max_length(2)) == 2
    with pytest.raises(GrammarError, match="proposer.max_new_tokens=5 is too small"):
        grammar.words_within(5)


def test_tokenizer_that_merges_across_pieces_is_refused(tiny_proposer: CompactProposer) -> None:
    plain = Tokenizer(models.BPE(unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    texts = [example.completion for example in build_corpus(all_knowledge(("demo",)), 50, 0)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"], show_progress=False)
    plain.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="</s>", unk_token="<unk>")
    with pytest.raises(GrammarError, match="merges across spec pieces"):
        SpecGrammar(wrapped, tiny_proposer.vocabulary)

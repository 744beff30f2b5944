"""Grammar-constrained sampling of spec JSON for the compact proposer.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
aligns its proposer with DPO; on a small LM, DPO alone quickly breaks the JSON, so sampling is constrained to
the spec grammar: the keys of :data:`~kka_synth.types.SPEC_FIELDS` in order, each value from its vocabulary
(any defect type of the knowledge base, region names, shapes, tones, the size and severity ladders), and a
description of 1 to ``max_words`` known words. Semantic validity (a type listed for *this* category) is
deliberately not forced, so those failures still show up in the parse statistics.

The grammar is a token-level automaton: each piece of text is tokenized alone (the corpus tokenizer never
merges across pieces), the pieces form a nondeterministic automaton, and its deterministic states are built
lazily and cached with their vocabulary masks, so one sampling step costs a dict lookup per row and one
``torch.stack`` of cached masks.
"""

from __future__ import annotations

import logging

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from kka_synth.agents.corpus import SpecVocabulary, field_separators
from kka_synth.types import SPEC_FIELDS

logger = logging.getLogger(__name__)


class GrammarError(ValueError):
    """The spec grammar cannot be built (tokenizer mismatch or a token budget that is too small)."""


class _Automaton:
    """A nondeterministic automaton over token ids with epsilon edges; nodes are ints."""

    def __init__(self) -> None:
        self.edges: list[dict[int, set[int]]] = []
        self.epsilon: list[set[int]] = []

    def node(self) -> int:
        self.edges.append({})
        self.epsilon.append(set())
        return len(self.edges) - 1

    def add_choice(self, start: int, sequences: list[list[int]], end: int) -> None:
        """Edges from ``start`` to ``end`` spelling any of ``sequences`` (shared prefixes share nodes)."""
        inner: dict[tuple[int, int], int] = {}
        for sequence in sequences:
            current = start
            for token in sequence[:-1]:
                key = (current, token)
                if key not in inner:
                    inner[key] = self.node()
                    self.edges[current].setdefault(token, set()).add(inner[key])
                current = inner[key]
            self.edges[current].setdefault(sequence[-1], set()).add(end)

    def closure(self, nodes: set[int]) -> frozenset[int]:
        stack, seen = list(nodes), set(nodes)
        while stack:
            for target in self.epsilon[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)


class SpecGrammar:
    """The token-level grammar of a spec completion, ending with EOS.

    Args:
        tokenizer: the compact proposer's tokenizer.
        vocabulary: the values each field may take.
        max_words: longest description, in words.
        vocab_size: width of the logits the masks apply to (the model's vocabulary size).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocabulary: SpecVocabulary,
        max_words: int = 8,
        vocab_size: int | None = None,
    ) -> None:
        if max_words < 1:
            raise GrammarError(f"max_words must be >= 1, got {max_words}")
        if tokenizer.eos_token_id is None:
            raise GrammarError("the tokenizer has no EOS token")
        self.tokenizer = tokenizer
        self.vocabulary = vocabulary
        self.max_words = max_words
        self.vocab_size = vocab_size or len(tokenizer)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._check_tokenizer()
        self._fixed_length, self._word_length, self._first_length = self._lengths()
        self._automaton, start = self._build()
        self._states: list[frozenset[int]] = []
        self._ids: dict[frozenset[int], int] = {}
        self._moves: dict[tuple[int, int], int] = {}
        self._masks: list[torch.Tensor] = []
        self.start = self._state_id(self._automaton.closure({start}))

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise GrammarError(f"the tokenizer encodes {text!r} as no tokens")
        return ids

    def _check_tokenizer(self) -> None:
        """Tokens must never cross piece boundaries, or the automaton would miss the model's tokenization."""
        values = {field: self.vocabulary.values(field)[0] for field in SPEC_FIELDS if field != "description"}
        words = self.vocabulary.words[:3]
        pieces: list[str] = []
        for separator, field in zip(field_separators(), SPEC_FIELDS, strict=False):
            pieces.append(separator)
            if field == "description":
                pieces += [words[0], *(f" {word}" for word in words[1:])]
            else:
                pieces.append(values[field])
        pieces.append(field_separators()[-1])
        joined = [token for piece in pieces for token in self._encode(piece)]
        if self._encode("".join(pieces)) != joined:
            raise GrammarError(
                "the tokenizer merges across spec pieces; "
                "use a tokenizer from kka_synth.agents.corpus.train_tokenizer"
            )

    def _lengths(self) -> tuple[int, int, int]:
        separators = sum(len(self._encode(piece)) for piece in field_separators())
        values = sum(
            max(len(self._encode(value)) for value in self.vocabulary.values(field))
            for field in SPEC_FIELDS
            if field != "description"
        )
        words = self.vocabulary.words
        first = max(len(self._encode(word)) for word in words)
        later = max(len(self._encode(f" {word}")) for word in words)
        return separators + values, later, first

    def max_length(self, max_words: int | None = None) -> int:
        """Most tokens a completion can take before EOS with ``max_words`` description words."""
        words = self.max_words if max_words is None else max_words
        return self._fixed_length + self._first_length + (words - 1) * self._word_length

    def words_within(self, max_new_tokens: int) -> int:
        """The largest description cap (at most ``max_words``) whose longest completion fits the budget."""
        for words in range(self.max_words, 0, -1):
            if self.max_length(words) <= max_new_tokens:
                return words
        raise GrammarError(
            f"proposer.max_new_tokens={max_new_tokens} is too small for the spec grammar "
            f"(a spec may need {self.max_length(1)} tokens)"
        )

    def _build(self) -> tuple[_Automaton, int]:
        automaton = _Automaton()
        start = current = automaton.node()
        separators = field_separators()
        first_words = [self._encode(word) for word in self.vocabulary.words]
        later_words = [self._encode(f" {word}") for word in self.vocabulary.words]
        for separator, field in zip(separators, SPEC_FIELDS, strict=False):
            after = automaton.node()
            automaton.add_choice(current, [self._encode(separator)], after)
            current = automaton.node()
            if field == "description":
                word_ends = []
                begin = after
                for index in range(self.max_words):
                    end = automaton.node()
                    automaton.add_choice(begin, first_words if index == 0 else later_words, end)
                    word_ends.append(end)
                    begin = end
                for end in word_ends:
                    automaton.epsilon[end].add(current)
            else:
                values = [self._encode(value) for value in self.vocabulary.values(field)]
                automaton.add_choice(after, values, current)
        closed = automaton.node()
        automaton.add_choice(current, [self._encode(separators[-1])], closed)
        done = automaton.node()
        automaton.add_choice(closed, [[self.eos_token_id]], done)
        return automaton, start

    def _state_id(self, nodes: frozenset[int]) -> int:
        if nodes not in self._ids:
            self._ids[nodes] = len(self._states)
            self._states.append(nodes)
            allowed = {token for node in nodes for token in self._automaton.edges[node]}
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            mask[sorted(allowed or {self.eos_token_id})] = True
            self._masks.append(mask)
        return self._ids[nodes]

    def step(self, state: int, token: int) -> int:
        """The state after ``token``; a finished or off-grammar row stays in a state that allows only EOS."""
        key = (state, token)
        if key not in self._moves:
            edges = self._automaton.edges
            targets = {t for node in self._states[state] for t in edges[node].get(token, ())}
            self._moves[key] = self._state_id(self._automaton.closure(targets))
        return self._moves[key]

    def allowed(self, state: int) -> torch.Tensor:
        """Bool mask (vocab_size,) of the tokens allowed in ``state``."""
        return self._masks[state]

    def is_complete(self, state: int) -> bool:
        """True when the text so far is a whole spec (only EOS may follow)."""
        return bool(self._masks[state][self.eos_token_id]) and int(self._masks[state].sum()) == 1

    def accepts(self, token_ids: list[int]) -> bool:
        """True when ``token_ids`` (without the prompt) spell a whole spec the grammar allows."""
        state = self.start
        for token in token_ids:
            if not self._masks[state][token]:
                return False
            state = self.step(state, token)
        return self.is_complete(state)


class SpecGrammarProcessor(LogitsProcessor):
    """Masks the logits of every token the spec grammar does not allow next.

    Use one instance per ``generate`` call; ``prompt_length`` is the (left-padded) prompt's length.
    """

    def __init__(self, grammar: SpecGrammar, prompt_length: int) -> None:
        self.grammar = grammar
        self.prompt_length = prompt_length
        self._states: list[int] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # input_ids: (B, T) prompt plus generated tokens; scores: (B, V) next-token logits
        generated = input_ids.shape[1] - self.prompt_length
        if generated == 0 or self._states is None:
            if generated != 0:
                raise RuntimeError(
                    "SpecGrammarProcessor joined a generation midway; build one per generate call"
                )
            self._states = [self.grammar.start] * input_ids.shape[0]
        else:
            last = input_ids[:, -1].tolist()
            self._states = [
                self.grammar.step(state, token) for state, token in zip(self._states, last, strict=True)
            ]
        mask = torch.stack([self.grammar.allowed(state) for state in self._states]).to(scores.device)
        if mask.shape[1] != scores.shape[1]:
            raise RuntimeError(f"grammar masks have width {mask.shape[1]}, logits {scores.shape[1]}")
        return scores.masked_fill(~mask, float("-inf"))

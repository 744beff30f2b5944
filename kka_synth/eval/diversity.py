"""Diversity of a proposer's output, to see whether DPO collapses it onto a few shortcuts.

- distinct-n (Li et al., "A Diversity-Promoting Objective Function for Neural Conversation Models",
  NAACL 2016): distinct n-grams over all n-grams of a set of texts.
- field entropy: Shannon entropy (bits) of each DefectSpec field's values over a set of specs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from kka_synth.types import DefectSpec

_WORD = re.compile(r"[A-Za-z0-9_.\-]+|[^\sA-Za-z0-9_.\-]")


def words(text: str) -> list[str]:
    """Split a completion into words and single punctuation marks."""
    return _WORD.findall(text)


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over ``texts`` (0.0 for no n-grams)."""
    grams: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        tokens = words(text)
        grams.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def entropy(values: Iterable[object]) -> float:
    """Shannon entropy in bits of the empirical distribution of ``values`` (0.0 when empty)."""
    counts = Counter(values)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def spec_key(spec: DefectSpec) -> tuple[object, ...]:
    """The discrete identity of a spec (description excluded): two specs with one key look alike."""
    return (spec.defect_type, spec.region, spec.size, spec.shape, spec.tone, round(spec.severity, 1))


def field_entropy(specs: Sequence[DefectSpec]) -> dict[str, float]:
    """Entropy in bits of each spec field over ``specs``."""
    return {
        "defect_type": entropy(s.defect_type for s in specs),
        "region": entropy(s.region for s in specs),
        "size": entropy(s.size for s in specs),
        "shape": entropy(s.shape for s in specs),
        "tone": entropy(s.tone for s in specs),
        "severity": entropy(round(s.severity, 1) for s in specs),
    }

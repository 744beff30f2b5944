import math

from kka_synth.eval.diversity import distinct_n, entropy, field_entropy, spec_key
from kka_synth.types import REGIONS, DefectSpec


def _spec(shape: str, tone: str) -> DefectSpec:
    return DefectSpec("brick", "crack", "", REGIONS["center"], 0.02, shape, tone, 0.5)


def test_distinct_2_by_hand():
    # bigrams: (a b) (b c) | (a b) (b d)  -> 3 distinct of 4
    assert distinct_n(["a b c", "a b d"], 2) == 0.75
    assert distinct_n(["same text"] * 4, 2) == 0.25
    assert distinct_n([], 2) == 0.0


def test_entropy_by_hand():
    assert entropy(["x", "x", "y", "y"]) == 1.0
    assert entropy(["x"] * 5) == 0.0
    assert math.isclose(entropy("abcd"), 2.0)


def test_field_entropy_and_spec_key():
    specs = [
        _spec("crack", "darker"),
        _spec("blob", "darker"),
        _spec("crack", "brighter"),
        _spec("blob", "brighter"),
    ]
    ent = field_entropy(specs)
    assert ent["shape"] == 1.0 and ent["tone"] == 1.0 and ent["defect_type"] == 0.0
    assert len({spec_key(s) for s in specs}) == 4

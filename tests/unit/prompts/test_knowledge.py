from __future__ import annotations

import logging

import pytest
import yaml

from kka_synth.prompts import knowledge as kb
from kka_synth.prompts.knowledge import (
    KNOWLEDGE_FILES,
    SIZE_LADDER,
    KnowledgeError,
    all_knowledge,
    knowledge_digest,
    knowledge_text,
    load_knowledge,
    load_knowledge_file,
    parse_knowledge,
)
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, TONES

EXPECTED = {
    "mvtec_ad": {
        "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
        "tile", "toothbrush", "transistor", "wood", "zipper",
    },
    "mvtec_loco": {"breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"},
    "visa": {
        "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
        "pcb3", "pcb4", "pipe_fryum",
    },
    "demo": {"brick", "washer"},
    "generic": {"generic"},
}  # fmt: skip


@pytest.mark.parametrize("dataset", KNOWLEDGE_FILES)
def test_every_shipped_file_validates(dataset: str) -> None:
    entries = parse_knowledge(knowledge_text(dataset), f"knowledge/{dataset}.yaml")
    assert set(entries) == EXPECTED[dataset]
    for name, entry in entries.items():
        assert entry.name == name and entry.dataset == dataset
        assert entry.kind in ("texture", "object") and entry.components and entry.defect_types
        for defect in entry.defect_types.values():
            assert set(defect.regions) <= set(REGIONS)
            assert set(defect.shapes) <= set(SHAPES)
            assert set(defect.tones) <= set(TONES)
            assert SIZE_RANGE[0] <= defect.size[0] <= defect.size[1] <= SIZE_RANGE[1]
            assert defect.sizes() and set(defect.sizes()) <= set(SIZE_LADDER)
            assert defect.phrases and all(p == p.lower() for p in defect.phrases)


def test_real_defect_names() -> None:
    assert set(load_knowledge("bottle").defect_types) == {"broken_large", "broken_small", "contamination"}
    assert set(load_knowledge("carpet").defect_types) == {
        "color",
        "cut",
        "hole",
        "metal_contamination",
        "thread",
    }
    assert set(load_knowledge("screw", "mvtec_ad").defect_types) == {
        "manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top",
    }  # fmt: skip
    assert set(load_knowledge("pcb1", "visa").defect_types) == {"bent", "melt", "missing", "scratch"}
    assert "missing_pushpin" in load_knowledge("pushpins").defect_types
    assert load_knowledge("carpet").kind == "texture" and load_knowledge("bottle").kind == "object"


def test_all_knowledge_has_unique_names_across_files() -> None:
    merged = all_knowledge()
    assert len(merged) == sum(len(names) for names in EXPECTED.values())
    assert merged["brick"].dataset == "demo" and merged["washer"].kind == "object"


def test_duplicate_category_across_files_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    bottle = load_knowledge_file("mvtec_ad")["bottle"]
    monkeypatch.setattr(kb, "_load_file", lambda dataset: {"bottle": bottle})
    with pytest.raises(KnowledgeError, match=r"knowledge/visa\.yaml: categories\.bottle: also defined"):
        all_knowledge(("mvtec_ad", "visa"))


def test_unknown_category_falls_back_to_generic(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kka_synth.prompts.knowledge"):
        entry = load_knowledge("gear_wheel", "mvtec_ad")
    assert entry.name == "gear_wheel" and entry.dataset == "generic"
    assert set(entry.defect_types) == set(load_knowledge_file("generic")["generic"].defect_types)
    assert "gear_wheel" in caplog.text and "generic" in caplog.text


def test_dataset_lookup() -> None:
    assert load_knowledge("bottle", "mvtec_ad").dataset == "mvtec_ad"
    assert load_knowledge("bottle", "folder").dataset == "mvtec_ad"  # a layout without a file searches all
    assert load_knowledge("bottle", "visa").dataset == "generic"  # not in that file
    with pytest.raises(KnowledgeError, match="no knowledge file for dataset 'nope'"):
        knowledge_text("nope")


def test_digest_tracks_the_files() -> None:
    assert knowledge_digest() == knowledge_digest()
    assert knowledge_digest(("demo",)) != knowledge_digest(("demo", "generic"))


def _valid() -> dict:
    return {
        "dataset": "mine",
        "categories": {
            "part": {
                "kind": "object",
                "components": ["body"],
                "defect_types": {
                    "dent": {
                        "regions": ["top"],
                        "shapes": ["blob"],
                        "tones": ["darker"],
                        "size": [0.01, 0.05],
                        "phrases": ["small dent in the body"],
                    }
                },
            }
        },
    }


def _defect(data: dict) -> dict:
    return data["categories"]["part"]["defect_types"]["dent"]


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (
            lambda d: _defect(d).update(shapes=["chip"]),
            "categories.part.defect_types.dent.shapes",
            "unknown shape",
        ),
        (
            lambda d: _defect(d).update(tones=["red"]),
            "categories.part.defect_types.dent.tones",
            "unknown tone",
        ),
        (
            lambda d: _defect(d).update(regions=["middle"]),
            "defect_types.dent.regions",
            "unknown region 'middle'",
        ),
        (lambda d: _defect(d).update(size=[0.1, 0.9]), "defect_types.dent.size", "must satisfy"),
        (
            lambda d: _defect(d).update(size=[0.0006, 0.0009]),
            "defect_types.dent.size",
            "no value of the size ladder",
        ),
        (lambda d: _defect(d).update(size=0.1), "defect_types.dent.size", "must be [low, high]"),
        (lambda d: _defect(d).update(phrases=["Big Dent"]), "defect_types.dent.phrases", "lowercase words"),
        (lambda d: _defect(d).update(colour="red"), "defect_types.dent.colour", "unknown key"),
        (lambda d: _defect(d).pop("phrases"), "defect_types.dent.phrases", "missing"),
        (lambda d: d["categories"]["part"].update(kind="thing"), "categories.part.kind", "must be one of"),
        (
            lambda d: d["categories"]["part"].update(defect_types={}),
            "categories.part.defect_types",
            "non-empty",
        ),
        (lambda d: d.update(categories={}), "categories", "non-empty"),
        (lambda d: d.update(extra=1), "extra", "unknown key"),
    ],
)
def test_malformed_knowledge_names_file_and_key(mutate, key: str, message: str) -> None:
    data = _valid()
    assert parse_knowledge(yaml.safe_dump(data), "knowledge/mine.yaml")["part"].defect_types["dent"].sizes()
    mutate(data)
    with pytest.raises(KnowledgeError) as caught:
        parse_knowledge(yaml.safe_dump(data), "knowledge/mine.yaml")
    text = str(caught.value)
    assert text.startswith("knowledge/mine.yaml: ") and key in text and message in text
    assert "\n" not in text


def test_not_yaml_is_one_line_error() -> None:
    with pytest.raises(KnowledgeError, match=r"^knowledge/bad\.yaml: not valid YAML"):
        parse_knowledge("dataset: [unclosed", "knowledge/bad.yaml")

"""A user's own knowledge file (``data.knowledge``): found first, overrides shipped ones, errors name it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from kka_synth.prompts.knowledge import (
    KnowledgeError,
    all_knowledge,
    knowledge_digest,
    load_knowledge,
    load_knowledge_file,
    parse_user_knowledge,
    read_user_knowledge,
    user_knowledge_text,
)

GASKET = {
    "dataset": "my_gaskets",
    "negative_prompt": "blurry",
    "categories": {
        "gasket": {
            "kind": "object",
            "components": ["ring", "lip", "face"],
            "defect_types": {
                "tear": {
                    "regions": ["top", "bottom", "left", "right"],
                    "shapes": ["crack", "scratch"],
                    "tones": ["darker"],
                    "size": [0.002, 0.03],
                    "phrases": ["torn rubber at the lip", "split in the gasket ring"],
                },
                "bulge": {
                    "regions": ["center", "anywhere"],
                    "shapes": ["blob"],
                    "tones": ["brighter", "darker"],
                    "size": [0.005, 0.05],
                    "phrases": ["swollen bulge on the face", "raised blister of rubber"],
                },
            },
        },
        "bottle": {  # also a category of knowledge/mvtec_ad.yaml
            "kind": "object",
            "components": ["neck", "body"],
            "defect_types": {
                "bubble": {
                    "regions": ["center"],
                    "shapes": ["spot"],
                    "tones": ["brighter"],
                    "size": [0.001, 0.01],
                    "phrases": ["air bubble in the glass"],
                }
            },
        },
    },
}


def _write(folder: Path, data: dict, name: str = "my_knowledge.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    return _write(tmp_path, GASKET)


def test_user_category_is_found_first(user_file: Path) -> None:
    extra = read_user_knowledge(user_file)
    assert set(extra) == {"gasket", "bottle"}
    for dataset in (None, "mvtec_ad", "demo"):  # found whatever layout the run names ("folder" -> None)
        gasket = load_knowledge("gasket", dataset, extra=extra)
        assert gasket.dataset == "my_gaskets" and gasket.kind == "object"
        assert list(gasket.defect_types) == ["tear", "bulge"]
        assert gasket.defect_types["tear"].sizes() == (0.002, 0.003, 0.005, 0.01, 0.02, 0.03)
        assert gasket.components == ("ring", "lip", "face") and gasket.negative_prompt == "blurry"
    without = load_knowledge("gasket", None)
    assert without.dataset == "generic" and "tear" not in without.defect_types


def test_none_means_no_user_file() -> None:
    assert read_user_knowledge(None) == {}
    assert load_knowledge("washer", "demo", extra={}) == load_knowledge("washer", "demo")


def test_user_override_of_a_shipped_category_wins_and_is_logged(
    user_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    extra = read_user_knowledge(user_file)
    shipped = load_knowledge_file("mvtec_ad")["bottle"]
    with caplog.at_level(logging.INFO, logger="kka_synth.prompts.knowledge"):
        bottle = load_knowledge("bottle", "mvtec_ad", extra=extra)
    assert set(bottle.defect_types) == {"bubble"} and bottle.dataset == "my_gaskets"
    assert "broken_large" in shipped.defect_types  # the shipped entry itself is untouched
    assert "'bottle'" in caplog.text and "mvtec_ad.yaml" in caplog.text
    merged = all_knowledge(("mvtec_ad", "demo"), extra=extra)
    assert merged["bottle"] is extra["bottle"] and merged["gasket"] is extra["gasket"]
    assert merged["carpet"].dataset == "mvtec_ad" and len(merged) == 15 + 2 + 1


def test_user_generic_entry_replaces_the_fallback(tmp_path: Path) -> None:
    data = {"dataset": "mine", "categories": {"generic": GASKET["categories"]["gasket"]}}
    extra = read_user_knowledge(_write(tmp_path, data))
    entry = load_knowledge("o_ring", None, extra=extra)
    assert entry.name == "o_ring" and entry.dataset == "generic"  # still a fallback, asked as generic
    assert set(entry.defect_types) == {"tear", "bulge"}


def test_digest_follows_the_user_text(user_file: Path) -> None:
    text = user_knowledge_text(user_file)
    assert knowledge_digest(("demo",), None) == knowledge_digest(("demo",))
    assert knowledge_digest(("demo",), text) == knowledge_digest(("demo",), user_file.read_text())
    assert knowledge_digest(("demo",), text) != knowledge_digest(("demo",))
    assert knowledge_digest(("demo",), text) != knowledge_digest(("demo",), text.replace("lip", "rim"))


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (
            lambda d: d["categories"]["gasket"]["defect_types"]["tear"].update(shapes=["rip"]),
            "categories.gasket.defect_types.tear.shapes",
            "unknown shape 'rip'",
        ),
        (
            lambda d: d["categories"]["gasket"].pop("kind"),
            "categories.gasket.kind",
            "must be one of",
        ),
        (lambda d: d.update(dataset="generic"), "dataset", "reserved"),
        (lambda d: d.update(dataset="My Gaskets"), "dataset", "lowercase name"),
    ],
)
def test_malformed_user_file_is_one_line_naming_file_and_key(
    tmp_path: Path, mutate, key: str, message: str
) -> None:
    data = yaml.safe_load(yaml.safe_dump(GASKET))
    mutate(data)
    path = _write(tmp_path, data)
    for read in (read_user_knowledge, user_knowledge_text):
        with pytest.raises(KnowledgeError) as caught:
            read(path)
        text = str(caught.value)
        assert text.startswith(f"{path}: {key}: ") and message in text and "\n" not in text


def test_missing_or_broken_user_file(tmp_path: Path) -> None:
    with pytest.raises(KnowledgeError, match=r"nope\.yaml: no such knowledge file$"):
        read_user_knowledge(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: [unclosed")
    with pytest.raises(KnowledgeError, match=r"broken\.yaml: not valid YAML"):
        read_user_knowledge(broken)
    with pytest.raises(KnowledgeError, match=r"^mine: dataset: 'generic' is reserved"):
        parse_user_knowledge(yaml.safe_dump({**GASKET, "dataset": "generic"}), "mine")

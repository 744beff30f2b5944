"""The defect knowledge base: what defects each category shows, where, and what they look like.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
conditions its proposer on anomaly-related knowledge of each category. Here that knowledge is YAML package
data, one file per dataset family under ``prompts/knowledge/``:

.. code-block:: yaml

    dataset: mvtec_ad
    negative_prompt: blurry, cartoon     # optional; what diffusion renderers must avoid
    categories:
      bottle:
        kind: object                     # texture | object
        components: [rim, mouth, body]
        negative_prompt: label, text     # optional; added to the file's
        defect_types:
          broken_large:
            regions: [top, left]         # names of kka_synth.types.REGIONS
            shapes: [missing, crack]     # kka_synth.types.SHAPES
            tones: [darker]              # kka_synth.types.TONES
            size: [0.02, 0.12]           # share of the object's area, inside types.SIZE_RANGE
            phrases: [large chip broken off the rim]

Every file is validated on load; a mistake raises :class:`KnowledgeError` naming the file and the key.

A user describes a product of their own in a file of the same format (``data.knowledge``), read with
:func:`read_user_knowledge` and handed to :func:`load_knowledge` and :func:`all_knowledge` as ``extra``. Its
categories take precedence over the shipped ones: a new name adds a category, a shipped name replaces that
category's entry (logged), and a category named ``generic`` replaces the fallback defect list.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, TONES

logger = logging.getLogger(__name__)

KNOWLEDGE_FILES = ("mvtec_ad", "mvtec_loco", "visa", "demo", "generic")
"""Knowledge files shipped with the package (``prompts/knowledge/<name>.yaml``), in lookup order."""

GENERIC = "generic"
"""The file (and its single category) used for categories that no file describes."""

KINDS = ("texture", "object")

SIZE_LADDER = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.08,
    0.1,
    0.12,
    0.15,
    0.2,
    0.3,
    0.5,
)
"""The sizes a proposer writes (shares of the object's area); every defect's size range holds at least one."""

SEVERITY_LADDER = tuple(round(0.1 * step, 1) for step in range(1, 11))
"""The severities a proposer writes: 0.1, 0.2, ..., 1.0."""

MAX_PHRASE_WORDS = 8
"""Longest description phrase, in words."""

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_PHRASE = re.compile(r"^[a-z][a-z-]*( [a-z][a-z-]*)*$")
_DEFECT_KEYS = ("regions", "shapes", "tones", "size", "phrases")


class KnowledgeError(ValueError):
    """A knowledge file is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class DefectKnowledge:
    """What one defect type of a category looks like."""

    name: str
    regions: tuple[str, ...]
    shapes: tuple[str, ...]
    tones: tuple[str, ...]
    size: tuple[float, float]
    """Typical share of the object's area, (low, high)."""
    phrases: tuple[str, ...]
    """Short lowercase description phrases."""

    def sizes(self) -> tuple[float, ...]:
        """The values of :data:`SIZE_LADDER` inside this defect's size range."""
        low, high = self.size
        return tuple(value for value in SIZE_LADDER if low <= value <= high)


@dataclass(frozen=True)
class CategoryKnowledge:
    """What a category is made of and which defects it shows."""

    name: str
    kind: str
    """"texture" or "object"."""
    components: tuple[str, ...]
    defect_types: dict[str, DefectKnowledge]
    dataset: str = GENERIC
    """The knowledge file this entry came from (``generic`` for the fallback)."""
    negative_prompt: str = ""
    """What diffusion renderers must not draw: the file's negative prompt, then the category's own."""


def _fail(source: str, key: str, message: str) -> KnowledgeError:
    return KnowledgeError(f"{source}: {key}: {message}")


def _names(value: Any, allowed: tuple[str, ...] | None, source: str, key: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(source, key, f"must be a non-empty list of {what} names")
    for item in value:
        if not isinstance(item, str):
            raise _fail(source, key, f"{item!r} is not a {what} name")
        if allowed is not None and item not in allowed:
            raise _fail(source, key, f"unknown {what} {item!r} (known: {', '.join(allowed)})")
        if allowed is None and not _NAME.match(item):
            raise _fail(source, key, f"{what} {item!r} must be lowercase letters, digits and underscores")
    if len(set(value)) != len(value):
        raise _fail(source, key, "lists a name twice")
    return tuple(value)


def _size(value: Any, source: str, key: str) -> tuple[float, float]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise _fail(source, key, f"must be [low, high], got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not SIZE_RANGE[0] <= low <= high <= SIZE_RANGE[1]:
        raise _fail(
            source, key, f"[{low}, {high}] must satisfy {SIZE_RANGE[0]} <= low <= high <= {SIZE_RANGE[1]}"
        )
    if not any(low <= step <= high for step in SIZE_LADDER):
        raise _fail(source, key, f"[{low}, {high}] holds no value of the size ladder {SIZE_LADDER}")
    return low, high


def _phrases(value: Any, source: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(source, key, "must be a non-empty list of phrases")
    for phrase in value:
        if not isinstance(phrase, str) or not _PHRASE.match(phrase):
            raise _fail(
                source, key, f"{phrase!r} must be lowercase words (a-z and -) separated by single spaces"
            )
        if len(phrase.split()) > MAX_PHRASE_WORDS:
            raise _fail(source, key, f"{phrase!r} is longer than {MAX_PHRASE_WORDS} words")
    return tuple(value)


def _defect(name: str, data: Any, source: str, key: str) -> DefectKnowledge:
    if not _NAME.match(name):
        raise _fail(source, key, "a defect type name must be lowercase letters, digits and underscores")
    if not isinstance(data, dict):
        raise _fail(source, key, "must be a mapping")
    unknown = sorted(set(data) - set(_DEFECT_KEYS))
    if unknown:
        raise _fail(source, f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(_DEFECT_KEYS)})")
    missing = [k for k in _DEFECT_KEYS if k not in data]
    if missing:
        raise _fail(source, f"{key}.{missing[0]}", "missing")
    return DefectKnowledge(
        name=name,
        regions=_names(data["regions"], tuple(REGIONS), source, f"{key}.regions", "region"),
        shapes=_names(data["shapes"], SHAPES, source, f"{key}.shapes", "shape"),
        tones=_names(data["tones"], TONES, source, f"{key}.tones", "tone"),
        size=_size(data["size"], source, f"{key}.size"),
        phrases=_phrases(data["phrases"], source, f"{key}.phrases"),
    )


def _negative(value: Any, source: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _fail(source, key, f"must be a string, got {value!r}")
    return value.strip()


def _category(name: str, data: Any, source: str, dataset: str, negative: str) -> CategoryKnowledge:
    key = f"categories.{name}"
    if not _NAME.match(name):
        raise _fail(source, key, "a category name must be lowercase letters, digits and underscores")
    if not isinstance(data, dict):
        raise _fail(source, key, "must be a mapping")
    allowed = ("kind", "components", "defect_types", "negative_prompt")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise _fail(source, f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(allowed)})")
    if data.get("kind") not in KINDS:
        raise _fail(source, f"{key}.kind", f"must be one of {', '.join(KINDS)}, got {data.get('kind')!r}")
    components = _names(data.get("components"), None, source, f"{key}.components", "component")
    defects = data.get("defect_types")
    if not isinstance(defects, dict) or not defects:
        raise _fail(source, f"{key}.defect_types", "must be a non-empty mapping of defect types")
    return CategoryKnowledge(
        name=name,
        kind=data["kind"],
        components=components,
        defect_types={
            str(d): _defect(str(d), spec, source, f"{key}.defect_types.{d}") for d, spec in defects.items()
        },
        dataset=dataset,
        negative_prompt=", ".join(
            part
            for part in (negative, _negative(data.get("negative_prompt"), source, f"{key}.negative_prompt"))
            if part
        ),
    )


def parse_knowledge(text: str, source: str) -> dict[str, CategoryKnowledge]:
    """Validate the YAML text of one knowledge file; ``source`` names it in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KnowledgeError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise KnowledgeError(f"{source}: must hold a mapping with keys dataset and categories")
    unknown = sorted(set(data) - {"dataset", "categories", "negative_prompt"})
    if unknown:
        raise _fail(source, unknown[0], "unknown key (known: dataset, categories, negative_prompt)")
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or not _NAME.match(dataset):
        raise _fail(source, "dataset", f"must be a lowercase name, got {dataset!r}")
    categories = data.get("categories")
    if not isinstance(categories, dict) or not categories:
        raise _fail(source, "categories", "must be a non-empty mapping of categories")
    negative = _negative(data.get("negative_prompt"), source, "negative_prompt")
    return {
        str(name): _category(str(name), entry, source, dataset, negative)
        for name, entry in categories.items()
    }


def knowledge_text(dataset: str) -> str:
    """The raw YAML of a shipped knowledge file."""
    if dataset not in KNOWLEDGE_FILES:
        raise KnowledgeError(
            f"no knowledge file for dataset {dataset!r} (known: {', '.join(KNOWLEDGE_FILES)})"
        )
    return resources.files("kka_synth.prompts").joinpath("knowledge", f"{dataset}.yaml").read_text("utf-8")


@functools.cache
def _load_file(dataset: str) -> dict[str, CategoryKnowledge]:
    knowledge = parse_knowledge(knowledge_text(dataset), f"knowledge/{dataset}.yaml")
    wrong = next((k for k in knowledge.values() if k.dataset != dataset), None)
    if wrong is not None:
        raise _fail(f"knowledge/{dataset}.yaml", "dataset", f"says {wrong.dataset!r}, expected {dataset!r}")
    return knowledge


def load_knowledge_file(dataset: str) -> dict[str, CategoryKnowledge]:
    """All categories of one shipped knowledge file, by name."""
    return dict(_load_file(dataset))


def parse_user_knowledge(text: str, source: str) -> dict[str, CategoryKnowledge]:
    """Validate the YAML text of a user's knowledge file; ``source`` names it in errors.

    The format is that of the shipped files; only ``dataset: generic`` is refused, since that name marks
    categories that fell back to the generic defect list.
    """
    knowledge = parse_knowledge(text, source)
    if next(iter(knowledge.values())).dataset == GENERIC:
        raise _fail(source, "dataset", f"{GENERIC!r} is reserved for the fallback list; name your product")
    return knowledge


def user_knowledge_text(path: str | Path) -> str:
    """The YAML text of the user's knowledge file at ``path``, validated (errors name the file and key)."""
    path = Path(path)
    if not path.is_file():
        raise KnowledgeError(f"{path}: no such knowledge file")
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KnowledgeError(f"{path}: cannot be read ({type(error).__name__})") from None
    parse_user_knowledge(text, str(path))
    return text


def read_user_knowledge(path: str | Path | None) -> dict[str, CategoryKnowledge]:
    """The categories of the user's knowledge file at ``path`` (``data.knowledge``); ``{}`` for None."""
    if path is None:
        return {}
    return parse_user_knowledge(user_knowledge_text(path), str(path))


def _shipped(category: str, datasets: tuple[str, ...]) -> CategoryKnowledge | None:
    """The first shipped entry of ``category`` among ``datasets``' files, or None."""
    for dataset in datasets:
        entry = _load_file(dataset).get(category)
        if entry is not None:
            return entry
    return None


def _note_override(entry: CategoryKnowledge, shipped: CategoryKnowledge) -> None:
    logger.info(
        "category %r: the user's knowledge (dataset %s) replaces knowledge/%s.yaml",
        entry.name,
        entry.dataset,
        shipped.dataset,
    )


def all_knowledge(
    datasets: tuple[str, ...] = KNOWLEDGE_FILES, extra: Mapping[str, CategoryKnowledge] | None = None
) -> dict[str, CategoryKnowledge]:
    """The categories of several knowledge files, then ``extra`` (the user's: :func:`read_user_knowledge`).

    A name in two shipped files raises :class:`KnowledgeError`; a name of ``extra`` replaces a shipped one.
    """
    merged: dict[str, CategoryKnowledge] = {}
    for dataset in datasets:
        for name, entry in _load_file(dataset).items():
            if name in merged:
                raise KnowledgeError(
                    f"knowledge/{dataset}.yaml: categories.{name}: "
                    f"also defined in knowledge/{merged[name].dataset}.yaml"
                )
            merged[name] = entry
    for name, entry in (extra or {}).items():
        if name in merged:
            _note_override(entry, merged[name])
        merged[name] = entry
    return merged


def knowledge_digest(datasets: tuple[str, ...] = KNOWLEDGE_FILES, extra_text: str | None = None) -> str:
    """A SHA-256 of the named knowledge files' bytes and the user's file text (changes with either)."""
    digest = hashlib.sha256()
    for dataset in datasets:
        digest.update(dataset.encode())
        digest.update(knowledge_text(dataset).encode())
    if extra_text is not None:
        digest.update(b"\0user\0")
        digest.update(extra_text.encode())
    return digest.hexdigest()


def load_knowledge(
    category: str, dataset: str | None = None, extra: Mapping[str, CategoryKnowledge] | None = None
) -> CategoryKnowledge:
    """The knowledge of ``category``: from ``extra`` first, else ``dataset``'s file or, when None, every file.

    ``extra`` holds the user's categories (:func:`read_user_knowledge`); one that shares a shipped category's
    name replaces it, with a logged note. A category that no file describes gets the generic defect list (the
    user's ``generic`` entry when ``extra`` has one) under its own name, with a logged note. ``dataset`` may
    also name a layout without its own file (such as ``folder``): every file is searched.
    """
    extra = extra or {}
    files = (dataset,) if dataset in KNOWLEDGE_FILES else KNOWLEDGE_FILES
    if category in extra:
        shipped = _shipped(category, files)
        if shipped is not None:
            _note_override(extra[category], shipped)
        return extra[category]
    shipped = _shipped(category, files)
    if shipped is not None:
        return shipped
    generic = extra.get(GENERIC) or _load_file(GENERIC)[GENERIC]
    where = f"knowledge/{dataset}.yaml" if dataset in KNOWLEDGE_FILES else "any knowledge file"
    logger.info("category %r is not in %s; using the generic defect list", category, where)
    return CategoryKnowledge(
        name=category,
        kind=generic.kind,
        components=generic.components,
        defect_types=dict(generic.defect_types),
        dataset=GENERIC,
    )

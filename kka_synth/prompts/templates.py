"""Prompt templates for the proposers, kept as YAML package data (``prompts/templates.yaml``).

The chat templates ask an instruct LLM for one defect spec as JSON, given the category's anomaly-related
knowledge, as the KKA loop does ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from
LLMs", arXiv 2502.14880). Templates use :class:`string.Template` syntax (``${field}``), so the JSON braces
inside them need no escaping.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from string import Template

import yaml

from kka_synth.prompts.knowledge import SEVERITY_LADDER, CategoryKnowledge
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, SPEC_FIELDS, TONES


class TemplateError(ValueError):
    """A template is unknown, malformed, or was rendered without one of its fields."""


@functools.lru_cache(maxsize=1)
def _templates() -> dict[str, Template]:
    source = "prompts/templates.yaml"
    text = resources.files("kka_synth.prompts").joinpath("templates.yaml").read_text("utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise TemplateError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{source}: must hold a mapping of template names to strings")
    templates: dict[str, Template] = {}
    for name, body in data.items():
        if not isinstance(body, str):
            raise TemplateError(f"{source}: {name}: must be a string")
        template = Template(body)
        if not template.is_valid():
            raise TemplateError(f"{source}: {name}: has a malformed ${{field}} placeholder")
        templates[str(name)] = template
    return templates


def template_names() -> list[str]:
    """The names of the shipped templates."""
    return sorted(_templates())


def template_fields(name: str) -> list[str]:
    """The fields a template needs."""
    return sorted(set(_template(name).get_identifiers()))


def _template(name: str) -> Template:
    templates = _templates()
    if name not in templates:
        raise TemplateError(f"unknown prompt template {name!r} (known: {', '.join(sorted(templates))})")
    return templates[name]


def render_prompt(name: str, /, **fields: object) -> str:
    """Fill template ``name`` with ``fields``; a missing field raises :class:`TemplateError`."""
    template = _template(name)
    missing = sorted(set(template.get_identifiers()) - set(fields))
    if missing:
        raise TemplateError(f"prompt template {name!r} needs field {missing[0]!r}")
    return template.substitute({key: str(value) for key, value in fields.items()})


def _listing(values: tuple[str, ...] | list[str]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def schema_text() -> str:
    """The description of a spec's JSON fields, as given to chat LLMs."""
    return render_prompt(
        "chat_schema",
        regions=_listing(list(REGIONS)),
        size_min=SIZE_RANGE[0],
        size_max=SIZE_RANGE[1],
        shapes=_listing(SHAPES),
        tones=_listing(TONES),
    ).rstrip()


def example_reply(knowledge: CategoryKnowledge) -> str:
    """A well-formed reply for ``knowledge``'s first defect type, in :data:`SPEC_FIELDS` order."""
    defect = next(iter(knowledge.defect_types.values()))
    values = {
        "defect_type": defect.name,
        "description": defect.phrases[0],
        "region": defect.regions[0],
        "size": defect.sizes()[0],
        "shape": defect.shapes[0],
        "tone": defect.tones[0],
        "severity": SEVERITY_LADDER[2],
    }
    return json.dumps({key: values[key] for key in SPEC_FIELDS})


def knowledge_lines(knowledge: CategoryKnowledge) -> str:
    """One line per defect type of ``knowledge``."""
    return "\n".join(
        render_prompt(
            "chat_defect",
            name=defect.name,
            regions=", ".join(defect.regions),
            shapes=", ".join(defect.shapes),
            tones=", ".join(defect.tones),
            size_min=defect.size[0],
            size_max=defect.size[1],
            phrases="; ".join(defect.phrases),
        )
        for defect in knowledge.defect_types.values()
    )


def chat_messages(
    knowledge: CategoryKnowledge,
    examples: list[str] | None = None,
    constraints: list[str] | None = None,
    caption: str | None = None,
) -> list[dict[str, str]]:
    """System and user messages asking an instruct LLM for one spec of ``knowledge.name``.

    ``examples`` are earlier spec texts shown as few-shot hints; ``constraints`` are extra instructions;
    ``caption`` describes a normal image of the category (from a vision-language model).
    """
    examples_block = (
        "\n" + render_prompt("chat_examples", examples="\n".join(f"  {text.strip()}" for text in examples))
        if examples
        else ""
    )
    constraints_block = (
        "\n"
        + render_prompt(
            "chat_constraints", constraints="\n".join(f"- {line.strip()}" for line in constraints)
        )
        if constraints
        else ""
    )
    caption_block = (
        "\n" + render_prompt("chat_caption", category=knowledge.name, caption=caption.strip())
        if caption
        else ""
    )
    system = render_prompt("chat_system", schema=schema_text(), example=example_reply(knowledge))
    user = render_prompt(
        "chat_user",
        category=knowledge.name,
        kind=knowledge.kind,
        components=", ".join(knowledge.components),
        knowledge=knowledge_lines(knowledge),
        examples=caption_block + examples_block,
        constraints=constraints_block,
    )
    return [{"role": "system", "content": system.rstrip()}, {"role": "user", "content": user.rstrip()}]

"""The prompt set in `kka-synth chat`: constraint edits, and the set loaded, listed and saved.

The constraint tools of :class:`~kka_synth.agents.chat.ChatSession` take a field name and a value as typed
("exclude types", "chips", "2%", "top left"). The functions here turn them into the names a
:class:`~kka_synth.agents.constraints.Constraints` holds, checked against the knowledge base (a defect type
must be one the category has) and the fixed region, shape and tone names, and refuse anything else with a
one-line :class:`~kka_synth.agents.chat_values.ToolError`. An edit that would leave a category nothing to
propose is refused before it changes the :class:`~kka_synth.agents.constraints.PromptSet`. Each function
that changes the set returns the reply the tool gives.

A scope is a category name or :data:`~kka_synth.agents.constraints.ALL` (every category).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kka_synth.agents.chat_values import (
    ToolError,
    canonical_name,
    first_line,
    match_names,
    parse_fraction,
    snake_name,
)
from kka_synth.agents.constraints import ALL, FIELDS, NUMBER_FIELDS, Constraints, PromptSet
from kka_synth.prompts.knowledge import CategoryKnowledge
from kka_synth.types import REGIONS, SHAPES, TONES

logger = logging.getLogger(__name__)

TYPE_FIELDS = ("exclude_types", "only_types")
"""Fields whose values are defect type names of the knowledge base."""


def scope_label(scope: str) -> str:
    """How a reply names ``scope``: the category, or "all categories"."""
    return "all categories" if scope == ALL else scope


def constraint_field(field: str) -> str:
    """The constraint field ``field`` names ("Exclude types" -> exclude_types).

    Raises:
        ToolError: no constraint field has that name.
    """
    name = snake_name(field)
    if name not in FIELDS:
        raise ToolError(f"unknown constraint field {field!r} (known: {', '.join(FIELDS)})")
    return name


def constraint_values(field: str, value: Any, types: Callable[[], list[str]], label: str) -> list[Any]:
    """The values ``value`` stands for in ``field`` (one, or every defect type a type name matches).

    Args:
        field: a constraint field (:func:`constraint_field`).
        value: the value as typed: a number or "2%" for number fields, a name, or a note's text.
        types: gives the scope's defect type names; called only for the type fields.
        label: the scope as replies name it (:func:`scope_label`).

    Raises:
        ToolError: the value is empty, not a number where one is needed, or names nothing known.
    """
    if field in NUMBER_FIELDS:
        return [parse_fraction(value, field)]
    text = str(value).strip()
    if not text:
        raise ToolError(f"{field} needs a value")
    if field == "notes":
        return [text]
    if field in TYPE_FIELDS:
        known = types()
        found = match_names(text, known)
        if not found:
            raise ToolError(f"{label} has no defect type like {text!r} (known: {', '.join(known)})")
        return found
    allowed = {"regions": tuple(REGIONS), "shapes": SHAPES, "tones": TONES}[field.removeprefix("exclude_")]
    found = canonical_name(field, text)
    if found not in allowed:
        raise ToolError(f"{field}: {text!r} is not one of {', '.join(allowed)}")
    return [found]


def held_values(field: str, value: str, held: list[str]) -> list[str]:
    """The values of list field ``field`` now ``held`` that ``value`` names (empty when none).

    Type names match as :func:`~kka_synth.agents.chat_values.match_names` does; a note matches exactly, else
    every note that contains ``value`` (ignoring case); regions, shapes and tones match by canonical name.
    """
    if field in TYPE_FIELDS:
        return match_names(value, held)
    if field == "notes":
        return [v for v in held if v == value.strip()] or [v for v in held if value.lower() in v.lower()]
    return [v for v in held if v == canonical_name(field, value)]


def constraint_summary(prompt_set: PromptSet, scope: str, merged: bool = True) -> str:
    """The constraints of ``scope`` in one line, titled.

    Args:
        prompt_set: the prompt set holding the constraints.
        scope: a category or :data:`~kka_synth.agents.constraints.ALL`.
        merged: for a category, include the constraints for every category (what a run applies to it).
    """
    if scope != ALL and merged:
        lines = prompt_set.for_category(scope).lines()
        title = f"constraints for {scope} (with those for all categories)"
    else:
        lines = prompt_set.constraints.get(scope, Constraints()).lines()
        title = f"constraints for {scope_label(scope)}"
    return f"{title}: " + (" ".join(line.rstrip(".") + "." for line in lines) if lines else "none")


def check_satisfiable(
    prompt_set: PromptSet,
    scope: str,
    updated: Constraints,
    categories: list[str],
    knowledge_of: Callable[[str], CategoryKnowledge],
) -> None:
    """Check that replacing the constraints of ``scope`` with ``updated`` leaves each category something.

    Args:
        prompt_set: the prompt set before the edit.
        scope: the scope being edited.
        updated: its constraints after the edit.
        categories: the categories the edit reaches (every category for ``ALL``, else ``[scope]``).
        knowledge_of: gives a category's knowledge.

    Raises:
        ConstraintError: the merged constraints leave a category no defect type, region, shape or tone.
    """
    for name in categories:
        mine = updated if scope == name else prompt_set.constraints.get(name, Constraints())
        every = updated if scope == ALL else prompt_set.constraints.get(ALL, Constraints())
        every.merged(mine).narrow(knowledge_of(name))


def add_values(
    prompt_set: PromptSet,
    scope: str,
    field: str,
    values: list[Any],
    categories: list[str],
    knowledge_of: Callable[[str], CategoryKnowledge],
) -> str:
    """Add ``values`` (:func:`constraint_values`) to ``field`` of ``scope``, once the result is satisfiable.

    Args:
        prompt_set: the prompt set to change.
        scope: a category or :data:`~kka_synth.agents.constraints.ALL`.
        field: a constraint field.
        values: the values to add.
        categories: the categories the edit reaches (:func:`check_satisfiable`).
        knowledge_of: gives a category's knowledge.

    Returns:
        The reply: what was added, then the scope's constraints.

    Raises:
        ConstraintError: a value is out of range, or the edit leaves a category nothing to propose; the
            prompt set is then unchanged.
    """
    updated = prompt_set.constraints.get(scope, Constraints())
    for item in values:
        updated = updated.add(field, item)
    check_satisfiable(prompt_set, scope, updated, categories, knowledge_of)
    prompt_set.constraints[scope] = updated
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"{scope_label(scope)}: {field} += {shown}\n{constraint_summary(prompt_set, scope)}"


def remove_values(prompt_set: PromptSet, scope: str, field: str, value: str | None) -> str:
    """Remove from ``field`` of ``scope`` the values ``value`` names, or the whole field.

    Args:
        prompt_set: the prompt set to change.
        scope: a category or :data:`~kka_synth.agents.constraints.ALL`.
        field: a constraint field.
        value: for list fields, what to remove (:func:`held_values`); None (and any value of a number
            field) removes the whole field.

    Returns:
        The reply: what was removed, then the scope's constraints.

    Raises:
        ToolError: the field is not set, or holds nothing ``value`` names.
    """
    current = prompt_set.constraints.get(scope, Constraints())
    label = scope_label(scope)
    held = getattr(current, field)
    if held in (None, []):
        raise ToolError(f"{label} has no {field} constraint ({constraint_summary(prompt_set, scope)})")
    if value is None or field in NUMBER_FIELDS:
        updated = current.remove(field)
        removed = held
    else:
        removed = held_values(field, str(value), held)
        if not removed:
            raise ToolError(f"{field} of {label} holds no {value!r} (it holds {', '.join(held)})")
        updated = current
        for item in removed:
            updated = updated.remove(field, item)
    prompt_set.constraints[scope] = updated
    shown = ", ".join(removed) if isinstance(removed, list) else f"{removed:g}"
    return f"{label}: removed {field} {shown}\n{constraint_summary(prompt_set, scope)}"


def prompt_set_listing(prompt_set: PromptSet, category: str | None) -> str:
    """The constraints and approved examples that apply to ``category``, or every scope's own when None."""
    if category is not None:
        examples = prompt_set.examples.get(category, [])
        lines = [constraint_summary(prompt_set, category), f"approved examples: {len(examples)}"]
        return "\n".join(lines + [f"  {text}" for text in examples])
    scopes = [s for s, c in sorted(prompt_set.constraints.items()) if not c.empty]
    lines = [constraint_summary(prompt_set, scope, merged=False) for scope in scopes]
    lines += [f"{n}: {len(t)} approved example(s)" for n, t in sorted(prompt_set.examples.items()) if t]
    return "\n".join(lines) if lines else "no constraints and no approved examples yet"


def load_prompt_set(path: Path, dataset: str) -> PromptSet:
    """The prompt set saved at ``path``, or an empty one for ``dataset`` when there is no such file.

    A saved set made for another dataset is loaded with a warning (its category names may not match).
    """
    if not path.is_file():
        return PromptSet(dataset=dataset)
    prompt_set = PromptSet.load(path)
    if prompt_set.dataset not in (None, dataset):
        logger.warning(
            "prompt set %s was made for dataset %r, the config uses %r", path, prompt_set.dataset, dataset
        )
    return prompt_set


def save_prompt_set(prompt_set: PromptSet, target: Path, dataset: str) -> str:
    """Write ``prompt_set`` to ``target`` (stamped with ``dataset`` when it has none) and say what was saved.

    Raises:
        ToolError: the file cannot be written.
    """
    if prompt_set.dataset is None:
        prompt_set.dataset = dataset
    try:
        prompt_set.save(target)
    except OSError as error:
        raise ToolError(f"cannot write {target}: {first_line(error)}") from None
    scopes = sum(not c.empty for c in prompt_set.constraints.values())
    examples = sum(len(t) for t in prompt_set.examples.values())
    return (
        f"saved {scopes} constraint set(s) and {examples} approved example(s) to {target}\n"
        f"use it with: kka-synth run --prompts {target}"
    )


__all__ = [
    "TYPE_FIELDS",
    "add_values",
    "check_satisfiable",
    "constraint_field",
    "constraint_summary",
    "constraint_values",
    "held_values",
    "load_prompt_set",
    "prompt_set_listing",
    "remove_values",
    "save_prompt_set",
    "scope_label",
]

"""Values of `kka-synth chat` tools: reading what a user or an LLM typed, writing specs and knowledge as text.

A chat tool takes strings and numbers from an utterance or a tool call. The helpers here read them the
forgiving way a conversation needs (plural and singular names, a unique prefix of a category, "top left"
for top-left, "2%" for 0.02, "dark" for darker) and refuse anything else with a one-line
:class:`ToolError`. The writers turn proposals and knowledge-base entries into the lines a reply shows.
None of them keeps state or touches a file; :class:`~kka_synth.agents.chat.ChatSession` and
:class:`~kka_synth.agents.chat_intent.IntentChat` both use them.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from kka_synth.agents.corpus import spec_text
from kka_synth.prompts.knowledge import CategoryKnowledge
from kka_synth.types import SHAPES, SPEC_FIELDS, Proposal

MAX_SPECS = 16
"""Most specs one propose or preview call makes (a chat shows a few, a run makes many)."""
ALL_WORDS = ("*", "all", "every", "everything", "all categories", "all products", "every category")
"""What a user may type for "every category"."""
REGION_ALIASES = {"centre": "center", "middle": "center", "upper": "top", "lower": "bottom"}
"""Words of a region name and the known word each stands for."""
TONE_ALIASES = {
    "dark": "darker",
    "bright": "brighter",
    "light": "brighter",
    "lighter": "brighter",
    "color": "colour",
    "coloured": "colour",
    "colored": "colour",
    "discoloured": "colour",
    "discolored": "colour",
}
"""Tone words and the known tone each stands for."""


class ToolError(ValueError):
    """Bad tool input; one line, shown to the user as ``error: ...``."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def singulars(word: str) -> list[str]:
    """``word`` and the singular forms it may stand for ("stains" -> stains, stain)."""
    forms = [word]
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    if word.endswith("s") and len(word) > 2:
        forms.append(word[:-1])
    return list(dict.fromkeys(forms))


def snake_name(text: str) -> str:
    """Lowercase, with spaces and hyphens as underscores ("Edge chips" -> edge_chips)."""
    return re.sub(r"[\s\-]+", "_", str(text).strip().lower())


def parse_fraction(value: Any, what: str) -> float:
    """A number, with "2%" (or "2 percent") read as 0.02.

    Args:
        value: a number or its text.
        what: the name of the value, for the error message.

    Raises:
        ToolError: ``value`` is not a number.
    """
    text = str(value).strip().lower()
    percent = text.endswith("%") or text.endswith("percent")
    text = text.rstrip("%").removesuffix("percent").strip()
    try:
        number = float(text)
    except ValueError:
        raise ToolError(f"{what} must be a number such as 0.02 or 2%, got {value!r}") from None
    return number / 100.0 if percent else number


def parse_count(n: Any, what: str = "n") -> int:
    """A whole number from 1 to :data:`MAX_SPECS`; digit strings ("3") are read as numbers.

    Raises:
        ToolError: ``n`` is not a whole number in that range (booleans are refused).
    """
    if isinstance(n, str) and n.strip().isdigit():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SPECS:
        raise ToolError(f"{what} must be a whole number from 1 to {MAX_SPECS}, got {n!r}")
    return n


def parse_numbers(numbers: Any, count: int, category: str) -> list[int]:
    """Proposal numbers from 1 to ``count``, in the order given; digit strings are read as numbers.

    Raises:
        ToolError: ``numbers`` is not a non-empty list, or holds something that is not such a number.
    """
    if not isinstance(numbers, (list, tuple)) or not numbers:
        raise ToolError(f"numbers must be a non-empty list of proposal numbers 1-{count}")
    chosen = []
    for number in numbers:
        if isinstance(number, str) and number.strip().isdigit():
            number = int(number)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= count:
            raise ToolError(f"no proposal {number!r} for {category}; the last ones are 1-{count}")
        chosen.append(number)
    return chosen


def match_category(category: str | None, known: list[str]) -> str:
    """The name in ``known`` that ``category`` names: exact, case-insensitive, plural or a unique prefix.

    Raises:
        ToolError: ``category`` is empty, unknown, or a prefix of several names.
    """
    listing = ", ".join(known)
    if category is None or not str(category).strip():
        raise ToolError(f"no category in focus; name one (known: {listing})")
    wanted = snake_name(category)
    for form in singulars(wanted):
        exact = [n for n in known if n.lower() == form]
        if exact:
            return exact[0]
    prefixed = [n for n in known if n.lower().startswith(wanted)]
    if len(prefixed) == 1:
        return prefixed[0]
    if prefixed:
        raise ToolError(f"{category!r} matches several categories: {', '.join(prefixed)}")
    raise ToolError(f"unknown category {category!r} (known: {listing})")


def canonical_name(field: str, value: str) -> str:
    """A region, shape or tone name in its known spelling ("top left" -> top-left, "blobs" -> blob).

    Args:
        field: the constraint field the value belongs to (regions, shapes, tones or their exclude_ forms).
        value: the name as typed. A name that matches nothing known comes back normalised, not refused;
            the caller checks it against the allowed names.
    """
    text = re.sub(r"[\s_]+", "-", value.strip().lower())
    kind = field.removeprefix("exclude_")
    if kind == "regions":
        return "-".join(REGION_ALIASES.get(part, part) for part in text.split("-"))
    if kind == "tones":
        return TONE_ALIASES.get(text, text)
    return next((form for form in singulars(text) if form in SHAPES), text)


def match_names(value: str, names: list[str]) -> list[str]:
    """Names ``value`` stands for: those it (or its singular) names or is a word of, else those holding it."""
    wanted = snake_name(value)
    forms = singulars(wanted)
    found = [n for n in names if n in forms or any(f in n.split("_") for f in forms)]
    if found:
        return found
    return [n for n in names if any(len(f) >= 3 and f in n for f in forms)]


def describe_spec(proposal: Proposal) -> str:
    """One readable line for a parsed proposal: type, region, size, shape, tone, severity, description."""
    spec = proposal.spec
    if spec is None:
        return f"(rejected: {proposal.error})"
    region = spec.region_name() or "[" + ", ".join(f"{v:.2f}" for v in spec.region) + "]"
    return (
        f"{spec.defect_type} at {region}, size {spec.size * 100:g}% of the object, "
        f'{spec.shape}, {spec.tone}, severity {spec.severity:g}: "{spec.description}"'
    )


def proposals_reply(category: str, kept: list[Proposal], n: int, rejected: Counter[str], rounds: int) -> str:
    """The reply to a propose call: the numbered specs, a shortfall, then the rejected replies by reason.

    Args:
        category: the category proposed for.
        kept: the parsed proposals, in the order they are numbered.
        n: how many were asked for.
        rejected: rejected replies counted by reason.
        rounds: how many times the proposer was asked.
    """
    lines = [f"{len(kept)} proposal(s) for {category}:"]
    lines += [f"{k}. {describe_spec(p)}" for k, p in enumerate(kept, 1)]
    if len(kept) < n:
        lines.append(f"only {len(kept)} of {n} parsed after {rounds} rounds")
    total = sum(rejected.values())
    reasons = ", ".join(f"{r} {c}" for r, c in sorted(rejected.items(), key=lambda rc: (-rc[1], rc[0])))
    lines.append(f"rejected replies: {total} ({reasons})" if total else "rejected replies: 0")
    return "\n".join(lines)


def knowledge_lines(category: str, knowledge: CategoryKnowledge) -> list[str]:
    """A category's kind and components, then one line per defect type with the values it may take."""
    lines = [f"{category}: {knowledge.kind}, components: {', '.join(knowledge.components)}"]
    for defect in knowledge.defect_types.values():
        low, high = defect.size
        lines.append(
            f"- {defect.name}: regions {', '.join(defect.regions)}; shapes {', '.join(defect.shapes)}; "
            f"tones {', '.join(defect.tones)}; size {low * 100:g}-{high * 100:g}%; "
            f"e.g. {'; '.join(defect.phrases[:2])}"
        )
    return lines


def example_text(proposal: Proposal) -> str:
    """The canonical JSON text of a parsed proposal, as approved examples store it.

    Raises:
        ToolError: the proposal was rejected (it has no spec).
    """
    spec = proposal.spec
    if spec is None:
        raise ToolError(f"a rejected proposal ({proposal.error}) cannot be an example")
    data = spec.to_dict()
    data["region"] = spec.region_name() or data["region"]
    return spec_text({key: data[key] for key in SPEC_FIELDS})


__all__ = [
    "ALL_WORDS",
    "MAX_SPECS",
    "REGION_ALIASES",
    "TONE_ALIASES",
    "ToolError",
    "canonical_name",
    "describe_spec",
    "example_text",
    "first_line",
    "knowledge_lines",
    "match_category",
    "match_names",
    "parse_count",
    "parse_fraction",
    "parse_numbers",
    "proposals_reply",
    "singulars",
    "snake_name",
]

"""What an LLM is told besides the prompt: the feedback after a failed reply, and the JSON schema of a spec.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880) an
instruct LLM writes the anomaly descriptions. Two things steer it beyond the request itself:

- :func:`retry_message`, the user message sent back after a reply that :func:`~kka_synth.agents.parsing.
  parse_reply` rejected: what was wrong (the parser's detail) and the values the field at fault may take.
  Its sentences are the ``chat_retry`` and ``retry_*`` templates of ``prompts/templates.yaml``;
- :func:`spec_json_schema`, the JSON Schema of one spec of a category, for vLLM guided decoding and OpenAI
  structured output (``proposer.constrained``), so that a compliant backend can only write valid specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kka_synth.agents.parsing import REASONS
from kka_synth.prompts.templates import render_prompt
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, SPEC_FIELDS, TONES

if TYPE_CHECKING:
    from kka_synth.agents.base import ProposalContext
    from kka_synth.prompts.knowledge import CategoryKnowledge


def _listing(values: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f'"{value}"' for value in values)


def _constraint_lines(context: ProposalContext) -> list[str]:
    """The context's constraints as instruction lines ([] when it has none to show)."""
    constraints = context.constraints
    lines = constraints.lines() if hasattr(constraints, "lines") else constraints
    return [str(line).strip() for line in lines] if isinstance(lines, list) else []


def retry_message(reason: str, detail: str, context: ProposalContext) -> str:
    """The user message sent back to the model after a failed reply (template ``chat_retry``).

    It says what was wrong (``detail``, or the ``retry_default_<reason>`` sentence) and what is allowed
    (``retry_allowed_<reason>``), e.g. the category's defect types for ``unknown_type``. Reasons starting with
    ``constraint`` share the ``retry_*_constraint`` templates, which list the context's constraints.

    Raises:
        ValueError: a reason code that :func:`~kka_synth.agents.parsing.parse_reply` never returns.
    """
    if reason not in REASONS and not reason.startswith("constraint"):
        raise ValueError(f"unknown parse reason {reason!r} (known: {', '.join(REASONS)}, constraint_*)")
    if reason in REASONS:
        fields = {
            "category": context.category,
            "types": _listing(list(context.knowledge.defect_types)),
            "regions": _listing(list(REGIONS)),
            "shapes": _listing(SHAPES),
            "tones": _listing(TONES),
            "size_min": SIZE_RANGE[0],
            "size_max": SIZE_RANGE[1],
        }
        allowed = render_prompt(f"retry_allowed_{reason}", **fields)
        default = render_prompt(f"retry_default_{reason}", **fields)
    else:
        lines = _constraint_lines(context)
        allowed = (
            render_prompt("retry_allowed_constraint", constraints=" ".join(lines))
            if lines
            else render_prompt("retry_allowed_constraint_unlisted")
        )
        default = render_prompt("retry_default_constraint")
    reason_text = " ".join(detail.split()).rstrip(".") or default
    return render_prompt(
        "chat_retry", reason_text=reason_text, allowed=allowed, keys=_listing(SPEC_FIELDS)
    ).rstrip()


def spec_json_schema(knowledge: CategoryKnowledge) -> dict:
    """The JSON Schema of one spec of ``knowledge``'s category, for guided decoding.

    A subset of draft 2020-12 that vLLM guided decoding and OpenAI strict ``json_schema`` accept: an object
    with every key of :data:`SPEC_FIELDS` required (in that order), no other keys, enums for the category's
    defect types, region names, shapes and tones, and numeric bounds for size and severity.
    """
    properties = {
        "defect_type": {"type": "string", "enum": list(knowledge.defect_types)},
        "description": {"type": "string", "maxLength": 200},
        "region": {"type": "string", "enum": list(REGIONS)},
        "size": {"type": "number", "minimum": SIZE_RANGE[0], "maximum": SIZE_RANGE[1]},
        "shape": {"type": "string", "enum": list(SHAPES)},
        "tone": {"type": "string", "enum": list(TONES)},
        "severity": {"type": "number", "minimum": 0.0, "maximum": 1.0},
    }
    return {
        "type": "object",
        "properties": {key: properties[key] for key in SPEC_FIELDS},
        "required": list(SPEC_FIELDS),
        "additionalProperties": False,
    }

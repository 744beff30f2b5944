"""Lenient parsing of instruct-LLM replies into defect specs, with a reason code for each rejection.

In KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880) an
instruct LLM writes the anomaly descriptions. Real chat models wrap the JSON they are asked for in code
fences and prose, write Python dicts, trailing commas and comments, spell keys and values their own way, or
stop early. Parsing therefore runs in three steps:

1. strict JSON (``json.loads`` of the whole reply);
2. lenient extraction: a balanced-bracket scanner that respects strings and comments finds each object in
   the reply, a relaxed reader turns near-JSON into JSON, and the spec is unwrapped and its values brought
   into the documented form ("2%" -> 0.02, "subtle" -> 0.3). Every such repair has a stable name
   (:data:`REPAIRS`), returned by :func:`extract_object`;
3. validation by :class:`~kka_synth.types.DefectSpec`, the category's known defect types and, when the
   context carries them, its constraints.

Only the form is repaired. A value that means something else (an unknown region, a size out of range after
coercion, a defect type the category does not have) stays a rejection with its reason code, and
:func:`kka_synth.agents.guidance.retry_message` tells the model what was wrong and which values are allowed.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES, DefectSpec, Proposal, SpecError

if TYPE_CHECKING:
    from kka_synth.agents.base import ProposalContext

logger = logging.getLogger(__name__)

REASONS = (
    "empty",
    "refusal",
    "truncated",
    "not_json",
    "missing_field",
    "unknown_type",
    "bad_region",
    "bad_size",
    "bad_shape",
    "bad_tone",
    "bad_severity",
)
"""Reason codes of :func:`parse_reply`; a context's constraints may add codes starting with ``constraint``."""

REPAIRS = (
    "code_fence",  # the object sat inside a ``` fence
    "surrounding_text",  # prose (or another object) around the object
    "first_of_many",  # several specs; the first one is taken
    "list_of_one",  # a JSON list holding the spec
    "wrapped",  # the spec inside another object, e.g. {"spec": {...}}
    "comments",  # // ..., /* ... */ or # ... comments
    "trailing_comma",  # a comma before } or ]
    "single_quotes",  # 'strings' instead of "strings"
    "python_literals",  # True, False, None
    "unquoted_keys",  # {defect_type: ...}
    "key_case",  # "Defect Type", "defectType", "SIZE"
    "value_case",  # "Scratch", "Top-Left", "DARKER"
    "value_spelling",  # "top left", "top_left", "centre", "color", "broken large"
    "region_box_text",  # "[0.1, 0.2, 0.4, 0.5]" as a string
    "region_box_object",  # {"x0": ..., "y0": ..., "x1": ..., "y1": ...} or {"x", "y", "width", "height"}
    "percent_size",  # "2%" -> 0.02
    "size_text",  # "0.02 of the area", "about 0.02"
    "word_severity",  # "subtle" -> 0.3 (see SEVERITY_WORDS)
    "severity_percent",  # "40%" -> 0.4
    "severity_fraction",  # "3/10", "3 out of 10" -> 0.3
    "severity_text",  # "0.3 (subtle)"
)
"""The names of the lenient repairs, in the order they are tried."""

_SEVERITY_BANDS = (
    (0.1, ("barely visible", "very subtle", "very low", "minimal")),
    (0.3, ("subtle", "low", "faint", "slight", "minor", "mild")),
    (0.5, ("moderate", "medium", "noticeable")),
    (0.8, ("high", "strong", "obvious", "severe", "major")),
    (0.9, ("very high", "very obvious")),
)
SEVERITY_WORDS: dict[str, float] = {word: value for value, words in _SEVERITY_BANDS for word in words}
"""Severity words and the number each stands for (the bands of :meth:`DefectSpec.prompt`: subtle < 0.35,
visible, clearly visible > 0.7)."""

_SCAN_TOKEN = re.compile(r"[\"'{}\[\]\\#]|//|/\*")
_LEX = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<dstring>"(?:[^"\\]|\\.)*")
    | (?P<sstring>'(?:[^'\\]|\\.)*')
    | (?P<comment>//[^\n]*|\#[^\n]*|/\*.*?\*/)
    | (?P<punct>[{}\[\]:,])
    | (?P<number>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE | re.DOTALL,
)
_FENCE = re.compile(r"```[\w+-]*")
_FENCED_BLOCK = re.compile(r"```[\w+-]*[^\S\n]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_REFUSAL = re.compile(
    r"\b(?:i\s+can(?:no|'|’)t|i\s+can\s+not|i\s+am\s+unable|i'm\s+unable|i\s+won't|i\s+will\s+not"
    r"|as\s+an\s+ai|i'm\s+sorry,?\s+but|i\s+apologi[sz]e,?\s+but|not\s+able\s+to\s+(?:help|assist|comply))",
    re.IGNORECASE,
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[\s\-_]+")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_AMOUNT = re.compile(
    rf"(?:about|approx\.?|approximately|around|roughly|~)?\s*(?P<value>{_NUMBER})\s*(?P<percent>%|percent)?"
    r"\s*(?P<rest>.*)",
    re.DOTALL,
)
_SIZE_REST = re.compile(r"(?:of\b[^\d]*|area)?")
_LENGTH = re.compile(r"\b(?:mm|cm|px|pixels?|inch(?:es)?|millimet\w*|centimet\w*)\b")
_FRACTION = re.compile(rf"(?P<top>{_NUMBER})\s*(?:/|out\s+of)\s*(?P<bottom>{_NUMBER})")
_BOX_TEXT = re.compile(
    rf"[\[(]?\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*[\])]?"
)
_BOX_KEYS = (("x0", "y0", "x1", "y1"), ("xmin", "ymin", "xmax", "ymax"), ("x_min", "y_min", "x_max", "y_max"))
_OPENER = re.compile(r"\{|\[\s*\{")
_REGION_SPELLINGS = {"centre": "center"}
_TONE_SPELLINGS = {"color": "colour", "colored": "colour", "coloured": "colour"}


def _snake(key: str) -> str:
    """``"Defect Type"``, ``"defectType"`` and ``"DEFECT-TYPE"`` all give ``"defect_type"``."""
    return _SEPARATORS.sub("_", _CAMEL.sub("_", key.strip())).lower()


def _is_spec(value: Any) -> bool:
    """A dict with at least one key of :data:`SPEC_FIELDS` (in any case)."""
    if not isinstance(value, dict):
        return False
    return any(k in SPEC_FIELDS for k in value) or any(
        isinstance(k, str) and _snake(k) in SPEC_FIELDS for k in value
    )


def _match_end(text: str, start: int, quotes: tuple[str, ...] = ('"', "'")) -> int | None:
    """The index after the bracket that closes the one at ``start``; None when it never closes.

    Brackets inside strings quoted with ``quotes`` and inside //, # or /* */ comments do not count.
    """
    depth, quote, pos = 0, "", start
    while True:
        match = _SCAN_TOKEN.search(text, pos)
        if match is None:
            return None
        token, pos = match.group(), match.end()
        if quote:
            if token == "\\":
                pos += 1
            elif token == quote:
                quote = ""
        elif token in quotes:
            quote = token
        elif token in ("{", "["):
            depth += 1
        elif token in ("}", "]"):
            depth -= 1
            if depth == 0:
                return pos
        elif token in ("//", "#"):
            pos = text.find("\n", pos)
            if pos < 0:
                return None
        elif token == "/*":
            pos = text.find("*/", pos)
            if pos < 0:
                return None
            pos += 2


def _object_spans(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Top-level ``{...}`` or ``[{...}]`` spans of ``text``, and whether an object opened but never closed."""
    spans: list[tuple[int, int]] = []
    pos = 0
    while True:
        opener = _OPENER.search(text, pos)
        if opener is None:
            return spans, False
        start = opener.start()
        end = _match_end(text, start)
        if end is None and "'" in text[start:]:
            end = _match_end(text, start, quotes=('"',))  # an apostrophe inside a 'string'
        if end is None:
            # an unclosed bracket only counts as a cut-off object when JSON follows it
            return spans, bool(re.search(r"[\"':]", text[start:]))
        spans.append((start, end))
        pos = end


def _relaxed_json(text: str, repairs: list[str]) -> Any:
    """Read near-JSON (comments, trailing commas, single quotes, Python literals, unquoted keys) as JSON."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _LEX.match(text, pos)
        if match is None:
            raise SpecError("not_json", f"unreadable character {text[pos]!r} at char {pos}")
        kind = match.lastgroup or ""
        pos = match.end()
        if kind == "comment":
            repairs.append("comments")
        elif kind != "space":
            tokens.append((kind, match.group()))
    out: list[str] = []
    for index, (kind, token) in enumerate(tokens):
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        previous = tokens[index - 1][1] if index > 0 else ""
        if kind == "sstring":
            repairs.append("single_quotes")
            body = re.sub(r"\\(.)", lambda m: m.group(1) if m.group(1) in "'\"" else m.group(0), token[1:-1])
            out.append('"' + body.replace('"', '\\"') + '"')
        elif kind == "punct" and token == "," and following in ("}", "]"):
            repairs.append("trailing_comma")
        elif kind == "word" and following == ":" and previous in ("{", ","):
            repairs.append("unquoted_keys")
            out.append(json.dumps(token))
        elif kind == "word" and token in ("True", "False", "None"):
            repairs.append("python_literals")
            out.append({"True": "true", "False": "false", "None": "null"}[token])
        elif kind == "word" and token not in ("true", "false", "null", "NaN", "Infinity"):
            raise SpecError("not_json", f"bare word {token!r} is not a JSON value")
        else:
            out.append(token)
    try:
        return json.loads("".join(out))
    except json.JSONDecodeError as error:
        raise SpecError("not_json", f"invalid JSON ({error.msg})") from None
    except (ValueError, RecursionError) as error:
        raise SpecError("not_json", f"unreadable JSON ({type(error).__name__})") from None


def _read(text: str, repairs: list[str]) -> Any:
    """Strict JSON, else relaxed JSON (whose repairs are added to ``repairs`` only when it succeeds)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    tried: list[str] = []
    value = _relaxed_json(text, tried)
    repairs += tried
    return value


def _unwrap(value: Any, repairs: list[str]) -> Any:
    """The spec inside a list or wrapper objects (three levels at most), else ``value`` unchanged."""
    steps: list[str] = []
    current = value
    for _ in range(3):
        if isinstance(current, list) and current and isinstance(current[0], dict):
            steps.append("list_of_one" if len(current) == 1 else "first_of_many")
            current = current[0]
        elif isinstance(current, dict) and not _is_spec(current):
            inner = [v for v in current.values() if _is_spec(v)] or [
                v for v in current.values() if isinstance(v, (dict, list))
            ]
            if len(inner) != 1:
                break
            steps.append("wrapped")
            current = inner[0]
        else:
            break
    if not _is_spec(current):
        return value
    repairs += steps
    return current


def _select(text: str, repairs: list[str]) -> dict[str, Any]:
    """The spec object of a reply that is not plain JSON (steps 1 and 2 of the module docstring)."""
    spans, unclosed = _object_spans(text)
    found: list[tuple[dict[str, Any], int, int, list[str]]] = []
    fallback: tuple[dict[str, Any], int, int, list[str]] | None = None
    first_error: SpecError | None = None
    for start, end in spans:
        local: list[str] = []
        try:
            value = _unwrap(_read(text[start:end], local), local)
        except SpecError as error:
            first_error = first_error or error
            continue
        if _is_spec(value):
            found.append((value, start, end, local))
            if len(found) == 2:
                break
        elif isinstance(value, dict) and fallback is None:
            fallback = (value, start, end, local)
    if not found and fallback is None:
        if unclosed:
            raise SpecError("truncated", "the JSON object opens but never closes (the reply was cut off)")
        if first_error is not None:
            raise first_error
        if _REFUSAL.search(text):
            raise SpecError("refusal", "the reply declines the task instead of writing a spec")
        raise SpecError("not_json", "no JSON object in the reply")
    value, start, end, local = found[0] if found else fallback  # type: ignore[misc]
    if any(block.start(1) <= start and end <= block.end(1) for block in _FENCED_BLOCK.finditer(text)):
        repairs.append("code_fence")
    if _FENCE.sub("", text[:start] + text[end:]).strip():
        repairs.append("surrounding_text")
    if len(found) > 1:
        repairs.append("first_of_many")
    repairs += local
    return value


def _normalise_keys(data: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
    if all(key in SPEC_FIELDS for key in data):
        return data
    out = {key: value for key, value in data.items() if key in SPEC_FIELDS}
    for key, value in data.items():
        if key in SPEC_FIELDS:
            continue
        name = _snake(key) if isinstance(key, str) else key
        if name in SPEC_FIELDS and name not in out:
            repairs.append("key_case")
            out[name] = value
        else:
            out.setdefault(key, value)
    return out


def _enum_value(
    value: Any, allowed: tuple[str, ...] | None, separator: str, spellings: dict[str, str], repairs: list[str]
) -> Any:
    """Lower case, the field's word separator and ``spellings``; ``allowed`` None accepts any name."""
    if not isinstance(value, str) or (allowed is not None and value in allowed):
        return value
    lowered = value.strip().lower()
    spelled = spellings.get(lowered, _SEPARATORS.sub(separator, lowered))
    if allowed is not None and spelled not in allowed:
        return value
    if lowered != value:
        repairs.append("value_case")
    if spelled != lowered:
        repairs.append("value_spelling")
    return spelled


def _region(value: Any, repairs: list[str]) -> Any:
    if isinstance(value, str):
        box = _BOX_TEXT.fullmatch(value.strip())
        if box is not None:
            repairs.append("region_box_text")
            return [float(v) for v in box.groups()]
        return _enum_value(value, tuple(REGIONS), "-", _REGION_SPELLINGS, repairs)
    if isinstance(value, dict):
        keys = {_snake(k): v for k, v in value.items() if isinstance(k, str)}
        for names in _BOX_KEYS:
            if set(names) <= set(keys):
                repairs.append("region_box_object")
                return [keys[name] for name in names]
        if {"x", "y", "width", "height"} <= set(keys) and all(
            isinstance(keys[k], (int, float)) and not isinstance(keys[k], bool)
            for k in ("x", "y", "width", "height")
        ):
            repairs.append("region_box_object")
            return [keys["x"], keys["y"], keys["x"] + keys["width"], keys["y"] + keys["height"]]
    return value


def _size(value: Any, repairs: list[str]) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    match = _AMOUNT.fullmatch(text)
    rest = "" if match is None else match["rest"].strip()
    if match is None or not _SIZE_REST.fullmatch(rest) or _LENGTH.search(rest):
        return value
    number = float(match["value"])
    if match["percent"]:
        repairs.append("percent_size")
        return number / 100.0
    if text != match["value"]:
        repairs.append("size_text")
        return number
    return value


def _severity(value: Any, repairs: list[str]) -> Any:
    if not isinstance(value, str):
        return value
    text = " ".join(re.sub(r"(?<=[a-z])-(?=[a-z])", " ", value.strip().lower()).split())
    if text in SEVERITY_WORDS:
        repairs.append("word_severity")
        return SEVERITY_WORDS[text]
    fraction = _FRACTION.fullmatch(text)
    if fraction is not None and float(fraction["bottom"]) > 0:
        repairs.append("severity_fraction")
        return float(fraction["top"]) / float(fraction["bottom"])
    match = _AMOUNT.fullmatch(text)
    if match is None or re.search(r"\d", match["rest"]):
        return value
    number = float(match["value"])
    if match["percent"]:
        repairs.append("severity_percent")
        return number / 100.0
    if text != match["value"]:
        repairs.append("severity_text")
        return number
    return value


def _coerce(data: dict[str, Any], repairs: list[str]) -> dict[str, Any]:
    data = _normalise_keys(data, repairs)
    coercions = {
        "defect_type": lambda v: _enum_value(v, None, "_", {}, repairs),
        "region": lambda v: _region(v, repairs),
        "size": lambda v: _size(v, repairs),
        "shape": lambda v: _enum_value(v, SHAPES, "_", {}, repairs),
        "tone": lambda v: _enum_value(v, TONES, "_", _TONE_SPELLINGS, repairs),
        "severity": lambda v: _severity(v, repairs),
    }
    return {key: coercions[key](value) if key in coercions else value for key, value in data.items()}


def extract_object(text: str) -> tuple[dict, list[str]]:
    """The spec object in a reply, and the names of the lenient repairs that were needed ([] for clean JSON).

    Values are brought into the documented form (see :data:`REPAIRS`) but not checked; :func:`parse_reply`
    validates them. Raises :class:`~kka_synth.types.SpecError` with reason ``empty`` (blank reply),
    ``truncated`` (an object that opens and never closes), ``refusal`` (no object, and the text declines) or
    ``not_json`` when there is no usable object.
    """
    if not _FENCE.sub("", text).strip():
        raise SpecError("empty", "the reply is empty")
    repairs: list[str] = []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, (dict, list)):
        value = _unwrap(value, repairs)
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise SpecError("not_json", "expected a JSON object, got a list")
        value = _select(text, repairs)
    data = _coerce(value, repairs)
    return data, list(dict.fromkeys(repairs))


def _validate(data: dict[str, Any], context: ProposalContext) -> DefectSpec:
    """The :class:`DefectSpec` rules and the category's defect types, exactly as ``DefectSpec.from_text``."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError, RecursionError):
        raise SpecError("not_json", "the object holds values JSON cannot write") from None
    return DefectSpec.from_text(text, context.category, defect_types=list(context.knowledge.defect_types))


def parse_reply(text: str, context: ProposalContext, prompt: str = "") -> tuple[Proposal, str]:
    """Proposal (spec or error reason code) and a one-line detail of what was wrong ('' when it parsed).

    Validation is the :class:`DefectSpec` rules, a defect type known for ``context.knowledge``, and, when
    ``context.constraints`` has a ``violation(spec)`` method (and is not ``empty``), the constraints: a
    violation is a rejection with the reason that method returns (and the detail of ``explain(spec)`` when
    it has one).
    """
    try:
        data, repairs = extract_object(text)
        spec = _validate(data, context)
    except SpecError as error:
        detail = " ".join(error.message.split())
        return Proposal(prompt=prompt, text=text, spec=None, error=error.reason), detail
    except (ValueError, OverflowError, RecursionError) as error:
        return Proposal(prompt=prompt, text=text, spec=None, error="not_json"), f"unreadable ({error})"
    constraints = context.constraints
    if hasattr(constraints, "violation") and not getattr(constraints, "empty", False):
        if hasattr(constraints, "explain"):
            reason, detail = constraints.explain(spec)
        else:
            reason, detail = constraints.violation(spec), ""
        if reason:
            detail = detail or f"the {spec.defect_type} spec breaks the constraints ({reason})"
            return Proposal(prompt=prompt, text=text, spec=None, error=reason), " ".join(detail.split())
    if repairs:
        logger.debug("parsed a %s reply after repairs %s", context.category, ", ".join(repairs))
    return Proposal(prompt=prompt, text=text, spec=spec, error=None), ""

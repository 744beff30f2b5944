"""The offline side of ``kka-synth chat``: a rule-based intent parser, and the read-respond loop.

The compact offline proposer of the KKA loop ("Improving Vision Anomaly Detection through Anomaly-related
Knowledge from LLMs", arXiv 2502.14880) writes specs but cannot converse. :class:`IntentChat` maps what the
user types onto the same tools an LLM agent calls (:class:`~kka_synth.agents.chat.ChatSession`), with fixed
patterns: an utterance splits into clauses on "and", ",", ";" and "then", and each clause becomes zero or
more tool calls ("no more stains on the washer, size < 2% and propose 4").

:func:`repl` is the read-respond loop that :class:`IntentChat` and the LLM agent chat
(:class:`~kka_synth.agents.chat_agent.AgentChat`) share.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kka_synth.agents.chat import ChatSession, canonical_name, first_line, match_names
from kka_synth.agents.constraints import ALL, FIELDS, LIST_FIELDS
from kka_synth.types import SHAPES, TONES

logger = logging.getLogger(__name__)

_NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
}
_NUM = r"(?:\d+(?:\.\d+)?|\.\d+)(?:\s*(?:%|percent\b))?"
_COUNT = r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\b"
_SPLIT = re.compile(r"\s*[,;]\s*|\s+(?:and|then)\s+", re.IGNORECASE)
_BETWEEN = re.compile(rf"\bbetween\s+({_NUM})\s+and\s+({_NUM})", re.IGNORECASE)
_MAX = re.compile(
    rf"(?:<=?|\bsmaller than|\bless than|\bunder|\bbelow|\bat most|\bup to|\bno (?:bigger|larger|more) than"
    rf"|\bnot (?:bigger|larger|more) than|\bmax(?:imum)?|\bto)\s*({_NUM})"
)
_MIN = re.compile(
    rf"(?:>=?|\blarger than|\bbigger than|\bgreater than|\bmore than|\bover|\babove|\bat least"
    rf"|\bmin(?:imum)?|\bbetween)\s*({_NUM})"
)
_REGION = re.compile(
    r"\b(top|upper|bottom|lower)[\s-]*(left|right)\b|\b(top|upper|bottom|lower|left|right|center|centre|middle)\b"
)
_FILLER = re.compile(r"\b(?:please|the|any|more|defects?|anymore|again|them|ones)\b")
_LIMIT_GROUPS = {
    "size": ("size_min", "size_max"),
    "severity": ("severity_min", "severity_max"),
    "region": ("regions", "exclude_regions"),
    "type": ("only_types", "exclude_types"),
    "shape": ("shapes", "exclude_shapes"),
    "tone": ("tones", "exclude_tones"),
    "note": ("notes",),
}
"""What "remove the <word> limit" removes."""
_LIMIT_WORDS = r"(limits?|constraints?|bounds?|restrictions?|rules?|notes?|exclusions?|caps?)"


def _add(category: str | None, field: str, value: str) -> tuple[str, dict]:
    return ("add_constraint", {"category": category, "field": field, "value": value})


def _remove(category: str | None, field: str, value: str | None = None) -> tuple[str, dict]:
    args = {"category": category, "field": field}
    return ("remove_constraint", args if value is None else {**args, "value": value})


def _count_in(text: str) -> int | None:
    match = re.search(_COUNT, text)
    if match is None:
        return None
    word = match.group(1)
    return int(word) if word.isdigit() else _NUMBER_WORDS[word]


def _regions_in(text: str) -> list[str]:
    found = []
    for match in _REGION.finditer(text):
        if match.group(1):
            found.append(canonical_name("regions", f"{match.group(1)}-{match.group(2)}"))
        else:
            found.append(canonical_name("regions", match.group(3)))
    return list(dict.fromkeys(found))


class IntentChat:
    """Deterministic intent parser for the offline (compact) proposer: maps an utterance onto session tools.

    An utterance is split into clauses (on "and", ",", ";" and "then"); each clause is matched against fixed
    patterns in order, and a clause that is only numbers or names continues the one before ("approve 1 and
    3", "exclude stains and scratches").
    """

    HELP = (
        "I understand:\n"
        "  list categories | show knowledge of washer | focus on washer\n"
        "  no more stains (on this product) | exclude scratches | only scratches\n"
        "  size < 2% | smaller than 2% | at least 0.01 | severity below 0.5 | subtle\n"
        "  top-left | near the top | left side | put them near the inner edge | make the scratches thinner\n"
        "  propose 4 | show me three | preview | approve 1 and 3 | keep 2\n"
        "  remove the size limit | allow stains again | constraints | stats | hardest\n"
        "  save | save to FILE | help | quit"
    )

    def __init__(self, session: ChatSession) -> None:
        self.session = session
        self._focus: str | None = session.category
        self.greeting = (
            "The compact offline proposer is a small spec-writing model and cannot hold a conversation, so a "
            "rule-based parser maps what you type onto the same tools an LLM agent would call.\n" + self.HELP
        )

    # planning ----------------------------------------------------------------------------------------
    def plan(self, text: str) -> list[tuple[str, dict]]:
        """The tool calls an utterance maps to, in order (``("help", {})`` for a request for help)."""
        return self._plan(text)[0]

    def _plan(self, text: str) -> tuple[list[tuple[str, dict]], list[str]]:
        text = _BETWEEN.sub(r"between \1 to \2", text.strip())
        calls: list[tuple[str, dict]] = []
        unknown: list[str] = []
        self._focus = self.session.category
        for raw in _SPLIT.split(text):
            original = re.sub(
                r"^(?:(?:and|then|also|please)\s+)+", "", raw.strip().strip(".!?").strip(), flags=re.I
            )
            if not original:
                continue
            clause = " ".join(original.lower().split())
            found = self._continuation(clause, calls)
            if found is None:
                found = self._clause(clause, original)
            if found is None:
                unknown.append(original)
            else:
                calls.extend(found)
        return calls, unknown

    def _category_in(self, clause: str) -> str | None:
        for name in self.session.known_categories():
            pattern = r"\b" + re.escape(name.lower()).replace("_", r"[\s_]") + r"s?\b"
            if re.search(pattern, clause):
                self._focus = name
                return name
        return None

    def _scope_in(self, clause: str) -> str | None:
        """The category a clause names, ALL for "all products", else the focus (ALL when none)."""
        named = self._category_in(clause)
        if named is not None:
            return named
        if re.search(r"\b(all|every|everywhere|any product|any category)\b", clause):
            return ALL
        return self._focus or ALL

    def _clause(self, clause: str, original: str) -> list[tuple[str, dict]] | None:
        """The calls one clause maps to, or None when no pattern matches."""
        if re.fullmatch(r"(help|\?|what can you do|commands)", clause):
            return [("help", {})]
        if re.search(r"\bknowledge\b|\bwhat (defects|defect types)\b", clause):
            named = re.search(r"\b(?:of|for|about|does)\s+(?:the\s+)?([a-z][\w-]*)", clause)
            category = self._category_in(clause) or (named.group(1) if named else self._focus)
            return [("show_knowledge", {"category": category})]
        if re.search(r"\bconstraints?\b", clause) and not re.match(
            r"(remove|drop|clear|delete|lift|reset)", clause
        ):
            scope = self._category_in(clause)
            return [("list_constraints", {"category": scope or self._focus})]
        if re.search(r"\b(categories|products)\b", clause) and not re.search(
            r"\b(no|exclude|only)\b", clause
        ):
            return [("list_categories", {})]
        if re.search(r"\b(stats|statistics|hardest)\b", clause):
            top = _count_in(clause)
            return [("run_stats", {} if top is None else {"top": top})]
        save = re.fullmatch(
            r"save(?:\s+(?:the\s+)?(?:prompts?|prompt set|constraints))?(?:\s+(?:to|as|in|into)\s+(\S+))?",
            original.strip(),
            re.IGNORECASE,
        )
        if save is not None:
            return [("save_prompts", {} if save.group(1) is None else {"path": save.group(1)})]
        if re.match(rf"(remove|drop|clear|delete|lift|reset|forget)\b.*\b{_LIMIT_WORDS}\b", clause):
            return self._remove(clause)
        allow = re.match(r"(?:allow|bring back|include|permit)\s+(.+?)(?:\s+again)?$", clause)
        if allow is not None:
            return self._allow(allow.group(1))
        approve = re.match(r"(?:approve|keep|accept|take|i like)\s+(.+)$", clause)
        if approve is not None:
            numbers = self._numbers(approve.group(1))
            if numbers is not None:
                return [
                    ("approve", {"category": self._category_in(clause) or self._focus, "numbers": numbers})
                ]
        if re.match(r"(propose|suggest|generate|give me|new)\b", clause):
            n = _count_in(clause) or 3
            return [("propose", {"category": self._category_in(clause) or self._focus, "n": n})]
        if re.match(r"(show|preview|render|draw|let me see|see)\b", clause):
            category = self._category_in(clause) or self._focus
            n = _count_in(clause)
            if n is None:
                last = self.session.last_proposals(category) if category else []
                n = min(len(last), 16) or 3
            return [("preview", {"category": category, "n": n})]
        focus = re.match(
            r"(?:focus|switch|move|go|work|look|change)\b.*?\b(?:on|to|for|at)\s+(?:the\s+)?(.+)$", clause
        )
        if focus is not None:
            category = self._category_in(clause) or focus.group(1)
            return [("show_knowledge", {"category": category})]
        exclude = re.match(
            r"(?:no more|no|exclude|without|avoid|skip|drop|remove|never|don't want|do not want)\s+(.+)$",
            clause,
        )
        if exclude is not None:
            return self._exclude(clause, exclude.group(1))
        return self._constraint_clause(clause, original)

    def _constraint_clause(self, clause: str, original: str) -> list[tuple[str, dict]] | None:
        """Bounds, "only", severity words, regions and notes."""
        scope = self._scope_in(clause)
        calls = []
        kind = "severity" if re.search(r"sever|strength|intensit|contrast", clause) else "size"
        for pattern, bound in ((_MIN, "min"), (_MAX, "max")):
            match = pattern.search(clause)
            if match is not None:
                calls.append(_add(scope, f"{kind}_{bound}", match.group(1).replace(" ", "")))
        if calls:
            return calls
        only = re.search(r"\bonly\s+(.+)$", clause)
        regions = _regions_in(clause)
        if only is not None and not regions:
            return self._names(scope, only.group(1), "only_types")
        if re.search(r"\b(subtle|faint|barely visible|hard to see|low contrast)\b", clause):
            return [_add(scope, "severity_max", "0.35")]
        if re.search(r"\b(obvious|clearly visible|strong|prominent)\b", clause):
            return [_add(scope, "severity_min", "0.7")]
        near = re.search(r"\b(?:near|at|on|by|around|close to)\s+(?:the\s+)?([a-z][a-z _-]*)$", clause)
        placed = re.search(r"\b(near|on|in|at|put|place|keep|side|corner|area|region|only)\b", clause)
        if regions and (placed or len(clause.split()) <= 2):
            return [_add(scope, "regions", r) for r in regions]
        if re.match(r"(make|put|place|keep|let|have|note|add a note)\b", clause):
            note = original
            if near is not None and re.match(r"(put|place|keep)\b", clause):
                note = f"place defects near the {near.group(1).strip()}"
            return [_add(scope, "notes", note)]
        return None

    def _names(self, scope: str, phrase: str, field: str) -> list[tuple[str, dict]]:
        """add_constraint calls for each name in ``phrase`` ("stains or scratches"), types before shapes."""
        calls = []
        words = _FILLER.sub(" ", phrase)
        words = re.split(r"\s+(?:on|for|in|at|from)\s+", " " + words + " ")[0]
        for piece in re.split(r"\s+or\s+|/", words):
            piece = " ".join(piece.split())
            if not piece:
                continue
            target = field
            if field in ("exclude_types", "only_types") and not self.session.match_types(scope, piece):
                prefix = "exclude_" if field == "exclude_types" else ""
                if _regions_in(piece):
                    calls += [_add(scope, prefix + "regions", region) for region in _regions_in(piece)]
                    continue
                elif canonical_name("shapes", piece) in SHAPES:
                    target = prefix + "shapes"
                elif canonical_name("tones", piece) in TONES:
                    target = prefix + "tones"
            calls.append(_add(scope, target, piece))
        return calls

    def _exclude(self, clause: str, phrase: str) -> list[tuple[str, dict]]:
        return self._names(self._scope_in(clause), phrase, "exclude_types")

    def _where(self, field: str, explicit: str | None) -> list[str]:
        """The scopes (the named one, else the focus and ALL) whose own constraints set ``field``."""
        scopes = [explicit] if explicit else [s for s in (self._focus, ALL) if s is not None]
        return [s for s in scopes if getattr(self.session.constraints_of(s), field) not in (None, [])]

    def _remove(self, clause: str) -> list[tuple[str, dict]]:
        explicit = self._category_in(clause)
        if explicit is None and re.search(
            r"\b(every|everywhere|for all|all categories|all products)\b", clause
        ):
            explicit = ALL
        fields = next((f for word, f in _LIMIT_GROUPS.items() if word in clause), FIELDS)
        calls = [_remove(scope, field) for field in fields for scope in self._where(field, explicit)]
        if not calls and fields == FIELDS:  # nothing set anywhere: show what there is
            return [("list_constraints", {"category": explicit or self._focus})]
        return calls or [_remove(explicit or self._focus or ALL, fields[-1])]

    def _allow(self, phrase: str) -> list[tuple[str, dict]]:
        explicit = self._category_in(phrase)
        words = " ".join(_FILLER.sub(" ", re.split(r"\s+(?:on|for|in|at)\s+", phrase)[0]).split())
        scopes = [explicit] if explicit else [s for s in (self._focus, ALL) if s is not None]
        found = [s for s in scopes if match_names(words, self.session.constraints_of(s).exclude_types)]
        return [_remove(s, "exclude_types", words) for s in found or [explicit or self._focus or ALL]]

    def _numbers(self, text: str) -> list[int] | None:
        """Proposal numbers in ``text`` ("1, 3", "number two", "all"), or None when it holds other words."""
        words = re.sub(r"\b(numbers?|no\.|the|ones|proposals?|specs?|for|of|on)\b|#", " ", text).split()
        categories = {c.lower() for c in self.session.known_categories()}
        words = [w for w in words if w not in categories and w.rstrip("s") not in categories]
        if words == ["all"]:
            count = len(self.session.last_proposals(self._focus)) if self._focus else 0
            return list(range(1, count + 1)) or [1]
        numbers = []
        for word in words:
            if word.isdigit():
                numbers.append(int(word))
            elif word in _NUMBER_WORDS:
                numbers.append(_NUMBER_WORDS[word])
            else:
                return None
        return numbers or None

    def _continuation(self, clause: str, calls: list[tuple[str, dict]]) -> list[tuple[str, dict]] | None:
        """A clause of only numbers or names that continues the call before it ("approve 1 and 3")."""
        if not calls:
            return None
        tool, args = calls[-1]
        if tool == "approve":
            numbers = self._numbers(clause)
            if numbers is None:
                return None
            args["numbers"] = [*args["numbers"], *numbers]
            return []
        if tool != "add_constraint" or args["field"] not in LIST_FIELDS or args["field"] == "notes":
            return None
        field = "exclude_types" if args["field"].startswith("exclude") else "only_types"
        pieces = re.split(r"\s+or\s+|/", " ".join(_FILLER.sub(" ", clause).split()))
        if len(clause.split()) > 3 or not all(self._is_name(args["category"], p) for p in pieces):
            return None
        return self._names(args["category"], clause, field)

    def _is_name(self, scope: str, piece: str) -> bool:
        """Whether ``piece`` names a defect type of ``scope``, a region, a shape or a tone."""
        return bool(
            self.session.match_types(scope, piece)
            or _regions_in(piece)
            or canonical_name("shapes", piece) in SHAPES
            or canonical_name("tones", piece) in TONES
        )

    # answering ---------------------------------------------------------------------------------------
    def respond(self, text: str) -> str:
        """Run the planned tool calls and join their outputs; never raises."""
        try:
            calls, unknown = self._plan(text)
        except (ValueError, OSError) as error:  # the dataset's categories cannot be listed
            return f"error: {first_line(error)}"
        outputs = [self.HELP if tool == "help" else self.session.call(tool, **args) for tool, args in calls]
        if unknown:
            quoted = ", ".join(repr(u) for u in unknown)
            outputs.append(f"I did not understand {quoted}." + ("" if calls else "\n" + self.HELP))
        return "\n\n".join(outputs) if outputs else self.HELP


def repl(
    responder: Any,
    *,
    read: Callable[[str], str],
    write: Callable[[str], None],
    history: Path | None = None,
) -> int:
    """Read a line, answer it, repeat; "quit", "exit", end of input or Ctrl-C end the loop (returns 0).

    Args:
        responder: anything with ``respond(text) -> str`` (:class:`IntentChat`, the LLM agent chat).
        read: reads one line after showing its prompt (``input``).
        write: shows one reply (``print``).
        history: readline history file, loaded at the start and saved at the end when readline exists.
    """
    readline = _readline() if history is not None else None
    if readline is not None and history is not None and history.is_file():
        try:
            readline.clear_history()
            readline.read_history_file(str(history))
        except OSError as error:
            logger.warning("cannot read chat history %s: %s", history, first_line(error))
    try:
        while True:
            try:
                line = read("kka> ")
            except (EOFError, KeyboardInterrupt):
                write("")
                return 0
            text = line.strip()
            if not text:
                continue
            if text.lower() in ("quit", "exit"):
                return 0
            try:
                write(responder.respond(text))
            except Exception as error:  # an agent backend failing (network, model) must not end the chat
                logger.debug("responder failed", exc_info=True)
                write(f"error: {first_line(error)}")
    finally:
        if readline is not None and history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.set_history_length(1000)
                readline.write_history_file(str(history))
            except OSError as error:
                logger.warning("cannot save chat history %s: %s", history, first_line(error))


def _readline() -> Any:
    try:
        import readline
    except ImportError:
        return None
    return readline


__all__ = ["IntentChat", "repl"]

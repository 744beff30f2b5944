"""IntentChat: the offline rule-based parser over the chat tools, and the read-respond loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kka_synth.agents import ProposalContext, parse_completion
from kka_synth.agents.chat import ChatSession
from kka_synth.agents.chat_intent import IntentChat, repl
from kka_synth.config import RunConfig
from kka_synth.types import Proposal

W = "washer"
SPEC = (
    '{"defect_type": "rust", "description": "rust spot on the metal", "region": "top-left", "size": 0.01, '
    '"shape": "spot", "tone": "colour", "severity": 0.5}'
)


class RustProposer:
    """Always proposes the same valid washer spec."""

    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        return [parse_completion(SPEC, context, prompt="p") for _ in range(n)]


@pytest.fixture
def chat(tmp_path: Path) -> IntentChat:
    session = ChatSession(
        RunConfig(), prompts_path=tmp_path / "prompts.yaml", preview_dir=tmp_path, proposer=RustProposer()
    )
    return IntentChat(session)


def _add(category: str, field: str, value: str) -> tuple[str, dict]:
    return ("add_constraint", {"category": category, "field": field, "value": value})


PLANS = [
    (None, "list categories", [("list_categories", {})]),
    (None, "Show knowledge of washer", [("show_knowledge", {"category": W})]),
    (None, "focus on the washer", [("show_knowledge", {"category": W})]),
    (None, "exclude stains", [_add("*", "exclude_types", "stains")]),
    ("brick", "no more stains on this product", [_add("brick", "exclude_types", "stains")]),
    (
        W,
        "no more stains on this product",
        [_add(W, "exclude_shapes", "stains")],
    ),  # washers have no stain type
    (W, "no stains on brick", [_add("brick", "exclude_types", "stains")]),
    (
        W,
        "exclude scratches and dents",
        [_add(W, "exclude_types", "scratches"), _add(W, "exclude_types", "dents")],
    ),
    (W, "only scratches", [_add(W, "only_types", "scratches")]),
    (W, "no scratches or dents", [_add(W, "exclude_types", "scratches"), _add(W, "exclude_types", "dents")]),
    (W, "avoid the left side", [_add(W, "exclude_regions", "left")]),
    (
        W,
        "exclude top left and bottom right",
        [_add(W, "exclude_regions", "top-left"), _add(W, "exclude_regions", "bottom-right")],
    ),
    (
        W,
        "only the top-left and scratches",
        [_add(W, "regions", "top-left"), _add(W, "only_types", "scratches")],
    ),
    ("brick", "no colour", [_add("brick", "exclude_tones", "colour")]),
    (W, "size < 2%", [_add(W, "size_max", "2%")]),
    (W, "make them smaller than 2%", [_add(W, "size_max", "2%")]),
    (W, "at most 0.02", [_add(W, "size_max", "0.02")]),
    (W, "at least 1 percent", [_add(W, "size_min", "1percent")]),
    (W, "size between 1% and 3%", [_add(W, "size_min", "1%"), _add(W, "size_max", "3%")]),
    (W, "severity below 0.5", [_add(W, "severity_max", "0.5")]),
    (W, "subtle", [_add(W, "severity_max", "0.35")]),
    (W, "top-left", [_add(W, "regions", "top-left")]),
    (W, "near the top", [_add(W, "regions", "top")]),
    (W, "left side", [_add(W, "regions", "left")]),
    (W, "put them near the inner edge", [_add(W, "notes", "place defects near the inner edge")]),
    (W, "Make the scratches thinner.", [_add(W, "notes", "Make the scratches thinner")]),
    (W, "show me three", [("preview", {"category": W, "n": 3})]),
    (W, "show 5", [("preview", {"category": W, "n": 5})]),
    (W, "preview", [("preview", {"category": W, "n": 3})]),
    (W, "propose 4", [("propose", {"category": W, "n": 4})]),
    (W, "approve 1 and 3", [("approve", {"category": W, "numbers": [1, 3]})]),
    (W, "keep two", [("approve", {"category": W, "numbers": [2]})]),
    (W, "remove the size limit", [("remove_constraint", {"category": W, "field": "size_max"})]),
    (
        W,
        "allow stains again",
        [("remove_constraint", {"category": W, "field": "exclude_types", "value": "stains"})],
    ),
    (W, "constraints", [("list_constraints", {"category": W})]),
    (W, "remove all constraints", [("list_constraints", {"category": W})]),  # none set: show them
    (None, "stats", [("run_stats", {})]),
    (None, "hardest 3", [("run_stats", {"top": 3})]),
    (None, "save", [("save_prompts", {})]),
    (None, "save to Out/My-Prompts.yaml", [("save_prompts", {"path": "Out/My-Prompts.yaml"})]),
    (None, "help", [("help", {})]),
    (
        None,
        "focus on brick and no stains, then show me two",
        [
            ("show_knowledge", {"category": "brick"}),
            _add("brick", "exclude_types", "stains"),
            ("preview", {"category": "brick", "n": 2}),
        ],
    ),
    (None, "what is the weather like", []),
]


@pytest.mark.parametrize(("focus", "text", "expected"), PLANS, ids=[text for _, text, _ in PLANS])
def test_plan(chat: IntentChat, focus: str | None, text: str, expected: list) -> None:
    chat.session.category = focus
    assert chat.plan(text) == expected


def test_plan_finds_where_a_constraint_lives(chat: IntentChat) -> None:
    session = chat.session
    session.add_constraint("*", "size_max", "0.02")
    session.add_constraint("*", "exclude_types", "stains")
    session.show_knowledge(W)
    assert chat.plan("remove the size limit and allow stains again") == [
        ("remove_constraint", {"category": "*", "field": "size_max"}),
        ("remove_constraint", {"category": "*", "field": "exclude_types", "value": "stains"}),
    ]
    chat.respond("remove the size limit and allow stains again")
    assert session.constraints_of("*").empty


def test_respond_runs_the_tools_and_saves(chat: IntentChat, tmp_path: Path) -> None:
    out = chat.respond("focus on brick and no more stains on this product then save")
    assert "brick: exclude_types += stain" in out and "saved 1 constraint set(s)" in out
    saved = yaml.safe_load((tmp_path / "prompts.yaml").read_text())
    assert saved["constraints"] == {"brick": {"exclude_types": ["stain"]}}
    out = chat.respond("propose 2 for washer and approve 2")
    assert "2 proposal(s) for washer" in out and "approved 1 new example(s)" in out
    assert chat.session.prompt_set.examples[W] == [SPEC]
    out = chat.respond("put them near the inner edge")
    assert "notes += place defects near the inner edge" in out and "cannot read notes" in out


def test_respond_never_raises(chat: IntentChat) -> None:
    out = chat.respond("what is the weather like")
    assert out.startswith("I did not understand 'what is the weather like'") and "I understand:" in out
    assert chat.respond("show me three").startswith("error: no category in focus; name one (known: brick")
    assert chat.respond("approve 1 for washer") == "error: nothing proposed for washer yet; propose first"
    assert chat.respond("") == chat.HELP
    out = chat.respond("only blobs on washer and frobnicate the big quux")
    assert "washer: shapes += blob" in out and out.endswith("I did not understand 'frobnicate the big quux'.")


def test_greeting_says_the_offline_proposer_cannot_converse(chat: IntentChat) -> None:
    assert "cannot hold a conversation" in chat.greeting and "rule-based" in chat.greeting
    assert "show me three" in chat.greeting


class Echo:
    def __init__(self) -> None:
        self.heard: list[str] = []

    def respond(self, text: str) -> str:
        self.heard.append(text)
        if text == "boom":
            raise RuntimeError("endpoint unreachable\nmore detail")
        return f"echo {text}"


def _reader(lines: list[str], end: type[BaseException] = EOFError) -> Callable[[str], str]:
    prompts = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not lines:
            raise end
        return lines.pop(0)

    read.prompts = prompts  # type: ignore[attr-defined]
    return read


def test_repl_ends_on_quit(tmp_path: Path) -> None:
    echo, written = Echo(), []
    lines = ["hello", "   ", "boom", "exit", "never read"]
    assert repl(echo, read=_reader(lines), write=written.append) == 0
    assert echo.heard == ["hello", "boom"]
    assert written == ["echo hello", "error: endpoint unreachable"]
    assert lines == ["never read"]


@pytest.mark.parametrize("end", [EOFError, KeyboardInterrupt])
def test_repl_ends_on_end_of_input(end: type[BaseException]) -> None:
    echo, written = Echo(), []
    read = _reader(["one", "QUIT now"], end)
    assert repl(echo, read=read, write=written.append) == 0
    assert echo.heard == ["one", "QUIT now"]
    assert written == ["echo one", "echo QUIT now", ""]
    assert read.prompts == ["kka> "] * 3  # type: ignore[attr-defined]


def test_repl_saves_readline_history(tmp_path: Path) -> None:
    pytest.importorskip("readline")
    history = tmp_path / "state" / "chat_history"
    assert repl(Echo(), read=_reader(["quit"]), write=lambda text: None, history=history) == 0
    assert history.is_file()

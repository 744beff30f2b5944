"""`kka-synth chat` end to end: offline one-shot, and a scripted tool-calling conversation whose saved prompt
set changes the specs of the next `kka-synth run --prompts`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_chat import call, scripted
from langchain_core.messages import AIMessage
from tiny_run import tiny_settings

from kka_synth.agents import PromptSet
from kka_synth.agents.chat import ChatSession
from kka_synth.agents.chat_agent import AgentChat
from kka_synth.cli import main
from kka_synth.config import RunConfig
from kka_synth.runs import read_jsonl

TINY = {**tiny_settings(iterations=1), "alignment": {"enabled": False}}


def test_one_shot_offline_constrains_previews_and_saves(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    code = main(
        ["chat", "--config", str(config), "--prompt", "focus on washer, exclude rust and show me two"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "washer: exclude_types += rust" in out
    previews = [line.strip() for line in out.splitlines() if line.strip().endswith("-overlay.png")]
    # the tiny compact proposer may not get two parsed specs in its three rounds; each one it got is shown
    assert 1 <= len(previews) <= 2 and all((tmp_path / p).is_file() for p in previews)
    assert "saved 1 constraint set(s)" in out  # a one-shot saves what it changed
    assert PromptSet.load(tmp_path / "prompts.yaml").for_category("washer").exclude_types == ["rust"]


def test_a_scripted_agent_conversation_changes_the_next_run(tmp_path: Path) -> None:
    """constrain -> propose -> preview -> save through the tool-calling agent, then `run --prompts`."""
    config = RunConfig.from_dict({**TINY, "out": str(tmp_path / "runs"), "name": "constrained"})
    prompts = tmp_path / "prompts.yaml"
    session = ChatSession(config, prompts_path=prompts, preview_dir=tmp_path / "previews")
    model = scripted(
        AIMessage(
            content="",
            tool_calls=[
                call("add_constraint", "1", category="washer", field="exclude_types", value="rust"),
                call("add_constraint", "2", category="*", field="size_max", value="0.01"),
            ],
        ),
        AIMessage(content="", tool_calls=[call("propose", "3", category="washer", n=3)]),
        AIMessage(content="", tool_calls=[call("preview", "4", category="washer", n=2)]),
        AIMessage(content="", tool_calls=[call("save_prompts", "5")]),
        AIMessage(content="Saved: no rust on the washer, and every defect at most 1% of the object."),
    )
    agent = AgentChat(model, session)
    answer = agent.respond("no more rust on the washer, keep everything under 1%, show me two and save")
    assert answer.startswith("Saved:")
    assert 1 <= len(list((tmp_path / "previews").glob("washer-*-overlay.png"))) <= 2
    saved = PromptSet.load(prompts)
    assert (
        saved.for_category("washer").exclude_types == ["rust"]
        and saved.for_category("brick").size_max == 0.01
    )

    run_config = tmp_path / "run.yaml"
    run_config.write_text(yaml.safe_dump({**TINY, "out": str(tmp_path / "runs"), "name": "constrained"}))
    assert main(["run", "--config", str(run_config), "--prompts", str(prompts), "--no-progress"]) == 0
    run = tmp_path / "runs" / "constrained"
    specs = [r["spec"] for r in read_jsonl(run / "iterations" / "1" / "proposals.jsonl") if r["spec"]]
    assert specs and all(s["size"] <= 0.01 for s in specs)
    assert not [s for s in specs if s["category"] == "washer" and s["defect_type"] == "rust"]
    stats = json.loads((run / "iterations" / "1" / "stats.json").read_text())
    assert not [reason for reason in stats["rejections"] if reason.startswith("parse:constraint")]


@pytest.mark.parametrize("flags", [["--run", "missing-run"], ["--prompts", "bad.yaml"]])
def test_chat_bad_input_is_one_line(tmp_path: Path, monkeypatch, capsys, flags) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("constraints: [1, 2]\n")
    assert main(["chat", *flags, "--prompt", "constraints"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kka-synth: error:") and len(err.splitlines()) == 1

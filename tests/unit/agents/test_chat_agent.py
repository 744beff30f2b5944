"""The chat agent: session tools, scripted conversations, the transformers and OpenAI chat models."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain")

from fake_chat import call, scripted  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402

from kka_synth.agents.chat_agent import SYSTEM_PROMPT, AgentChat, chat_model_for, session_tools  # noqa: E402
from kka_synth.agents.hf_chat import (  # noqa: E402
    CHAT_MAX_NEW_TOKENS,
    TransformersChatModel,
    check_tool_template,
    message_dicts,
    parse_tool_calls,
)
from kka_synth.config import ConfigError, ProposerConfig  # noqa: E402
from kka_synth.utils.hub import ModelLoadError  # noqa: E402


# a stand-in session and a scripted tool-calling model -------------------------------------------------------
class StandInSession:
    """Three typed tools and a dispatcher that turns bad input into "error: ..." lines, like ChatSession."""

    TOOLS = ("add_constraint", "propose", "preview", "save_prompts")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.constraints: list[tuple[str, str, str]] = []

    def add_constraint(self, category: str, field: str, value: str) -> str:
        """Add a constraint to the prompt set of a category.

        Args:
            category: category name, or "*" for every category.
            field: exclude_types, only_types or size_max.
            value: the value, e.g. "stain" or "0.02".
        """
        if field not in ("exclude_types", "only_types", "size_max"):
            raise ValueError(f"unknown field {field!r}")
        self.constraints.append((category, field, value))
        return f"{category}: {field} {value}"

    def propose(self, category: str, n: int = 3) -> str:
        """Propose defect specs for a category under its constraints.

        Args:
            category: category name.
            n: how many specs.
        """
        return "\n".join(f"{k}. scratch on the {category}" for k in range(1, n + 1))

    def preview(self, category: str, n: int = 3) -> str:
        """Render the last proposals of a category and return the image paths.

        Args:
            category: category name.
            n: how many previews.
        """
        return "\n".join(str(self.root / f"{category}-{k}.png") for k in range(1, n + 1))

    def save_prompts(self, path: str | None = None) -> str:
        """Write the prompt set to a YAML file.

        Args:
            path: where to write; None keeps the session's file.
        """
        target = Path(path) if path else self.root / "prompts.yaml"
        target.write_text(json.dumps(self.constraints))
        return f"saved {target}"

    def call(self, tool: str, **arguments: Any) -> str:
        self.calls.append((tool, arguments))
        if tool not in self.TOOLS:
            return f"error: unknown tool {tool!r}"
        try:
            return getattr(self, tool)(**arguments)
        except ValueError as error:
            return f"error: {error}"


@pytest.fixture
def session(tmp_path: Path) -> StandInSession:
    return StandInSession(tmp_path)


# session_tools ----------------------------------------------------------------------------------------------
def test_session_tools_take_schema_from_hints_and_description_from_docstring(session: StandInSession) -> None:
    tools = session_tools(session)
    assert [tool.name for tool in tools] == list(StandInSession.TOOLS)
    propose = tools[1]
    assert propose.description.startswith("Propose defect specs for a category")
    schema = propose.tool_call_schema.model_json_schema()
    assert schema["required"] == ["category"]
    assert schema["properties"]["n"]["type"] == "integer"
    assert schema["properties"]["n"]["default"] == 3
    assert schema["properties"]["n"]["description"] == "how many specs."


def test_session_tools_route_through_call_and_never_raise(session: StandInSession) -> None:
    tools = {tool.name: tool for tool in session_tools(session)}
    assert (
        tools["propose"].invoke({"category": "washer", "n": "2"})
        == "1. scratch on the washer\n2. scratch on the washer"
    )
    assert session.calls == [("propose", {"category": "washer", "n": 2})]  # coerced by the schema
    assert tools["add_constraint"].invoke({"category": "washer", "field": "colour", "value": "red"}) == (
        "error: unknown field 'colour'"
    )
    bad = tools["propose"].invoke({"category": "washer", "n": "many"})
    assert bad.startswith("error: bad arguments (n:") and "\n" not in bad
    assert len(session.calls) == 2  # the schema stopped the bad call before the session


def test_session_tools_turn_a_crash_into_an_error_line(session: StandInSession) -> None:
    def crash(tool: str, **arguments: Any) -> str:
        raise RuntimeError("renderer exploded\ntraceback follows")

    session.call = crash  # type: ignore[method-assign]
    (preview,) = [tool for tool in session_tools(session) if tool.name == "preview"]
    assert (
        preview.invoke({"category": "washer"}) == "error: preview failed: renderer exploded traceback follows"
    )


def test_session_tools_refuse_an_undocumented_tool(session: StandInSession) -> None:
    class Undocumented(StandInSession):
        TOOLS = ("propose", "missing")

    with pytest.raises(ValueError, match="'missing' is not a method"):
        session_tools(Undocumented(session.root))


# AgentChat with a scripted model ----------------------------------------------------------------------------
def test_agent_runs_a_scripted_conversation_over_the_session(session: StandInSession, tmp_path: Path) -> None:
    model = scripted(
        # turn 1: a wrong field, the error reaches the model, which then fixes it
        AIMessage(
            "", tool_calls=[call("add_constraint", "c1", category="washer", field="colour", value="x")]
        ),
        AIMessage(
            "",
            tool_calls=[
                call("add_constraint", "c2", category="washer", field="exclude_types", value="stain")
            ],
        ),
        AIMessage("No more stains on the washer."),
        # turn 2: two calls in one message
        AIMessage(
            "",
            tool_calls=[
                call("propose", "c3", category="washer", n=2),
                call("preview", "c4", category="washer", n=2),
            ],
        ),
        AIMessage(f"Previews:\n{tmp_path / 'washer-1.png'}\n{tmp_path / 'washer-2.png'}"),
        # turn 3
        AIMessage("", tool_calls=[call("save_prompts", "c5", path=str(tmp_path / "set.yaml"))]),
        AIMessage("Saved."),
    )
    chat = AgentChat(model, session)
    assert "propose" in chat.greeting and "quit" in chat.greeting

    assert chat.respond("no stains on the washer") == "No more stains on the washer."
    assert model.bound == list(StandInSession.TOOLS)
    assert (
        chat.respond("show me two") == f"Previews:\n{tmp_path / 'washer-1.png'}\n{tmp_path / 'washer-2.png'}"
    )
    assert chat.respond("save to set.yaml") == "Saved."

    assert session.calls == [
        ("add_constraint", {"category": "washer", "field": "colour", "value": "x"}),
        ("add_constraint", {"category": "washer", "field": "exclude_types", "value": "stain"}),
        ("propose", {"category": "washer", "n": 2}),
        ("preview", {"category": "washer", "n": 2}),
        ("save_prompts", {"path": str(tmp_path / "set.yaml")}),
    ]
    assert json.loads((tmp_path / "set.yaml").read_text()) == [["washer", "exclude_types", "stain"]]
    # the error came back to the model as a tool result, not an exception
    second = model.seen[1]
    assert isinstance(second[-1], ToolMessage) and second[-1].content == "error: unknown field 'colour'"
    # the system prompt leads every request and the history carries over between turns
    assert all(seen[0].content == SYSTEM_PROMPT for seen in model.seen)
    last = model.seen[-1]
    assert [m.content for m in last if isinstance(m, HumanMessage)] == [
        "no stains on the washer",
        "show me two",
        "save to set.yaml",
    ]
    previews = [m for m in last if isinstance(m, ToolMessage) and m.name == "preview"]
    assert previews[0].content.splitlines() == [
        str(tmp_path / "washer-1.png"),
        str(tmp_path / "washer-2.png"),
    ]
    assert chat.messages[:-1] == last[1:] and chat.messages[-1].content == "Saved."


def test_agent_runs_the_calls_of_one_message_in_order_one_at_a_time(tmp_path: Path) -> None:
    events: list[str] = []

    class Slow(StandInSession):
        def propose(self, category: str, n: int = 3) -> str:
            """Propose defect specs for a category.

            Args:
                category: category name.
                n: how many specs.
            """
            events.append(f"start {category}")
            time.sleep(0.02)  # long enough for a parallel run to interleave
            events.append(f"end {category}")
            return category

    session = Slow(tmp_path)
    calls = [call("propose", f"c{k}", category=f"cat{k}") for k in range(4)]
    assert (
        AgentChat(scripted(AIMessage("", tool_calls=calls), AIMessage("done")), session).respond("go")
        == "done"
    )
    assert events == [f"{edge} cat{k}" for k in range(4) for edge in ("start", "end")]


def test_agent_survives_an_unknown_tool(session: StandInSession) -> None:
    model = scripted(
        AIMessage("", tool_calls=[call("delete_everything", "c1")]),
        AIMessage("I cannot do that."),
    )
    assert AgentChat(model, session).respond("delete it all") == "I cannot do that."
    assert "delete_everything is not a valid tool" in model.seen[1][-1].content
    assert session.calls == []


def test_agent_turns_a_model_failure_into_one_line_and_keeps_history(session: StandInSession) -> None:
    model = scripted(AIMessage("Hello."), AIMessage("Still here."), fail_on=(1,))
    chat = AgentChat(model, session, system_prompt="Be brief.")
    assert chat.respond("hi") == "Hello."
    history = list(chat.messages)
    reply = chat.respond("hi again")
    assert reply == "error: the chat model failed: ConnectionError: connection refused at 127.0.0.1:9"
    assert chat.messages == history
    assert chat.respond("hi once more") == "Still here."  # the chat goes on
    assert model.seen[0][0].content == "Be brief."
    assert [m.content for m in chat.messages] == ["hi", "Hello.", "hi once more", "Still here."]


def test_agent_stops_a_turn_that_never_ends(session: StandInSession) -> None:
    endless = [
        AIMessage("", tool_calls=[call("propose", f"c{k}", category="washer", n=1)]) for k in range(20)
    ]
    model = scripted(*endless)
    reply = AgentChat(model, session, max_steps=6).respond("propose")
    assert reply.startswith("error: the model did not finish within 6 steps")
    assert 1 <= len(session.calls) <= 3


def test_agent_refuses_an_empty_message(session: StandInSession) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        AgentChat(scripted(AIMessage("x")), session).respond("   ")


def test_agent_refines_the_prompt_set_of_a_real_session(tiny_proposer: Any, tmp_path: Path) -> None:
    import yaml

    from kka_synth.agents.chat import ChatSession
    from kka_synth.config import RunConfig

    session = ChatSession(
        RunConfig(),
        prompts_path=tmp_path / "prompts.yaml",
        preview_dir=tmp_path / "preview",
        proposer=tiny_proposer,
    )
    target = tmp_path / "refined.yaml"
    model = scripted(
        AIMessage(
            "", tool_calls=[call("add_constraint", "c1", category="washer", field="colour", value="red")]
        ),
        AIMessage(
            "",
            tool_calls=[call("add_constraint", "c2", category="wash", field="exclude_types", value="rust")],
        ),
        AIMessage("No rust on the washer."),
        AIMessage("", tool_calls=[call("propose", "c3", category="washer", n=2)]),
        AIMessage("", tool_calls=[call("approve", "c4", category="washer", numbers=[1])]),
        AIMessage("", tool_calls=[call("preview", "c5", category="washer", n=1)]),
        AIMessage("", tool_calls=[call("save_prompts", "c6", path=str(target))]),
        AIMessage(f"Saved to {target}."),
    )
    chat = AgentChat(model, session)
    assert chat.respond("no rust on the washer") == "No rust on the washer."
    assert chat.respond("propose two, keep the first, show it and save") == f"Saved to {target}."

    results = {
        m.name: m.content for m in chat.messages if isinstance(m, ToolMessage) and m.name != "add_constraint"
    }
    errors = [
        m.content for m in chat.messages if isinstance(m, ToolMessage) and m.content.startswith("error:")
    ]
    assert len(errors) == 1 and "unknown constraint field 'colour'" in errors[0] and "\n" not in errors[0]
    assert results["propose"].startswith("2 proposal(s) for washer:")
    pngs = [Path(line.strip()) for line in results["preview"].splitlines() if line.strip().endswith(".png")]
    assert pngs and all(path.is_file() and path.parent == tmp_path / "preview" for path in pngs)
    saved = yaml.safe_load(target.read_text())
    assert saved["dataset"] == "demo"
    assert saved["constraints"] == {"washer": {"exclude_types": ["rust"]}}
    assert len(saved["examples"]["washer"]) == 1
    assert session.category == "washer"


# TransformersChatModel --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_chat_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llm import save_tiny_chat_model

    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"), seed=0)


@pytest.fixture(scope="module")
def tiny_chat(tiny_chat_path: Path) -> TransformersChatModel:
    return TransformersChatModel.from_pretrained(str(tiny_chat_path), device="cpu", max_new_tokens=24)


class ScriptedLM:
    """Stands in for a causal LM: "generates" scripted replies after the prompt, records the prompts."""

    def __init__(self, tokenizer: Any, replies: list[str]) -> None:
        import torch

        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.prompts: list[str] = []
        self._parameter = torch.zeros(1)

    def parameters(self) -> Any:
        return iter([self._parameter])

    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        import torch

        assert kwargs["do_sample"] is False
        self.prompts.append(self.tokenizer.decode(input_ids[0]))
        reply = self.tokenizer(self.replies.pop(0) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([reply])], dim=1)


def test_parse_tool_calls_reads_one_two_and_malformed_blocks() -> None:
    text, calls = parse_tool_calls(
        'Sure.\n<tool_call>\n{"name": "propose", "arguments": {"category": "washer", "n": 2}}\n</tool_call>'
    )
    assert text == "Sure."
    assert [(c["name"], c["args"]) for c in calls] == [("propose", {"category": "washer", "n": 2})]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "tool_call"

    text, calls = parse_tool_calls(
        '<tool_call>{"name": "propose", "arguments": {"category": "washer"}}</tool_call>\n'
        '<tool_call>{"name": "preview", '
        '"arguments": "{\\"category\\": \\"washer\\", \\"n\\": 1}"}</tool_call>'
    )
    assert text == ""
    assert [(c["name"], c["args"]) for c in calls] == [
        ("propose", {"category": "washer"}),
        ("preview", {"category": "washer", "n": 1}),
    ]
    assert calls[0]["id"] != calls[1]["id"]

    malformed = '<tool_call>{"name": "propose", "arguments": {"category": </tool_call>'
    for body in (malformed, '<tool_call>["propose"]</tool_call>', '<tool_call>{"arguments": {}}</tool_call>'):
        text, calls = parse_tool_calls("Let me try. " + body)
        assert calls == [] and text == "Let me try. " + body
    text, calls = parse_tool_calls(
        malformed + '<tool_call>{"name": "save_prompts", "arguments": {}}</tool_call>'
    )
    assert text == malformed and [c["name"] for c in calls] == ["save_prompts"]
    assert parse_tool_calls("plain answer") == ("plain answer", [])


def test_tiny_model_bound_to_tools_answers_without_error(
    tiny_chat: TransformersChatModel, session: StandInSession
) -> None:
    bound = tiny_chat.bind_tools(session_tools(session))
    first = bound.invoke([HumanMessage("no stains on the washer")])
    assert isinstance(first, AIMessage) and isinstance(first.content, str)
    assert first.usage_metadata["output_tokens"] <= 24
    assert first.usage_metadata["input_tokens"] > 100  # the tool schemas are in the prompt
    again = bound.invoke([HumanMessage("no stains on the washer")])
    assert again.content == first.content  # greedy decoding replays
    with pytest.raises(ValueError, match="cannot force a tool call"):
        tiny_chat.bind_tools(session_tools(session), tool_choice="any")


def test_rendered_prompt_shows_tools_calls_and_results(
    tiny_chat: TransformersChatModel, session: StandInSession
) -> None:
    from langchain_core.utils.function_calling import convert_to_openai_tool

    schemas = [convert_to_openai_tool(tool) for tool in session_tools(session)]
    history = [
        HumanMessage("propose two"),
        AIMessage("", tool_calls=[call("propose", "c1", category="washer", n=2)]),
        ToolMessage("1. scratch\n2. dent", tool_call_id="c1", name="propose"),
    ]
    prompt = tiny_chat.render(history, schemas)
    assert all(f'"name": "{name}"' in prompt for name in StandInSession.TOOLS)
    assert '"description": "how many specs."' in prompt
    assert (
        '<tool_call>\n{"name": "propose", "arguments": {"category": "washer", "n": 2}}\n</tool_call>'
        in prompt
    )
    assert "<tool_response>\n1. scratch\n2. dent\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "propose" not in tiny_chat.render([HumanMessage("hi")])  # no tools bound, none rendered
    assert message_dicts(history)[1]["tool_calls"][0]["function"]["arguments"] == {
        "category": "washer",
        "n": 2,
    }


def test_transformers_model_drives_the_agent(
    tiny_chat: TransformersChatModel, session: StandInSession
) -> None:
    lm = ScriptedLM(
        tiny_chat.tokenizer,
        [
            '<tool_call>\n{"name": "add_constraint", "arguments": '
            '{"category": "washer", "field": "exclude_types", "value": "stain"}}\n</tool_call>',
            'Oops <tool_call>{"name": "propose", "arguments": </tool_call>',
        ],
    )
    model = TransformersChatModel(causal_lm=lm, tokenizer=tiny_chat.tokenizer, model_id="scripted")
    chat = AgentChat(model, session)
    reply = chat.respond("no stains on the washer")
    assert reply == 'Oops <tool_call>{"name": "propose", "arguments": </tool_call>'  # malformed: plain text
    assert session.calls == [
        ("add_constraint", {"category": "washer", "field": "exclude_types", "value": "stain"})
    ]
    assert "<tool_response>\nwasher: exclude_types stain\n</tool_response>" in lm.prompts[1]
    assert "scripted" in chat.greeting


def test_template_without_tools_is_refused(tiny_chat_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chat_path))
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigError, match="chat template ignores tools"):
        check_tool_template(tokenizer, "tiny")
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        check_tool_template(tokenizer, "tiny")


# chat_model_for ---------------------------------------------------------------------------------------------
def test_chat_model_for_each_backend(
    tiny_chat_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert chat_model_for(ProposerConfig(backend="compact")) is None

    with pytest.raises(ConfigError, match="vllm serve MODEL") as refused:
        chat_model_for(ProposerConfig(backend="vllm", model="Qwen/Qwen2.5-1.5B-Instruct"))
    assert "\n" not in str(refused.value)

    monkeypatch.delenv("KKA_TEST_KEY", raising=False)
    openai = ProposerConfig(backend="openai", model="gpt-test", api_key_env="KKA_TEST_KEY")
    with pytest.raises(ConfigError, match="set the environment variable KKA_TEST_KEY"):
        chat_model_for(openai)
    local = chat_model_for(ProposerConfig(**{**openai.__dict__, "base_url": "http://127.0.0.1:9/v1"}))
    assert local.openai_api_key.get_secret_value() == "EMPTY"
    monkeypatch.setenv("KKA_TEST_KEY", "sk-test")
    hosted = chat_model_for(ProposerConfig(**{**openai.__dict__, "temperature": 0.2, "timeout": 7.0}))
    assert hosted.openai_api_key.get_secret_value() == "sk-test"
    assert (hosted.model_name, hosted.temperature, hosted.request_timeout) == ("gpt-test", 0.2, 7.0)

    model = chat_model_for(ProposerConfig(backend="transformers", model=str(tiny_chat_path), device="cpu"))
    assert isinstance(model, TransformersChatModel) and model.max_new_tokens == CHAT_MAX_NEW_TOKENS
    with pytest.raises(ModelLoadError, match="proposer.model"):
        chat_model_for(ProposerConfig(backend="transformers", model=str(tmp_path / "missing"), device="cpu"))


# ChatOpenAI over HTTP ---------------------------------------------------------------------------------------
def test_openai_chat_model_drives_the_agent_over_http(session: StandInSession) -> None:
    pytest.importorskip("langchain_openai")
    from fake_openai import serve

    tool_call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "propose", "arguments": json.dumps({"category": "washer", "n": 2})},
    }
    replies = [
        {"role": "assistant", "content": None, "tool_calls": [tool_call]},
        "Two specs above.",
        500,
        500,
    ]
    with serve(replies) as server:
        config = ProposerConfig(
            backend="openai", model="fake-model", base_url=server.base_url, api_key_env="KKA_NONE"
        )
        chat = AgentChat(chat_model_for(config), session)
        assert chat.respond("propose two for the washer") == "Two specs above."
        failed = chat.respond("and again")
    assert session.calls == [("propose", {"category": "washer", "n": 2})]
    first, second = server.requests[:2]
    assert [tool["function"]["name"] for tool in first["tools"]] == list(StandInSession.TOOLS)
    assert first["tools"][1]["function"]["parameters"]["properties"]["n"]["type"] == "integer"
    assert first["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert second["messages"][-1]["role"] == "tool" and second["messages"][-1]["tool_call_id"] == "call_1"
    assert second["messages"][-1]["content"] == "1. scratch on the washer\n2. scratch on the washer"
    assert failed.startswith("error: the chat model failed: ") and "Error code: 500" in failed
    assert "\n" not in failed
    assert len(chat.messages) == 4  # the failed turn left no trace

"""A scripted tool-calling chat model: drives a langchain agent offline through a fixed conversation.

langchain's fake chat models do not implement ``bind_tools``; this one binds to any tools and replays its
scripted AI messages (tool calls included), recording what it was shown.
"""

from __future__ import annotations

from typing import Any

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatResult


class ScriptedToolModel(FakeMessagesListChatModel):
    """Replays scripted AI messages whatever tools it is bound to; records what it was shown."""

    seen: list[list[BaseMessage]] = []
    bound: list[str] = []
    fail_on: tuple[int, ...] = ()
    """Calls (counted from 0) that raise a connection error instead of answering."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedToolModel:
        self.bound = [tool.name for tool in tools]
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.seen.append(list(messages))
        if len(self.seen) - 1 in self.fail_on:
            raise ConnectionError("connection refused\nat 127.0.0.1:9")
        return super()._generate(messages, *args, **kwargs)


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": call_id, "type": "tool_call"}


def scripted(*responses: AIMessage, fail_on: tuple[int, ...] = ()) -> ScriptedToolModel:
    return ScriptedToolModel(responses=list(responses), seen=[], fail_on=fail_on)

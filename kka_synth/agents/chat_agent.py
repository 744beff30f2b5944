"""The tool-calling agent of ``kka-synth chat``: an LLM that refines the prompt set through session tools.

The user talks; an instruct LLM answers by calling the tools of a chat session (constrain, propose, preview,
approve, save; see ``ChatSession.TOOLS``) through langchain's agent loop (``langchain.agents.create_agent``),
and the approved prompt set feeds the next ``kka-synth run --prompts FILE``. The prompt set narrows what the
proposer of the KKA loop ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs",
arXiv 2502.14880) is asked for.

- :func:`session_tools` turns each session method into a langchain tool whose arguments schema comes from the
  method's type hints and whose description comes from its docstring. Every call goes through
  ``session.call``, so bad input reaches the model as an ``error: ...`` line, never as an exception.
- :class:`AgentChat` keeps the conversation and returns the final assistant text of each turn; a model or
  HTTP failure becomes one ``error: ...`` line and leaves the history as it was before the turn.
- :func:`chat_model_for` picks the chat model the proposer config names: none for the compact LM (the caller
  falls back to the offline intent parser, ``kka_synth.agents.chat_intent``), ``ChatOpenAI`` for any
  OpenAI-compatible endpoint (a vLLM server included), or
  :class:`~kka_synth.agents.hf_chat.TransformersChatModel` for a local instruct model.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

try:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
    from langchain_core.tools import BaseTool, StructuredTool
    from pydantic import ValidationError
except ImportError as missing:  # the agents extra brings langchain and langchain-core
    raise ImportError(
        f'the chat agent needs langchain ({missing}); pip install "kka-synth[agents]"'
    ) from None

from kka_synth.agents.hf_chat import CHAT_MAX_NEW_TOKENS, TransformersChatModel
from kka_synth.config import ConfigError, ProposerConfig
from kka_synth.prompts.templates import render_prompt
from kka_synth.utils.imports import require

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = render_prompt("chat_agent_system").rstrip()
"""What the agent is told before the conversation; ``AgentChat(system_prompt=...)`` replaces it."""


MAX_STEPS = 24
"""Model and tool steps one turn may take before it is stopped (langgraph's recursion limit)."""


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


# tools ----------------------------------------------------------------------------------------------------
def _validation_message(error: ValidationError) -> str:
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'arguments'}: {item['msg']}"
        for item in error.errors()
    ]
    return "error: bad arguments (" + "; ".join(problems) + ")"


def _session_tool(session: Any, name: str, lock: threading.Lock) -> StructuredTool:
    method = getattr(session, name, None)
    if not callable(method):
        raise ValueError(f"session tool {name!r} is not a method of {type(session).__name__}")
    if not (method.__doc__ or "").strip():
        raise ValueError(
            f"session tool {name!r} has no docstring; the model reads it as the tool description"
        )
    # The schema and description are read off the bound method (type hints and Google-style docstring); the
    # tool itself runs through the session's dispatcher.
    described = StructuredTool.from_function(
        method, name=name, parse_docstring=True, error_on_invalid_docstring=False
    )

    def run(**arguments: Any) -> str:
        logger.debug("tool %s(%s)", name, arguments)
        try:
            with lock:
                return str(session.call(name, **arguments))
        except Exception as error:  # a tool failure is news for the model, not the end of the conversation
            logger.warning(
                "tool %s failed: %s", name, _one_line(error), exc_info=logger.isEnabledFor(logging.DEBUG)
            )
            return f"error: {name} failed: {_one_line(error)}"

    return StructuredTool(
        name=name,
        description=described.description,
        args_schema=described.args_schema,
        func=run,
        handle_validation_error=_validation_message,
    )


def session_tools(session: Any) -> list[BaseTool]:
    """One langchain tool per name in ``session.TOOLS``, in that order.

    Each tool's arguments schema comes from the bound method's type hints, its description and argument help
    from the method's docstring. Invoking it calls ``session.call(name, **arguments)``: input the session
    rejects, arguments that fail the schema, and any other failure come back as ``error: ...`` text. The
    session is not thread-safe, so the tools hold one lock: calls never overlap.

    Raises:
        ValueError: a name in ``session.TOOLS`` is not a documented method of the session.
    """
    names = getattr(session, "TOOLS", None)
    if not names:
        raise ValueError(f"{type(session).__name__} lists no tools (a TOOLS tuple of method names)")
    lock = threading.Lock()
    return [_session_tool(session, name, lock) for name in names]


# the agent ------------------------------------------------------------------------------------------------
class AgentChat:
    """A conversation with a tool-calling chat model over a chat session's tools.

    Args:
        chat_model: a langchain chat model that implements ``bind_tools`` (``ChatOpenAI``,
            :class:`TransformersChatModel`, ...).
        session: the chat session whose ``TOOLS`` the model may call (``kka_synth.agents.chat.ChatSession``).
        system_prompt: replaces :data:`SYSTEM_PROMPT`.
        max_steps: model and tool steps one turn may take.
    """

    def __init__(
        self,
        chat_model: BaseChatModel,
        session: Any,
        system_prompt: str | None = None,
        *,
        max_steps: int = MAX_STEPS,
    ) -> None:
        require("langchain")
        from langchain.agents import create_agent

        if max_steps < 2:
            raise ValueError(f"max_steps must be >= 2 (one model call and one tool call), got {max_steps}")
        self.session = session
        self.tools = session_tools(session)
        self.max_steps = max_steps
        self.messages: list[BaseMessage] = []
        """The conversation so far (without the system prompt), as the agent returned it."""
        self._agent = create_agent(chat_model, tools=self.tools, system_prompt=system_prompt or SYSTEM_PROMPT)
        name = getattr(chat_model, "model_name", None) or getattr(chat_model, "model_id", None)
        self.greeting = (
            f"Chat with {name or type(chat_model).__name__} about the defect prompt set. Ask for constraints "
            '("no stains on the washer", "only small scratches near the edge"), proposals and previews, '
            "approve the ones you like and save the prompt set for `kka-synth run --prompts FILE`. "
            "Tools: " + ", ".join(tool.name for tool in self.tools) + ". Type quit to leave."
        )

    def respond(self, text: str) -> str:
        """The assistant's final answer to ``text``, after any tool calls it makes; the history is kept.

        A failing model (an unreachable endpoint, a malformed reply) or a turn that does not finish within
        ``max_steps`` gives one ``error: ...`` line, and the turn is left out of the history.
        """
        if not text.strip():
            raise ValueError("respond needs a non-empty message")
        from langgraph.errors import GraphRecursionError

        request = [*self.messages, HumanMessage(text)]
        try:
            # one tool at a time, in the order the model asked for them (langgraph runs them in parallel)
            config = {"recursion_limit": self.max_steps, "max_concurrency": 1}
            state = self._agent.invoke({"messages": request}, config=config)
        except GraphRecursionError:
            logger.warning("the agent did not finish within %d steps", self.max_steps)
            return f"error: the model did not finish within {self.max_steps} steps; ask more simply"
        except Exception as error:  # HTTP, model and parsing failures end the turn, not the chat
            logger.debug("the chat model failed", exc_info=True)
            return f"error: the chat model failed: {type(error).__name__}: {_one_line(error)}"[:500]
        self.messages = list(state["messages"])
        for message in reversed(self.messages):
            if isinstance(message, AIMessage):
                return message.text.strip()
        return ""

    def reset(self) -> None:
        """Forget the conversation (the session and its prompt set are untouched)."""
        self.messages = []


# chat models ----------------------------------------------------------------------------------------------
def chat_model_for(config: ProposerConfig) -> BaseChatModel | None:
    """The chat model ``config`` (the ``proposer`` section) names, or None for the compact backend.

    - compact: None; the compact LM cannot converse, so the caller uses the offline intent parser;
    - openai: ``ChatOpenAI`` on ``model`` at ``base_url`` (OpenAI when None), the API key read from the
      variable ``api_key_env`` ("EMPTY" for a local server without one), ``temperature`` and ``timeout``;
    - transformers: :class:`TransformersChatModel` loaded from ``model`` on ``device`` in ``dtype``;
    - vllm: refused; serve the model with vLLM's OpenAI-compatible server and use the openai backend.

    Raises:
        ConfigError: the vllm backend, or OpenAI itself without an API key.
        ImportError: langchain-openai is missing (it names the ``agents`` extra).
        ModelLoadError: the transformers model or tokenizer cannot be loaded.
    """
    if config.backend == "compact":
        return None
    if config.backend == "vllm":
        raise ConfigError(
            "chat with a vLLM model goes through its OpenAI-compatible server: run `vllm serve MODEL`, then "
            "set proposer.backend openai and proposer.base_url http://HOST:8000/v1"
        )
    if config.backend == "openai":
        require("langchain_openai")
        from langchain_openai import ChatOpenAI

        key = os.environ.get(config.api_key_env)
        if not key and config.base_url is None:
            raise ConfigError(
                f"the OpenAI API key is missing: set the environment variable {config.api_key_env} "
                "(proposer.api_key_env), or point proposer.base_url at a local server"
            )
        return ChatOpenAI(
            model=config.model,
            base_url=config.base_url,
            api_key=key or "EMPTY",  # local servers ignore the key but the client wants one
            temperature=config.temperature,
            timeout=config.timeout,
            max_retries=1,
            use_responses_api=False,  # chat completions: what vLLM, Ollama and the like serve
        )
    if config.backend == "transformers":
        return TransformersChatModel.from_pretrained(
            config.model or "",
            device=config.device,
            dtype=config.dtype,
            max_new_tokens=max(config.max_new_tokens, CHAT_MAX_NEW_TOKENS),
        )
    raise ConfigError(f"proposer.backend {config.backend!r} has no chat model")

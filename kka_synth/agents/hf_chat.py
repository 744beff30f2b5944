"""A local transformers causal LM as a langchain tool-calling chat model, for ``kka-synth chat``.

:class:`TransformersChatModel` lets the chat agent (:class:`~kka_synth.agents.chat_agent.AgentChat`) run on
the same instruct model the ``transformers`` proposer samples specs from, with no server. The model must have
a chat template that renders tools, as Qwen2.5's and other Hermes-style templates do:

- tools go to ``apply_chat_template(..., tools=...)`` as OpenAI-style JSON schemas, and
  :func:`check_tool_template` renders a probe tool once to check that the template shows them to the model;
- langchain messages, tool calls and tool results become the template's message dicts (:func:`message_dicts`);
- decoding is greedy, so a conversation replays identically;
- ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks in the reply become langchain tool
  calls (:func:`parse_tool_calls`); a malformed block stays in the text.

The tokenizer is loaded as the ``transformers`` proposer loads it
(:func:`~kka_synth.agents.hf.load_chat_tokenizer`).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, BaseMessage, ToolCall, ToolMessage
    from langchain_core.outputs import ChatGeneration, ChatResult
    from langchain_core.runnables import Runnable
    from langchain_core.tools import BaseTool
    from langchain_core.utils.function_calling import convert_to_openai_tool
    from pydantic import ConfigDict
except ImportError as missing:  # the agents extra brings langchain and langchain-core
    raise ImportError(
        f'the transformers chat model needs langchain-core ({missing}); pip install "kka-synth[agents]"'
    ) from None

from kka_synth.config import ConfigError

logger = logging.getLogger(__name__)

CHAT_MAX_NEW_TOKENS = 512
"""Fewest new tokens a local chat reply may use. ``proposer.max_new_tokens`` is sized for one spec (64 by
default), which cuts a chat answer short, so the transformers chat model gets at least this many."""

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
"""One Hermes / Qwen2.5 tool-call block; its body is ``{"name": ..., "arguments": {...}}``."""

END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
"""End-of-turn tokens cut from a decoded reply when the tokenizer does not list them as special."""

PROBE_TOOL = "kka_probe_tool"
"""Name of the tool rendered once to check that a chat template shows tools to the model."""


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """Split a reply into its plain text and its ``<tool_call>`` blocks, parsed into langchain tool calls.

    A block whose body is not ``{"name": str, "arguments": object}`` (JSON; arguments may also be a JSON
    string of an object) stays in the text as written, so the model's slip is visible and nothing raises.
    Each parsed call gets a fresh id.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    start = 0
    for match in TOOL_CALL.finditer(text):
        kept.append(text[start : match.start()])
        start = match.end()
        call = _tool_call(match.group(1))
        if call is None:
            kept.append(match.group(0))
        else:
            calls.append(call)
    kept.append(text[start:])
    return "".join(kept).strip(), calls


def _tool_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
        arguments = data.get("arguments", {}) if isinstance(data, dict) else None
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(arguments, dict):
        return None
    return ToolCall(name=data["name"], args=arguments, id=f"call_{uuid.uuid4().hex[:16]}", type="tool_call")


def message_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """Langchain messages as the ``messages`` of ``apply_chat_template`` (tool calls in OpenAI's shape)."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, AIMessage):
            entry: dict[str, Any] = {"role": "assistant", "content": message.text}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {
                        "type": "function",
                        "id": call["id"],
                        "function": {"name": call["name"], "arguments": call["args"]},
                    }
                    for call in message.tool_calls
                ]
            rendered.append(entry)
        elif isinstance(message, ToolMessage):
            rendered.append(
                {
                    "role": "tool",
                    "content": message.text,
                    "name": message.name,
                    "tool_call_id": message.tool_call_id,
                }
            )
        elif message.type in ("system", "human"):
            rendered.append(
                {"role": "system" if message.type == "system" else "user", "content": message.text}
            )
        else:
            raise ValueError(f"cannot render a {message.type!r} message into a chat template")
    return rendered


class TransformersChatModel(BaseChatModel):
    """A local transformers causal LM as a langchain tool-calling chat model.

    The tokenizer's chat template must render tools (``apply_chat_template(..., tools=...)``), as Qwen2.5's
    and other Hermes-style templates do; the model answers with ``<tool_call>`` blocks, which
    :func:`parse_tool_calls` reads. Decoding is greedy, so a conversation replays identically. Build one with
    :meth:`from_pretrained`.

    Args:
        causal_lm: the ``PreTrainedModel`` (already on its device, in eval mode).
        tokenizer: its tokenizer, with a chat template that renders tools.
        model_id: the Hub id or path it was loaded from (for logs and the greeting).
        max_new_tokens: longest reply in tokens.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    causal_lm: Any
    tokenizer: Any
    model_id: str = "local"
    max_new_tokens: int = CHAT_MAX_NEW_TOKENS

    def model_post_init(self, context: Any, /) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check_tool_template(self.tokenizer, self.model_id)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
    ) -> TransformersChatModel:
        """Load model and tokenizer from ``name_or_path`` (``proposer.model``) onto ``device`` in ``dtype``.

        ``dtype`` auto is bfloat16 on cuda and float32 elsewhere.

        Raises:
            ModelLoadError: the weights or tokenizer cannot be loaded, or the tokenizer has no chat template
                (one line naming ``proposer.model``).
            ConfigError: the chat template ignores tools.
        """
        from transformers import AutoModelForCausalLM

        from kka_synth.agents.hf import FIELD, load_chat_tokenizer
        from kka_synth.utils.devices import resolve_device, resolve_dtype
        from kka_synth.utils.hub import load_pretrained

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device, cuda_auto="bfloat16")
        tokenizer = load_chat_tokenizer(name_or_path)
        check_tool_template(tokenizer, name_or_path)
        causal_lm = load_pretrained(
            AutoModelForCausalLM.from_pretrained, name_or_path, "the chat model", FIELD, dtype=torch_dtype
        )
        causal_lm.to(torch_device).eval()
        logger.info("chat model %s on %s (%s)", name_or_path, torch_device, torch_dtype)
        return cls(
            causal_lm=causal_lm, tokenizer=tokenizer, model_id=name_or_path, max_new_tokens=max_new_tokens
        )

    @property
    def _llm_type(self) -> str:
        return "kka-synth-transformers-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "max_new_tokens": self.max_new_tokens}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """This model with ``tools`` (converted to OpenAI-style schemas) rendered into every prompt.

        Only ``tool_choice`` None, "auto" and "none" are honoured: greedy decoding cannot force a call.
        """
        if tool_choice not in (None, "auto", "none"):
            raise ValueError(f"TransformersChatModel cannot force a tool call (tool_choice {tool_choice!r})")
        schemas = [] if tool_choice == "none" else [convert_to_openai_tool(tool) for tool in tools]
        return self.bind(tools=schemas, **kwargs)

    def render(self, messages: Sequence[BaseMessage], tools: Sequence[dict[str, Any]] | None = None) -> str:
        """The prompt the model reads for ``messages`` and ``tools``, ending with the assistant's turn."""
        return self.tokenizer.apply_chat_template(
            message_dicts(messages),
            tools=list(tools) if tools else None,
            add_generation_prompt=True,
            tokenize=False,
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        import torch

        prompt = self.render(messages, tools)
        device = next(self.causal_lm.parameters()).device
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.causal_lm.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                eos_token_id=self._end_ids(),
            )  # (1, prompt + new)
        new_ids = output[0, prompt_length:]
        text = self._decode(new_ids.tolist())
        for marker in stop or ():
            text = text.split(marker, 1)[0]
        content, calls = parse_tool_calls(text)
        usage = {
            "input_tokens": prompt_length,
            "output_tokens": len(new_ids),
            "total_tokens": prompt_length + len(new_ids),
        }
        message = AIMessage(content=content, tool_calls=calls, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _end_ids(self) -> list[int]:
        """Token ids that end a turn: the eos token and any ChatML-style end marker the vocabulary has."""
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[marker] for marker in END_MARKERS if marker in vocab}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _decode(self, ids: list[int]) -> str:
        """The reply's text without end and padding tokens (tool-call markers are kept even when special)."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        for token in (*self.tokenizer.all_special_tokens, *END_MARKERS):
            if token and token not in ("<tool_call>", "</tool_call>"):
                text = text.replace(token, "")
        return text.strip()


def check_tool_template(tokenizer: Any, name: str) -> None:
    """Raise ConfigError unless ``tokenizer`` has a chat template that shows tools to the model."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"proposer.model {name!r}: the tokenizer has no chat template; chat needs an instruct model "
            "whose template renders tools (e.g. Qwen/Qwen2.5-1.5B-Instruct)"
        )
    probe = convert_to_openai_tool(
        {"name": PROBE_TOOL, "description": "probe", "parameters": {"type": "object"}}
    )
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], add_generation_prompt=True, tokenize=False
        )
    except Exception as error:  # a template may reject the tools argument in many ways
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise ConfigError(f"proposer.model {name!r}: the chat template fails with tools ({reason})") from None
    if PROBE_TOOL not in rendered:
        raise ConfigError(
            f"proposer.model {name!r}: the chat template ignores tools, so the model cannot call them; use "
            "an instruct model whose template renders tools (e.g. Qwen/Qwen2.5-1.5B-Instruct)"
        )

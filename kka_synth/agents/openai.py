"""A proposer backed by any OpenAI-compatible chat endpoint (OpenAI, a vLLM server, Ollama), via langchain.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880) asks
an instruct LLM for anomaly descriptions of a category. This backend sends the shared request of
:class:`~kka_synth.agents.llm.LLMProposer` to a chat-completions endpoint through langchain-openai's
``ChatOpenAI``. With ``proposer.constrained`` the request carries OpenAI structured output (a strict
``json_schema`` response format built from the category's knowledge, narrowed by the user's constraints), so
a compliant server can only write valid specs. Either way the proposal keeps the raw message text, which our
own parser reads: langchain's parsed object is never used, so every backend is judged by the same rules.

Requests run concurrently (``proposer.concurrency``). A failed request becomes a ``no_reply`` that the base
class asks again. When every request fails and none of the same :meth:`~OpenAIProposer.propose` has
succeeded, :class:`~kka_synth.agents.llm.ProposerError` says which endpoint and why, so a run stops clearly
instead of producing nothing; one flaky retry after good replies does not stop it. The API key is read
from the environment variable ``proposer.api_key_env`` and is never logged or stored on the proposer.

The endpoint is a black box, so this proposer is not trainable by DPO; its texts still feed preference
pairs, which a trainable backend can learn from.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from kka_synth.agents.base import ProposalContext
from kka_synth.agents.guidance import spec_json_schema
from kka_synth.agents.llm import LLMProposer, Message, ProposerError
from kka_synth.config import ConfigError, ProposerConfig
from kka_synth.types import Proposal
from kka_synth.utils.imports import require

logger = logging.getLogger(__name__)

SCHEMA_TITLE = "defect_spec"
"""The name OpenAI's structured output gives the spec schema (letters, digits, ``_`` and ``-`` only)."""

OPENAI_URL = "https://api.openai.com/v1"
"""Where requests go when ``proposer.base_url`` is None (named in errors)."""


class OpenAIProposer(LLMProposer):
    """Proposes specs through an OpenAI-compatible chat endpoint.

    Args:
        config: the ``proposer`` section: ``model`` (the endpoint's model name), ``base_url`` (None for
            OpenAI), ``api_key_env``, sampling, ``max_new_tokens``, ``timeout``, ``concurrency``,
            ``constrained`` and retries.
        seed: the model's default sampling seed; :meth:`propose` seeds each request on its own.

    Raises:
        ImportError: langchain-openai is missing (it names the ``agents`` extra).
        ConfigError: ``base_url`` is None (OpenAI itself) and the API key variable is unset.
    """

    trainable = False

    def __init__(self, config: ProposerConfig, seed: int = 0) -> None:
        require("langchain_openai")
        from langchain_openai import ChatOpenAI

        super().__init__(config)
        if not config.model:
            raise ConfigError("proposer.model must name the endpoint's model for backend 'openai'")
        key = os.environ.get(config.api_key_env)
        if not key and config.base_url is None:
            raise ConfigError(
                f"the OpenAI API key is missing: set the environment variable {config.api_key_env} "
                "(proposer.api_key_env), or point proposer.base_url at a local server"
            )
        self.seed = seed
        self._schema: dict[str, Any] | None = None
        self._replied = False  # whether any request of the current propose() got a reply
        self._llm = ChatOpenAI(
            model=config.model,
            base_url=config.base_url,
            api_key=key or "EMPTY",  # local servers ignore the key but the client wants one
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            timeout=config.timeout,
            max_retries=1,  # one HTTP-level retry; the proposer's own retries come on top
            seed=seed,
        )

    @property
    def endpoint(self) -> str:
        """The base URL requests go to."""
        return self.config.base_url or OPENAI_URL

    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        """``n`` proposals for ``context``, with structured output for its category when constrained."""
        if self.config.constrained:
            schema = spec_json_schema(context.constraints.narrow(context.knowledge))
            self._schema = {"title": SCHEMA_TITLE, **schema}
        else:
            self._schema = None
        self._replied = False
        return super().propose(context, n, seed)

    def generate(self, conversations: Sequence[Sequence[Message]], seed: int) -> list[str | None]:
        """One reply per conversation (request ``i`` is seeded ``seed + i``); None where a request failed.

        Raises:
            ProposerError: every request failed and no earlier request of this :meth:`propose` got a reply
                (the endpoint is down, say); the message names the endpoint and the first error.
        """
        from langchain_core.messages import convert_to_messages
        from langchain_core.runnables import RunnableLambda

        jobs = [
            (self._runnable(seed + i), convert_to_messages([dict(m) for m in conversation]))
            for i, conversation in enumerate(conversations)
        ]
        results = RunnableLambda(lambda job: job[0].invoke(job[1])).batch(
            jobs, config={"max_concurrency": self.config.concurrency}, return_exceptions=True
        )
        replies: list[str | None] = []
        errors: list[BaseException] = []
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                errors.append(result)
                logger.debug(
                    "request %d of %d to %s failed", i + 1, len(jobs), self.endpoint, exc_info=result
                )
                replies.append(None)
            else:
                replies.append(_reply_text(result))
        if errors:
            logger.warning(
                "%d of %d requests to %s failed (asked again if retries are left); first error: %s",
                len(errors),
                len(jobs),
                self.endpoint,
                _describe(errors[0]),
            )
        self._replied = self._replied or len(errors) < len(jobs)
        if jobs and not self._replied:
            raise ProposerError(
                f"every request to {self.endpoint} (model {self.config.model!r}) failed; "
                f"first error: {_describe(errors[0])}"
            )
        return replies

    def _runnable(self, seed: int) -> Any:
        """The chat model bound to ``seed``, with the spec's structured output when one is set."""
        if self._schema is None:
            return self._llm.bind(seed=seed)
        return self._llm.with_structured_output(
            self._schema, method="json_schema", include_raw=True, strict=True, seed=seed
        )


def _reply_text(result: Any) -> str:
    """The text the model wrote: the raw message of structured output, or the plain message."""
    message = result["raw"] if isinstance(result, dict) else result
    text = str(message.text)
    if not text.strip():
        refusal = message.additional_kwargs.get("refusal")
        if refusal:
            return str(refusal)
    return text


def _describe(error: BaseException) -> str:
    """One line: the error's type and first line, and the root cause's when it adds something."""

    def first_line(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0][:200] if text else ""

    text = f"{type(error).__name__}: {first_line(error)}".rstrip(": ")
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    root = first_line(chain[-1])
    if len(chain) > 1 and root and root not in text:
        text += f" ({root})"
    return text

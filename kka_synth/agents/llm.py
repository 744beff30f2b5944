"""What every LLM proposer shares: one prompt construction, parsing with retries, and failure accounting.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880) asks
an instruct LLM, given anomaly-related knowledge of a category, for anomaly descriptions. Here the request is
built once for every backend (:meth:`LLMProposer.messages_for`, from the templates in prompts/): the
category's knowledge narrowed by the user's constraints, a few earlier hard specs of this run as examples,
the constraints as instructions, and optionally a caption of a normal image. A backend only turns
conversations into replies (:meth:`LLMProposer.generate`).

Every reply is parsed (:func:`kka_synth.agents.parsing.parse_reply`: JSON, then lenient extraction, then
validation against the category and the constraints). A reply that fails is asked again up to
``proposer.max_retries`` times, with the parser's error fed back as the next user message; the
:class:`~kka_synth.types.Proposal` keeps the last reply and the reasons of the failed ones, so the iteration
stats count failures and retries by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

from kka_synth.agents.base import ProposalContext
from kka_synth.agents.guidance import retry_message
from kka_synth.agents.parsing import parse_reply
from kka_synth.config import ProposerConfig
from kka_synth.prompts.templates import chat_messages
from kka_synth.types import Proposal

logger = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": ...}``."""

NO_REPLY = "no_reply"
"""Reason code of a request that returned nothing (a failed HTTP call, say)."""

RETRY_SEED_STRIDE = 1_000_003
"""Seed offset between a request and its retries, so a retry samples anew."""


class ProposerError(RuntimeError):
    """A proposer cannot produce anything (an unreachable endpoint, say); the message is one line."""


class LLMProposer:
    """Base of the transformers, vLLM and OpenAI-compatible proposers.

    Subclasses implement :meth:`generate` and, when they know their chat template, :meth:`prompt_text`.

    Args:
        config: the ``proposer`` section (sampling, retries, few-shot count).
    """

    trainable: bool = False
    """Whether DPO can train it (it then exposes ``model``, ``tokenizer`` and ``apply_adapter``)."""

    def __init__(self, config: ProposerConfig) -> None:
        self.config = config

    # the request -------------------------------------------------------------------------------------
    def messages_for(self, context: ProposalContext) -> list[Message]:
        """System and user messages for one spec of ``context.category``."""
        knowledge = context.constraints.narrow(context.knowledge)
        examples = context.examples[-self.config.examples :] if self.config.examples else []
        return chat_messages(knowledge, examples, context.constraints.lines(), caption=context.caption)

    def prompt_text(self, messages: Sequence[Message]) -> str:
        """The prompt as the model reads it; what DPO pairs are keyed and trained on.

        The base renders roles as plain text; backends with a tokenizer apply its chat template.
        """
        return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "

    def generate(self, conversations: Sequence[Sequence[Message]], seed: int) -> list[str | None]:
        """One sampled reply per conversation (None where the request failed), seeded by ``seed``."""
        raise NotImplementedError

    # proposing ---------------------------------------------------------------------------------------
    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        """``n`` proposals for ``context``; failed replies are asked again with the parser's error."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        messages = self.messages_for(context)
        prompt = self.prompt_text(messages)
        replies = self._generate(messages, [messages] * n, seed)
        results = [self._parse(reply, context, prompt) for reply in replies]
        for attempt in range(1, self.config.max_retries + 1):
            failed = [i for i, (proposal, _) in enumerate(results) if proposal.spec is None]
            if not failed:
                break
            conversations = [self._retry_conversation(messages, *results[i], context) for i in failed]
            replies = self._generate(messages, conversations, seed + attempt * RETRY_SEED_STRIDE)
            for i, reply in zip(failed, replies, strict=True):
                earlier = results[i][0]
                proposal, detail = self._parse(reply, context, prompt)
                proposal.retries = [*earlier.retries, earlier.error or "unknown"]
                results[i] = (proposal, detail)
        proposals = [proposal for proposal, _ in results]
        self._log(context.category, proposals)
        return proposals

    def _generate(
        self, messages: Sequence[Message], conversations: Sequence[Sequence[Message]], seed: int
    ) -> list[str | None]:
        replies = self.generate(conversations, seed)
        if len(replies) != len(conversations):
            raise ProposerError(
                f"{type(self).__name__} returned {len(replies)} replies for {len(conversations)} requests"
            )
        return list(replies)

    @staticmethod
    def _parse(reply: str | None, context: ProposalContext, prompt: str) -> tuple[Proposal, str]:
        if reply is None:
            return Proposal(prompt=prompt, text="", spec=None, error=NO_REPLY), "the request failed"
        return parse_reply(reply, context, prompt)

    @staticmethod
    def _retry_conversation(
        messages: Sequence[Message], proposal: Proposal, detail: str, context: ProposalContext
    ) -> list[Message]:
        """The original request again after a failed request, else with the reply and the parser's error."""
        if proposal.error == NO_REPLY:
            return list(messages)
        feedback = retry_message(proposal.error or "not_json", detail, context)
        return [
            *messages,
            {"role": "assistant", "content": proposal.text},
            {"role": "user", "content": feedback},
        ]

    def _log(self, category: str, proposals: Sequence[Proposal]) -> None:
        parsed = sum(p.spec is not None for p in proposals)
        retried = [p for p in proposals if p.retries]
        if parsed < len(proposals) or retried:
            failures = Counter(p.error for p in proposals if p.spec is None)
            logger.info(
                "%s: %d of %d replies parsed, %d after retries; still failing: %s",
                category,
                parsed,
                len(proposals),
                sum(p.spec is not None for p in retried),
                dict(failures) or "none",
            )

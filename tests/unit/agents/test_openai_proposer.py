"""OpenAIProposer against a local fake OpenAI-compatible server: parsing, retries, schema, failures."""

from __future__ import annotations

import json
import logging
import socket

import pytest

pytest.importorskip("langchain_openai")

from fake_openai import Reply, as_reply, serve  # noqa: E402

from kka_synth.agents.base import ProposalContext  # noqa: E402
from kka_synth.agents.constraints import Constraints  # noqa: E402
from kka_synth.agents.guidance import retry_message  # noqa: E402
from kka_synth.agents.llm import LLMProposer, ProposerError  # noqa: E402
from kka_synth.agents.openai import OpenAIProposer  # noqa: E402
from kka_synth.agents.parsing import parse_reply  # noqa: E402
from kka_synth.config import ConfigError, ProposerConfig  # noqa: E402

WASHER_TYPES = ["scratch", "dent", "rust", "crack", "edge_chip", "burr"]


def spec_text(defect_type: str = "scratch", severity: float = 0.3, region: str = "top") -> str:
    return json.dumps(
        {
            "defect_type": defect_type,
            "description": f"a thin {defect_type} on the ring",
            "region": region,
            "size": 0.01,
            "shape": "scratch",
            "tone": "darker",
            "severity": severity,
        }
    )


def make(base_url: str | None, **changes: object) -> OpenAIProposer:
    settings = {"backend": "openai", "model": "test-model", "base_url": base_url, "concurrency": 1, **changes}
    return OpenAIProposer(ProposerConfig(**settings), seed=0)


@pytest.fixture
def washer() -> ProposalContext:
    return ProposalContext.for_category("washer", "demo")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_washer_types_are_what_the_tests_assume(washer: ProposalContext) -> None:
    assert list(washer.knowledge.defect_types) == WASHER_TYPES


def test_valid_replies_parse_and_each_request_has_its_own_seed(washer: ProposalContext) -> None:
    replies = [spec_text("scratch", 0.3), spec_text("dent", 0.8, "center")]
    with serve(replies) as server:
        proposer = make(server.base_url, temperature=0.7, top_p=0.9, max_new_tokens=80)
        proposals = proposer.propose(washer, 2, seed=11)
    assert [p.text for p in proposals] == replies  # the raw text, exactly as the model wrote it
    assert [p.spec.defect_type for p in proposals] == ["scratch", "dent"]
    assert [p.spec.severity for p in proposals] == [0.3, 0.8]
    assert all(p.error is None and p.retries == [] for p in proposals)
    assert len(server.requests) == 2
    assert [r["seed"] for r in server.requests] == [11, 12]
    first = server.requests[0]
    assert first["model"] == "test-model"
    assert (first["temperature"], first["top_p"], first["max_completion_tokens"]) == (0.7, 0.9, 80)
    assert first["messages"] == proposer.messages_for(washer)
    assert proposals[0].prompt == proposer.prompt_text(proposer.messages_for(washer))


def test_concurrent_requests_keep_their_order(washer: ProposalContext) -> None:
    types = ["scratch", "dent", "rust", "crack", "burr"]

    def by_seed(request: dict) -> str:  # the reply depends on the request, not on the arrival order
        return spec_text(types[request["seed"] - 100])

    with serve(by_seed) as server:
        proposals = make(server.base_url, concurrency=4).propose(washer, 5, seed=100)
    assert [p.spec.defect_type for p in proposals] == types
    assert sorted(r["seed"] for r in server.requests) == [100, 101, 102, 103, 104]


def test_malformed_reply_is_asked_again_with_the_parsers_error(washer: ProposalContext) -> None:
    bad = "Sure! Here is a defect: a scratch, top, small."
    wrong_type = spec_text("stain_from_elsewhere")
    with serve([bad, wrong_type, spec_text("rust")]) as server:
        proposer = make(server.base_url, max_retries=2)
        (proposal,) = proposer.propose(washer, 1, seed=3)
    assert proposal.spec is not None and proposal.spec.defect_type == "rust"
    assert proposal.retries == ["not_json", "unknown_type"]
    assert len(server.requests) == 3
    original = proposer.messages_for(washer)
    for request, reply in zip(server.requests[1:], (bad, wrong_type), strict=True):
        messages = request["messages"]
        assert messages[:2] == original
        assert messages[2] == {"role": "assistant", "content": reply}
        failed, detail = parse_reply(reply, washer)
        assert messages[3] == {"role": "user", "content": retry_message(failed.error, detail, washer)}
    assert all(t in server.requests[2]["messages"][3]["content"] for t in WASHER_TYPES)
    assert server.requests[1]["seed"] != server.requests[0]["seed"]


def test_replies_still_failing_after_the_last_retry_keep_the_reasons(washer: ProposalContext) -> None:
    with serve(["no", "still no"]) as server:
        (proposal,) = make(server.base_url, max_retries=1).propose(washer, 1, seed=0)
    assert proposal.spec is None and proposal.error == "not_json"
    assert proposal.text == "still no" and proposal.retries == ["not_json"]


def test_constrained_request_carries_the_category_schema(washer: ProposalContext) -> None:
    with serve([spec_text()]) as server:
        make(server.base_url).propose(washer, 1, seed=0)
    response_format = server.requests[0]["response_format"]
    assert response_format["type"] == "json_schema"
    named = response_format["json_schema"]
    assert named["name"] == "defect_spec" and named["strict"] is True
    schema = named["schema"]
    assert schema["properties"]["defect_type"]["enum"] == WASHER_TYPES
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"])


def test_constrained_schema_follows_the_users_constraints(washer: ProposalContext) -> None:
    washer.constraints = Constraints(exclude_types=["rust", "dent"])
    with serve([spec_text()]) as server:
        make(server.base_url).propose(washer, 1, seed=0)
    enum = server.requests[0]["response_format"]["json_schema"]["schema"]["properties"]["defect_type"]["enum"]
    assert enum == ["scratch", "crack", "edge_chip", "burr"]


def test_unconstrained_request_has_no_response_format(washer: ProposalContext) -> None:
    with serve([spec_text()]) as server:
        (proposal,) = make(server.base_url, constrained=False).propose(washer, 1, seed=0)
    assert proposal.spec is not None
    assert "response_format" not in server.requests[0]


@pytest.mark.parametrize(
    "failure",
    [[500, 500], [Reply(body='{"choices": [oops')]],
    ids=["http-500", "malformed-body"],
)
def test_failed_request_is_no_reply_then_asked_again(
    washer: ProposalContext, failure: list, caplog: pytest.LogCaptureFixture
) -> None:
    # an HTTP 500 is retried once by the client itself (max_retries=1), so it takes two to fail a request
    replies = [spec_text("dent"), *failure, spec_text("crack")]
    with caplog.at_level(logging.WARNING, logger="kka_synth"), serve(replies) as server:
        first, second = make(server.base_url).propose(washer, 2, seed=0)
    assert first.spec.defect_type == "dent" and first.retries == []
    assert second.spec is not None and second.spec.defect_type == "crack"
    assert second.retries == ["no_reply"]
    assert len(server.requests) == len(failure) + 2
    assert server.requests[-1]["messages"] == server.requests[1]["messages"]  # the same request again
    assert server.requests[-1]["seed"] != server.requests[1]["seed"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "kka_synth.agents.openai"]
    assert len(warnings) == 1 and "\n" not in warnings[0] and server.base_url in warnings[0]


def test_a_retry_that_fails_after_good_replies_does_not_stop_the_run(washer: ProposalContext) -> None:
    with serve([spec_text("dent"), 500, 500, 500, 500, spec_text("burr")]) as server:
        proposals = make(server.base_url, max_retries=1).propose(washer, 2, seed=0)
    assert proposals[0].spec.defect_type == "dent"
    assert proposals[1].spec is None and proposals[1].error == "no_reply" and proposals[1].text == ""
    assert proposals[1].retries == ["no_reply"]
    assert server.remaining == 1


def test_every_request_failing_raises_even_with_retries_left(washer: ProposalContext) -> None:
    with serve([500] * 4) as server:
        with pytest.raises(ProposerError, match="every request to .* failed; first error: .*500"):
            make(server.base_url, max_retries=2).propose(washer, 2, seed=0)
    assert len(server.requests) == 4  # the first call only: two requests, each tried twice by the client


def test_server_down_raises_one_line_proposer_error(washer: ProposalContext) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    proposer = make(base_url, timeout=5.0)
    with pytest.raises(ProposerError) as info:
        proposer.propose(washer, 2, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert base_url in message and "Connection" in message


def test_missing_api_key_for_openai_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KKA_TEST_OPENAI_KEY", raising=False)
    with pytest.raises(ConfigError, match="KKA_TEST_OPENAI_KEY") as info:
        make(None, api_key_env="KKA_TEST_OPENAI_KEY")
    assert "\n" not in str(info.value)


def test_local_server_needs_no_key_and_a_set_key_is_sent_but_never_logged(
    washer: ProposalContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("KKA_TEST_OPENAI_KEY", raising=False)
    with serve([spec_text()]) as server:
        make(server.base_url, api_key_env="KKA_TEST_OPENAI_KEY").propose(washer, 1, seed=0)
    assert server.headers[0]["authorization"] == "Bearer EMPTY"

    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("KKA_TEST_OPENAI_KEY", secret)
    with (
        caplog.at_level(logging.DEBUG, logger="kka_synth"),
        serve([spec_text(), 500, 500, spec_text()]) as server,
    ):
        proposer = make(server.base_url, api_key_env="KKA_TEST_OPENAI_KEY")
        proposer.propose(washer, 2, seed=0)
    assert server.headers[0]["authorization"] == f"Bearer {secret}"
    assert caplog.records and secret not in caplog.text
    assert secret not in repr(proposer._llm) and secret not in repr(vars(proposer))


def test_not_trainable_and_plain_prompt_text(washer: ProposalContext) -> None:
    proposer = make("http://127.0.0.1:1/v1")
    assert proposer.trainable is False
    assert not hasattr(proposer, "model") and not hasattr(proposer, "tokenizer")
    messages = proposer.messages_for(washer)
    assert proposer.prompt_text(messages) == LLMProposer.prompt_text(proposer, messages)
    assert proposer.prompt_text(messages).endswith("assistant: ")


def test_fake_server_serves_tool_calls_plain_and_streamed() -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
        ],
    }
    with serve([call, call, "done"]) as server:
        llm = ChatOpenAI(model="m", base_url=server.base_url, api_key="x", max_retries=0).bind_tools([add])
        plain = llm.invoke("add 1 and 2")
        chunks = list(llm.stream("add 1 and 2"))
        streamed = chunks[0]
        for chunk in chunks[1:]:
            streamed = streamed + chunk
        text = "".join(str(chunk.content) for chunk in llm.stream("thanks"))
        with pytest.raises(Exception, match="no canned reply left"):
            llm.invoke("one too many")
    expected = [{"name": "add", "args": {"a": 1, "b": 2}, "id": "call_1", "type": "tool_call"}]
    assert plain.tool_calls == expected and streamed.tool_calls == expected
    assert text == "done"
    assert server.requests[0]["tools"][0]["function"]["name"] == "add"
    assert [r.get("stream", False) for r in server.requests] == [False, True, True, False]
    with pytest.raises(TypeError):
        as_reply(True)


@pytest.mark.parametrize("constrained", [True, False])
def test_a_refusal_is_kept_as_the_reply_text(washer: ProposalContext, constrained: bool) -> None:
    refusal = {"role": "assistant", "content": None, "refusal": "I'm sorry, I cannot help with that."}
    with serve([refusal]) as server:
        (proposal,) = make(server.base_url, constrained=constrained, max_retries=0).propose(washer, 1, seed=0)
    assert proposal.text == refusal["refusal"]
    assert proposal.spec is None and proposal.error == "refusal"

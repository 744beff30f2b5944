"""The vLLM proposer against a fake ``vllm`` package that records what the proposer asks of it.

vLLM's wheel needs CUDA, so its API is faked at the boundary: ``vllm.LLM`` (constructor arguments, prompts,
sampling parameters and LoRA requests are recorded; replies come from a script), ``vllm.SamplingParams``,
``vllm.sampling_params`` with either structured-output API, and ``vllm.lora.request.LoRARequest``. The
tokenizer is the real one of a tiny chat model saved to a folder.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.machinery
import json
import shutil
import sys
import types
import weakref
from pathlib import Path
from typing import Any

import pytest
from tiny_llm import save_tiny_chat_model
from transformers import AutoTokenizer, Qwen2ForCausalLM

from kka_synth.agents.base import ProposalContext, TrainableProposer
from kka_synth.agents.compact import AdapterError
from kka_synth.agents.constraints import Constraints
from kka_synth.agents.guidance import retry_message
from kka_synth.agents.llm import RETRY_SEED_STRIDE, ProposerError
from kka_synth.agents.parsing import parse_reply
from kka_synth.agents.vllm import VLLMProposer
from kka_synth.config import ProposerConfig
from kka_synth.prompts.templates import example_reply
from kka_synth.utils.hub import TRUST_REMOTE_CODE_ENV, ModelLoadError


@dataclasses.dataclass
class CompletionOutput:
    text: str


@dataclasses.dataclass
class RequestOutput:
    prompt: str
    outputs: list[CompletionOutput]


class SamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class SchemaParams:
    def __init__(self, json: dict | None = None) -> None:
        self.json = json


class LoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class FakeVLLM:
    """What the fake engine was asked, and the replies it gives (one list per generate call)."""

    def __init__(self) -> None:
        self.init: dict[str, Any] = {}
        self.calls: list[dict[str, Any]] = []
        self.script: list[list[str | None]] = []

    def module(self, api: str | None) -> dict[str, types.ModuleType]:
        fake = self

        class LLM:
            def __init__(self, model: str, **kwargs: Any) -> None:
                fake.init = {"model": model, **kwargs}
                self._tokenizer = AutoTokenizer.from_pretrained(model)

            def get_tokenizer(self):
                return self._tokenizer

            def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
                fake.calls.append(
                    {"prompts": list(prompts), "params": list(sampling_params), "lora": lora_request}
                )
                replies = fake.script.pop(0) if fake.script else ['{"not": "a spec"}'] * len(prompts)
                return [
                    RequestOutput(p, [] if r is None else [CompletionOutput(r)])
                    for p, r in zip(prompts, replies, strict=True)
                ]

        def new(name: str) -> types.ModuleType:
            module = types.ModuleType(name)
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
            return module

        vllm, sampling, lora, request = (
            new("vllm"),
            new("vllm.sampling_params"),
            new("vllm.lora"),
            new("vllm.lora.request"),
        )
        vllm.LLM, vllm.SamplingParams, sampling.SamplingParams = LLM, SamplingParams, SamplingParams
        if api == "structured_outputs":
            sampling.StructuredOutputsParams = SchemaParams
        elif api == "guided_decoding":
            sampling.GuidedDecodingParams = SchemaParams
        request.LoRARequest = LoRARequest
        vllm.sampling_params, vllm.lora, lora.request = sampling, lora, request
        names = ("vllm", "vllm.sampling_params", "vllm.lora", "vllm.lora.request")
        return dict(zip(names, (vllm, sampling, lora, request), strict=True))


def _install(monkeypatch: pytest.MonkeyPatch, api: str | None = "structured_outputs") -> FakeVLLM:
    fake = FakeVLLM()
    for name, module in fake.module(api).items():
        monkeypatch.setitem(sys.modules, name, module)
    return fake


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat"))


def _config(model_dir: Path, **changes: object) -> ProposerConfig:
    settings = {"backend": "vllm", "model": str(model_dir), "max_new_tokens": 48, "temperature": 0.7}
    return ProposerConfig(**{**settings, "top_p": 0.9, "max_retries": 1, **changes})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeVLLM:
    return _install(monkeypatch)


def _adapter(folder: Path, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    return folder


def test_engine_is_built_from_the_config(fake: FakeVLLM, model_dir: Path) -> None:
    config = _config(model_dir, tensor_parallel_size=2, max_lora_rank=32, gpu_memory_utilization=0.4)
    proposer = VLLMProposer(config, seed=7)
    assert isinstance(proposer, TrainableProposer) and proposer.trainable
    assert fake.init == {
        "model": str(model_dir),
        "tensor_parallel_size": 2,
        "dtype": "bfloat16",
        "seed": 7,
        "enable_lora": True,
        "max_lora_rank": 32,
        "gpu_memory_utilization": 0.4,
        "trust_remote_code": False,
        "load_format": "safetensors",
    }
    assert proposer.tokenizer.padding_side == "left" and proposer.tokenizer.chat_template
    VLLMProposer(_config(model_dir, dtype="float16"))
    assert fake.init["dtype"] == "float16"


@pytest.mark.parametrize("api", ["structured_outputs", "guided_decoding"])
def test_schema_guides_every_request(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path, washer: ProposalContext, api: str
) -> None:
    fake = _install(monkeypatch, api)
    proposer = VLLMProposer(_config(model_dir))
    context = dataclasses.replace(washer, constraints=Constraints(exclude_types=["rust", "burr"]))
    proposals = proposer.propose(context, 3, seed=10)
    assert len(proposals) == 3 and len(fake.calls) == 2  # the canned replies fail, so one retry round
    (call, _) = fake.calls
    assert call["prompts"] == [proposer.prompt_text(proposer.messages_for(context))] * 3
    assert call["lora"] is None
    for i, params in enumerate(call["params"]):
        kwargs = params.kwargs
        assert {k: kwargs[k] for k in ("n", "temperature", "top_p", "max_tokens", "seed")} == {
            "n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 48, "seed": 10 + i,
        }  # fmt: skip
        other = "guided_decoding" if api == "structured_outputs" else "structured_outputs"
        assert other not in kwargs
        schema = kwargs[api].json
        assert schema["properties"]["defect_type"]["enum"] == ["scratch", "dent", "crack", "edge_chip"]
        assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False
    assert [p.kwargs["seed"] for p in fake.calls[1]["params"]] == [
        10 + RETRY_SEED_STRIDE + i for i in range(3)
    ]
    assert proposer._schema is None  # cleared after the request


def test_unconstrained_sampling_has_no_schema(
    fake: FakeVLLM, model_dir: Path, washer: ProposalContext
) -> None:
    proposer = VLLMProposer(_config(model_dir, constrained=False, max_retries=0))
    proposer.propose(washer, 2, seed=0)
    kwargs = fake.calls[0]["params"][0].kwargs
    assert "structured_outputs" not in kwargs and "guided_decoding" not in kwargs


def test_vllm_without_schema_decoding_refuses_constrained(
    monkeypatch: pytest.MonkeyPatch, model_dir: Path
) -> None:
    _install(monkeypatch, api=None)
    with pytest.raises(ProposerError, match="set proposer.constrained false"):
        VLLMProposer(_config(model_dir))
    VLLMProposer(_config(model_dir, constrained=False))


def test_failed_reply_is_asked_again_with_feedback(
    fake: FakeVLLM, model_dir: Path, washer: ProposalContext
) -> None:
    proposer = VLLMProposer(_config(model_dir, max_retries=2))
    good = example_reply(washer.knowledge)
    bad = '{"defect_type": "scratch", "region": "top", "size": 0.01'
    fake.script = [[bad, good, None], [good, good]]
    proposals = proposer.propose(washer, 3, seed=0)
    assert [p.retries for p in proposals] == [["truncated"], [], ["no_reply"]]
    assert all(p.spec is not None and p.text == good for p in proposals)
    assert len(fake.calls) == 2 and len(fake.calls[1]["prompts"]) == 2
    failed, detail = parse_reply(bad, washer)
    feedback = retry_message(failed.error, detail, washer)
    messages = proposer.messages_for(washer)
    retried = [*messages, {"role": "assistant", "content": bad}, {"role": "user", "content": feedback}]
    assert fake.calls[1]["prompts"] == [proposer.prompt_text(retried), proposer.prompt_text(messages)]
    assert feedback in fake.calls[1]["prompts"][0] and bad in fake.calls[1]["prompts"][0]


def test_adapters_are_served_as_numbered_lora_requests(
    fake: FakeVLLM, model_dir: Path, washer: ProposalContext, tmp_path: Path
) -> None:
    proposer = VLLMProposer(_config(model_dir, max_retries=0, max_lora_rank=16))
    first, second = _adapter(tmp_path / "adapters" / "1"), _adapter(tmp_path / "adapters" / "2")
    proposer.apply_adapter(first)
    proposer.apply_adapter(second)
    request = proposer.lora_request
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("kka-2", 2, str(second))
    assert proposer.adapter == second
    proposer.propose(washer, 2, seed=0)
    assert fake.calls[-1]["lora"] is request
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        proposer.apply_adapter(tmp_path)
    with pytest.raises(AdapterError, match="above proposer.max_lora_rank 16"):
        proposer.apply_adapter(_adapter(tmp_path / "big", rank=32))
    assert proposer.lora_request is request  # a refused adapter changes nothing


def test_training_model_is_loaded_lazily_and_freed(fake: FakeVLLM, model_dir: Path, tmp_path: Path) -> None:
    proposer = VLLMProposer(_config(model_dir))
    assert proposer._training is None  # nothing loaded before DPO asks
    model, start = proposer.training_model()
    assert isinstance(model, Qwen2ForCausalLM) and start is None
    assert proposer.training_model()[0] is model
    freed = weakref.ref(model)
    del model
    adapter = _adapter(tmp_path / "a")
    proposer.apply_adapter(adapter)
    gc.collect()
    assert freed() is None
    model, start = proposer.training_model()
    assert start == adapter and not any("lora_" in name for name, _ in model.named_parameters())


def test_prompt_text_is_the_engine_chat_template(
    fake: FakeVLLM, model_dir: Path, washer: ProposalContext
) -> None:
    proposer = VLLMProposer(_config(model_dir))
    messages = proposer.messages_for(washer)
    expected = proposer.llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert proposer.prompt_text(messages) == expected and expected.endswith("<|im_start|>assistant\n")


def test_the_loading_policy_reaches_the_engine(
    fake: FakeVLLM, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--trust-remote-code is passed through; a folder with only pickle weights never reaches the engine."""
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    VLLMProposer(_config(model_dir))
    assert fake.init["trust_remote_code"] is True and fake.init["load_format"] == "safetensors"
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV)
    pickled = tmp_path / "pickled"
    shutil.copytree(model_dir, pickled)
    weights = pickled / "model.safetensors"
    weights.with_suffix(".bin").write_bytes(b"not read")
    weights.unlink()
    fake.init = {}
    with pytest.raises(ModelLoadError, match="only pickle weights") as error:
        VLLMProposer(_config(pickled))
    assert "\n" not in str(error.value) and "proposer.model" in str(error.value)
    assert fake.init == {}


def test_pickle_only_adapter_is_not_served(fake: FakeVLLM, model_dir: Path, tmp_path: Path) -> None:
    proposer = VLLMProposer(_config(model_dir))
    adapter = _adapter(tmp_path / "pickled")
    (adapter / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match=r"only pickle weights \(adapter_model.bin\)") as error:
        proposer.apply_adapter(adapter)
    assert "\n" not in str(error.value) and proposer.lora_request is None


def test_missing_model_fails_before_the_engine(fake: FakeVLLM, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="proposer.model") as error:
        VLLMProposer(_config(tmp_path))
    assert "\n" not in str(error.value) and "--profile offline" in str(error.value)
    assert fake.init == {}


def test_missing_extra_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r'pip install "kka-synth\[vllm\]"'):
        VLLMProposer(_config(model_dir))

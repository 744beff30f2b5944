"""The ``vllm`` proposer: high-throughput sampling with JSON-schema guided decoding and per-iteration LoRA.

The hub-profile LLM of KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs",
arXiv 2502.14880), served by vLLM's offline engine (``vllm.LLM``, with tensor parallelism over
``proposer.tensor_parallel_size`` GPUs). Prompting, parsing and retries come from
:class:`~kka_synth.agents.llm.LLMProposer`; every request of a round goes to the engine at once, each with its
own seed. With ``proposer.constrained`` the reply is held to the JSON schema of one spec of the category
(:func:`~kka_synth.agents.guidance.spec_json_schema`, after the user's constraints narrow the knowledge), so
replies parse by construction and retries only catch what the schema cannot say.

DPO trains a LoRA adapter on a transformers copy of the model (:meth:`VLLMProposer.training_model`, loaded
only when asked for and freed once the adapter is applied, so vLLM keeps its GPU memory); the engine then
serves that adapter as a ``LoRARequest`` without reloading the base weights.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from kka_synth.agents.base import ProposalContext
from kka_synth.agents.guidance import spec_json_schema
from kka_synth.agents.hf import FIELD, WHAT, chat_prompt, load_chat_tokenizer
from kka_synth.agents.llm import LLMProposer, Message, ProposerError
from kka_synth.config import ProposerConfig
from kka_synth.types import Proposal
from kka_synth.utils.devices import resolve_device, resolve_dtype
from kka_synth.utils.hub import AdapterError, check_adapter_dir, load_pretrained
from kka_synth.utils.imports import require

logger = logging.getLogger(__name__)


def start_engine(
    engine: Callable[..., Any],
    model: str,
    trust_remote_code: bool = False,
    use_safetensors: bool = True,
    **kwargs: Any,
) -> Any:
    """``engine(model, ...)`` (``vllm.LLM``) under the loading policy of :mod:`kka_synth.utils.hub`.

    Called through :func:`~kka_synth.utils.hub.load_pretrained`, which sees both policy arguments in this
    signature: it refuses a local folder with only pickle weights and passes ``trust_remote_code`` as the
    user set it. vLLM gets ``load_format="safetensors"`` (so it never falls back to ``*.bin`` files) and
    ``trust_remote_code`` explicitly.
    """
    if not use_safetensors:
        raise ValueError("the vLLM engine loads safetensors weights only")
    return engine(model, trust_remote_code=trust_remote_code, load_format="safetensors", **kwargs)


def structured_output_api(sampling_params: Any) -> tuple[str, type] | None:
    """(``SamplingParams`` keyword, params class) of the JSON-schema decoding this vLLM offers, or None.

    vLLM 0.11 and later take ``structured_outputs=StructuredOutputsParams(json=...)``; earlier versions
    ``guided_decoding=GuidedDecodingParams(json=...)``.
    """
    if hasattr(sampling_params, "StructuredOutputsParams"):
        return "structured_outputs", sampling_params.StructuredOutputsParams
    if hasattr(sampling_params, "GuidedDecodingParams"):
        return "guided_decoding", sampling_params.GuidedDecodingParams
    return None


class VLLMProposer(LLMProposer):
    """The ``vllm`` backend (pip extra ``vllm``): a chat model served by ``vllm.LLM``.

    Args:
        config: the ``proposer`` section; ``model`` is a Hub id or a local folder of a chat model.
        seed: the engine's seed (each request also carries its own).
    """

    trainable = True

    def __init__(self, config: ProposerConfig, seed: int = 0) -> None:
        super().__init__(config)
        require("vllm")
        import vllm
        import vllm.sampling_params
        from vllm.lora.request import LoRARequest

        self._sampling_params = vllm.SamplingParams
        self._lora_request = LoRARequest
        self._structured = structured_output_api(vllm.sampling_params)
        if config.constrained and self._structured is None:
            raise ProposerError(
                "this vllm offers no JSON-schema decoding (neither StructuredOutputsParams nor "
                "GuidedDecodingParams); upgrade vllm or set proposer.constrained false"
            )
        self.device = resolve_device(config.device)
        """Where :meth:`training_model` puts the transformers copy for DPO."""
        self.tokenizer = load_chat_tokenizer(config.model)
        """The transformers tokenizer of the model, for DPO."""
        self.llm = load_pretrained(
            functools.partial(start_engine, vllm.LLM),
            config.model,
            WHAT,
            FIELD,
            tensor_parallel_size=config.tensor_parallel_size,
            dtype="bfloat16" if config.dtype == "auto" else config.dtype,
            seed=seed,
            enable_lora=True,
            max_lora_rank=config.max_lora_rank,
            gpu_memory_utilization=config.gpu_memory_utilization,
        )
        self.lora_request: Any = None
        """The ``LoRARequest`` of the adapter every request is served with, or None (the base model)."""
        self.adapter: Path | None = None
        """The adapter sampled with (the latest one applied), or None."""
        self._adapters = 0
        self._schema: dict | None = None
        self._training: Any = None
        logger.info(
            "vLLM engine ready for %s (tensor parallel %d)", config.model, config.tensor_parallel_size
        )

    # LLMProposer -------------------------------------------------------------------------------------
    def prompt_text(self, messages: Sequence[Message]) -> str:
        """The prompt rendered by the engine tokenizer's chat template, as DPO will read it."""
        return chat_prompt(self.llm.get_tokenizer(), messages)

    def propose(self, context: ProposalContext, n: int, seed: int) -> list[Proposal]:
        """``n`` proposals for ``context``, held to the schema of its narrowed knowledge when constrained."""
        if self.config.constrained:
            self._schema = spec_json_schema(context.constraints.narrow(context.knowledge))
        try:
            return super().propose(context, n, seed)
        finally:
            self._schema = None

    def sampling_params(self, seed: int) -> Any:
        """``vllm.SamplingParams`` of one request, with the current schema when constrained."""
        extra: dict[str, Any] = {}
        if self._schema is not None and self._structured is not None:
            keyword, params = self._structured
            extra[keyword] = params(json=self._schema)
        return self._sampling_params(
            n=1,
            temperature=self.config.temperature,
            top_p=self.config.top_p,
            max_tokens=self.config.max_new_tokens,
            seed=seed,
            **extra,
        )

    def generate(self, conversations: Sequence[Sequence[Message]], seed: int) -> list[str | None]:
        """All conversations in one engine call; request ``i`` is seeded with ``seed + i``."""
        prompts = [self.prompt_text(conversation) for conversation in conversations]
        params = [self.sampling_params(seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        return [output.outputs[0].text if output.outputs else None for output in outputs]

    # DPO ---------------------------------------------------------------------------------------------
    def training_model(self) -> tuple[Any, Path | None]:
        """(a transformers copy of the base model, the adapter to continue or None), loaded on first use."""
        if self._training is None:
            from transformers import AutoModelForCausalLM

            dtype = resolve_dtype(self.config.dtype, self.device, cuda_auto="bfloat16")
            model = load_pretrained(
                AutoModelForCausalLM.from_pretrained, self.config.model, WHAT, FIELD, dtype=dtype
            )
            self._training = model.to(self.device)
        return self._training, self.adapter

    def apply_adapter(self, path: str | Path) -> None:
        """Serve the PEFT adapter saved at ``path`` from now on, and free the transformers copy."""
        path = check_adapter_dir(path)  # vLLM would read a pickled adapter_model.bin too
        try:
            rank = int(json.loads((path / "adapter_config.json").read_text()).get("r", 0))
        except (AttributeError, TypeError, ValueError):
            raise AdapterError(f"{path / 'adapter_config.json'} is not a valid adapter config") from None
        if rank > self.config.max_lora_rank:
            raise AdapterError(
                f"adapter {path} has LoRA rank {rank}, above proposer.max_lora_rank "
                f"{self.config.max_lora_rank}; raise it or lower alignment.lora.r"
            )
        self._adapters += 1
        self.lora_request = self._lora_request(f"kka-{self._adapters}", self._adapters, str(path))
        self.adapter = path
        self.release_training_model()
        logger.info("serving LoRA adapter %s as kka-%d", path, self._adapters)

    def release_training_model(self) -> None:
        """Drop the transformers copy of the model and give its GPU memory back to the allocator."""
        if self._training is None:
            return
        self._training = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

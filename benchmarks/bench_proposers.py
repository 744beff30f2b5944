"""Throughput of the LLM proposers (transformers, vLLM) and the cost of one DPO step with LoRA.

For each backend it times ``propose`` over a few categories and prints proposals per second, generate
requests per second (retries included), new tokens per second, the parsed share and the mean retries.
The model is ``--model`` (a Hub id or a local folder) or, by default, a random-weight model built from a
config and saved to a temporary folder with the tiny local chat tokenizer of ``tests/tiny_llm.py``:

- ``--size tiny``: the two-layer, hidden-64 test model (CPU, seconds);
- ``--size 1.5b``: Qwen2-1.5B's shape (hidden 1536, 28 layers, 12 heads, 2 KV heads, MLP 8960, vocabulary
  151936), bfloat16, for a GPU.

Random weights write garbage, so nearly every reply fails to parse and is asked ``--max-retries`` more times,
each reply running to ``--max-new-tokens``: a worst case for time per proposal. vLLM runs when it is
importable and CUDA is there (guided decoding holds its replies to the spec schema). ``--dpo`` also times
``train_dpo`` with a fresh LoRA adapter on ``--dpo-pairs`` synthetic pairs, per optimiser step.

    OMP_NUM_THREADS=1 python benchmarks/bench_proposers.py --size tiny --device cpu --dpo
    python benchmarks/bench_proposers.py --size 1.5b --device cuda --dpo
    python benchmarks/bench_proposers.py --model Qwen/Qwen2.5-1.5B-Instruct --n 128
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_llm import build_tiny_tokenizer, save_tiny_chat_model  # noqa: E402

from kka_synth.agents.base import ProposalContext  # noqa: E402
from kka_synth.agents.hf import TransformersProposer  # noqa: E402
from kka_synth.config import AlignmentConfig, ProposerConfig  # noqa: E402
from kka_synth.prompts.templates import example_reply  # noqa: E402
from kka_synth.types import PreferencePair  # noqa: E402
from kka_synth.utils.imports import is_available  # noqa: E402

QWEN2_1_5B = {
    "hidden_size": 1536,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "intermediate_size": 8960,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "tie_word_embeddings": True,
}
"""Qwen2-1.5B's architecture (its config.json), with random weights."""


def save_random_model(size: str, folder: Path, device: torch.device) -> Path:
    """A random-weight chat model of ``size`` with the tiny local tokenizer, saved to ``folder``."""
    if size == "tiny":
        return save_tiny_chat_model(folder)
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        **QWEN2_1_5B,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def time_backend(proposer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Propose ``args.n`` specs per category after a warm-up; counts, rates and shares."""
    replies: list[str] = []
    generate = proposer.generate
    sampled = [0]  # new tokens the transformers model generated (re-encoding the text undercounts ids a
    # random model samples outside the small test tokenizer's vocabulary)

    def counting(conversations, seed):
        out = generate(conversations, seed)
        replies.extend(r for r in out if r is not None)
        return out

    proposer.generate = counting
    model_generate = getattr(getattr(proposer, "model", None), "generate", None)
    if model_generate is not None:

        def counting_model(*a, **kw):
            output = model_generate(*a, **kw)  # (B, prompt + new)
            new = output[:, kw["input_ids"].shape[1] :]
            sampled[0] += int((new != proposer.tokenizer.pad_token_id).sum())
            return output

        proposer.model.generate = counting_model
    contexts = [ProposalContext.for_category(name) for name in args.categories]
    proposer.propose(contexts[0], min(args.n, 4), seed=10_000)  # warm-up: kernels, caches
    replies.clear()
    sampled[0] = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    proposals, times = [], []
    for index, context in enumerate(contexts):
        started = time.perf_counter()
        proposals += proposer.propose(context, args.n, seed=args.seed + index)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    proposer.generate = generate
    if model_generate is not None:
        proposer.model.generate = model_generate
    total = sum(times)
    tokens = sampled[0] or sum(len(proposer.tokenizer.encode(r, add_special_tokens=False)) for r in replies)
    return {
        "proposals": len(proposals),
        "seconds": total,
        "proposals/s": len(proposals) / total,
        "requests/s": len(replies) / total,
        "tokens/s": tokens / total,
        "parsed": sum(p.spec is not None for p in proposals) / len(proposals),
        "retries": statistics.mean(len(p.retries) for p in proposals),
    }


def synthetic_pairs(proposer: TransformersProposer, count: int) -> list[PreferencePair]:
    """``count`` pairs over the demo categories: a subtle spec preferred over an obvious one."""
    pairs = []
    for index in range(count):
        context = ProposalContext.for_category(("washer", "brick")[index % 2], "demo")
        prompt = proposer.prompt_text(proposer.messages_for(context))
        spec = json.loads(example_reply(context.knowledge))
        chosen = json.dumps({**spec, "severity": 0.1 + 0.01 * (index % 10)})
        rejected = json.dumps({**spec, "severity": 0.9, "size": 0.05})
        pairs.append(PreferencePair(prompt, chosen, rejected))
    return pairs


def time_dpo(proposer: TransformersProposer, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Wall time of one ``train_dpo`` round (fresh LoRA) and its share per optimiser step."""
    from kka_synth.alignment.dpo import preference_margin, train_dpo

    pairs = synthetic_pairs(proposer, args.dpo_pairs)
    config = AlignmentConfig(
        dpo={**AlignmentConfig().dpo, "num_train_epochs": 1, "per_device_train_batch_size": args.dpo_batch}
    )
    model, _ = proposer.training_model()
    started = time.perf_counter()
    preference_margin(model, proposer.tokenizer, pairs)
    margin_s = time.perf_counter() - started
    started = time.perf_counter()
    result = train_dpo(model, proposer.tokenizer, pairs, config, folder / "adapter", seed=0)
    total = time.perf_counter() - started
    steps = max(result.steps, 1)
    return {
        "pairs": len(pairs),
        "steps": result.steps,
        "round s": total,
        "s/step (with setup)": (total - 2 * margin_s) / steps,
        "margin pass s": margin_s,
    }


def _cell(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Rows of equal keys as an aligned text table."""
    keys = list(rows[0])
    cells = [[_cell(v) for v in row.values()] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: a random model)")
    parser.add_argument("--size", choices=("tiny", "1.5b"), default="tiny", help="random model's shape")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--backends", nargs="*", default=None, help="transformers, vllm (default: available)")
    parser.add_argument("--categories", nargs="*", default=["washer", "brick"])
    parser.add_argument("--n", type=int, default=32, help="proposals per category")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--dpo", action="store_true", help="also time a DPO round with LoRA")
    parser.add_argument("--dpo-pairs", type=int, default=32)
    parser.add_argument("--dpo-batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    datasets.disable_progress_bars()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    backends = args.backends or ["transformers"] + (["vllm"] if cuda and is_available("vllm") else [])
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            started = time.perf_counter()
            device = torch.device("cuda" if cuda else "cpu")
            model = str(save_random_model(args.size, Path(tmp) / "model", device))
            print(f"random {args.size} model built and saved in {time.perf_counter() - started:.1f} s")
        common = {
            "model": model,
            "device": args.device,
            "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "max_retries": args.max_retries,
        }
        print(f"torch threads {torch.get_num_threads()}, cuda {cuda}, model {args.model or args.size}")
        rows, transformers_proposer = [], None
        for backend in backends:
            started = time.perf_counter()
            if backend == "transformers":
                config = ProposerConfig(backend="transformers", constrained=False, **common)
                proposer: Any = TransformersProposer(config, seed=args.seed)
                transformers_proposer = proposer
            else:
                from kka_synth.agents.vllm import VLLMProposer

                proposer = VLLMProposer(ProposerConfig(backend="vllm", **common), seed=args.seed)
            load_s = time.perf_counter() - started
            rows.append({"backend": backend, "load s": load_s, **time_backend(proposer, args)})
        print(table(rows))
        if args.dpo:
            if transformers_proposer is None:
                config = ProposerConfig(backend="transformers", constrained=False, **common)
                transformers_proposer = TransformersProposer(config, seed=args.seed)
            print(table([{"dpo": "lora", **time_dpo(transformers_proposer, args, Path(tmp))}]))


if __name__ == "__main__":
    main()

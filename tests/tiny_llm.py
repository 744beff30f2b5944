"""A tiny random chat LM saved to a folder, so tests load it through the real ``from_pretrained``.

The model is a two-layer, hidden-64 ``Qwen2ForCausalLM`` built from a config with a fixed seed. Its
tokenizer is a byte-level BPE trained here, with Qwen2's pre-tokeniser, on chat-formatted requests of the
demo knowledge answered by random specs, so a spec's keys and values are few tokens. It carries ChatML
special tokens (``<|im_start|>``, ``<|im_end|>`` as EOS, ``<|endoftext|>`` as padding) and a ChatML chat
template that also renders tool lists, tool calls and tool results, as Qwen2.5's does. Building and saving
takes well under a second. The model writes garbage, so tests assert on accounting, not on parsed specs;
:func:`teach_specs` fine-tunes it in about ten seconds into one that answers the demo's requests with spec
JSON much of the time, for loop tests that need parsed specs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call functions. Their signatures, inside <tools></tools>:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nTo call one, reply with <tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and tools and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + (message.content or '') }}"
    "{{- '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant\\n' + (message.content or '') }}"
    "{%- for call in message.tool_calls %}"
    "{%- set function = call.function if call.function is defined else call %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + function.name + \'", "arguments": \' }}'
    "{%- if function.arguments is string %}{{- function.arguments }}"
    "{%- else %}{{- function.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, tools in the system turn."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 768


def _chatml(messages: list[dict[str, str]]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def _corpus(seed: int) -> list[str]:
    """Chat-formatted requests of every demo and generic category, each answered by a random spec."""
    from kka_synth.prompts import SEVERITY_LADDER, chat_messages, load_knowledge_file

    rng = random.Random(seed)
    texts = []
    categories = {**load_knowledge_file("demo"), **load_knowledge_file("generic")}
    for knowledge in categories.values():
        request = chat_messages(knowledge)
        for _ in range(40):
            defect = rng.choice(list(knowledge.defect_types.values()))
            spec = {
                "defect_type": defect.name,
                "description": rng.choice(defect.phrases),
                "region": rng.choice(defect.regions),
                "size": rng.choice(defect.sizes()),
                "shape": rng.choice(defect.shapes),
                "tone": rng.choice(defect.tones),
                "severity": rng.choice(SEVERITY_LADDER),
            }
            texts.append(_chatml([*request, {"role": "assistant", "content": json.dumps(spec)}]))
    return texts


def build_tiny_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, ChatML tokens and template) trained on the corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # AutoTokenizer loads a qwen2 folder as Qwen2Tokenizer, which rebuilds the normaliser and pre-tokeniser
    # as below; training with the same split keeps the learnt merges usable after the reload.
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    """Save a random two-layer ``Qwen2ForCausalLM`` and its chat tokenizer to ``path``; returns ``path``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teach_specs(
    path: Path, steps: int = 200, seed: int = 0, lr: float = 3e-3, categories: tuple[str, ...] = ()
) -> Path:
    """Fine-tune the tiny model saved at ``path`` to answer the corpus's requests with their specs, in place.

    Each step takes one request and 8 of its replies: the request (about 800 tokens, the same for all 8) runs
    once without gradients into the key/value cache, and only the replies are trained against it. That
    costs a fraction of training on whole sequences, and a couple of hundred steps make the two-layer model
    answer the demo's requests with spec JSON much of the time, so a loop test gets parsed specs, renders,
    hardness and preference pairs from it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    start = "<|im_start|>assistant\n"
    requests: dict[str, list[list[int]]] = {}
    for text in _corpus(seed):
        cut = text.rindex(start) + len(start)
        if categories and not any(f"Category: {name} (" in text for name in categories):
            continue
        requests.setdefault(text[:cut], []).append(tokenizer(text[cut:])["input_ids"])
    prompts = {prompt: torch.tensor([tokenizer(prompt)["input_ids"]]) for prompt in requests}
    rng = random.Random(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in range(steps):
            prompt = list(requests)[step % len(requests)]
            replies = rng.sample(requests[prompt], 8)
            # the request's last token is trained along with the replies, so the first reply token is
            # learnt too (labels are shifted inside the model: labels[t] is predicted at position t - 1)
            prefix, last = prompts[prompt][:, :-1], int(prompts[prompt][0, -1])
            width = 1 + max(len(r) for r in replies)
            ids = torch.full((8, width), tokenizer.pad_token_id)
            labels = torch.full((8, width), -100)
            mask = torch.zeros((8, width), dtype=torch.long)
            for row, reply in enumerate(replies):
                ids[row, : 1 + len(reply)] = torch.tensor([last, *reply])
                labels[row, 1 : 1 + len(reply)] = torch.tensor(reply)
                mask[row, : 1 + len(reply)] = 1
            model.eval()
            with torch.no_grad():
                cache = model(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(8)
            model.train()
            mask = torch.cat([torch.ones((8, prefix.shape[1]), dtype=torch.long), mask], 1)
            loss = model(input_ids=ids, attention_mask=mask, past_key_values=cache, labels=labels).loss
            loss.backward()
            optimiser.step()
            optimiser.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return path

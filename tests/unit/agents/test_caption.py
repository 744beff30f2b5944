"""Captioner on tiny random vision-language models (LLaVA and Idefics3/SmolVLM layouts) built from configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kka_synth.agents.caption import Captioner
from kka_synth.prompts.templates import render_prompt
from kka_synth.utils.hub import ModelLoadError

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<global-img>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
SIDE = 32  # the vision towers' input side
PATCH = 8


def build_tokenizer():
    """A byte-level BPE over a few caption-like sentences, with the image tokens both processors use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sentences = [render_prompt("caption_question", category=c) for c in ("washer", "bottle", "pcb")]
    sentences += ["a round grey metal ring with a central hole", "a brown glass bottle with a white cap"]
    bpe.train_from_iterator(sentences * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def text_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_llava(tokenizer):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(config), processor


def build_idefics3(tokenizer):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        Idefics3VisionConfig,
    )
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": SIDE}, max_image_size={"longest_edge": SIDE}, do_image_splitting=False
    )
    # (SIDE / PATCH)^2 patches, merged 2 x 2 by the pixel shuffle: 4 image tokens
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=CHAT_TEMPLATE
    )
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIDE,
        patch_size=PATCH,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(config), processor


BUILDERS = {"llava": build_llava, "idefics3": build_idefics3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny_vlm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(folder, in-memory model, processor) of a random tiny VLM saved with its processor."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, processor = BUILDERS[request.param](build_tokenizer())
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


@pytest.fixture
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(40, 52, 3), dtype=np.uint8) for _ in range(2)]


def count_generate(captioner: Captioner, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    generate = captioner.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(captioner.model, "generate", counted)
    return calls


def test_caption_is_one_deterministic_line(tiny_vlm, images: list[np.ndarray]) -> None:
    path, _, _ = tiny_vlm
    first = Captioner(str(path), device="cpu", max_new_tokens=12).caption(images[0], "washer")
    again = Captioner(str(path), device="cpu", max_new_tokens=12).caption(images[0], "washer")
    assert isinstance(first, str) and first
    assert first.isprintable() and first == first.strip() and "  " not in first  # one line
    assert again == first


def test_loaded_and_in_memory_models_agree(tiny_vlm, images: list[np.ndarray]) -> None:
    path, model, processor = tiny_vlm
    loaded = Captioner(str(path), device="cpu", max_new_tokens=12)
    built = Captioner.from_components(model, processor, max_new_tokens=12)
    assert type(loaded.model) is type(model)
    assert built.caption(images[0], "washer") == loaded.caption(images[0], "washer")


def test_captions_are_cached_per_image_and_category(
    tiny_vlm, images: list[np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model, processor = tiny_vlm
    captioner = Captioner.from_components(model, processor, max_new_tokens=7)
    calls = count_generate(captioner, monkeypatch)
    first = captioner.caption(images[0], "washer")
    assert captioner.caption(images[0].copy(), "washer") == first  # equal bytes: a cache hit
    assert calls == [7]
    captioner.caption(images[1], "washer")
    captioner.caption(images[0], "bottle")  # the question names the category
    assert calls == [7, 7, 7]
    captioner.caption(images[0].reshape(52, 40, 3), "washer")  # the same bytes in another shape
    assert len(calls) == 4


def test_prompt_holds_the_image_and_the_question(tiny_vlm) -> None:
    _, model, processor = tiny_vlm
    prompt = Captioner.from_components(model, processor).prompt("washer")
    assert prompt.count("<image>") == 1
    assert render_prompt("caption_question", category="washer") in prompt
    assert prompt.endswith("assistant:")


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), dtype=np.float32),
        np.zeros((8, 8), dtype=np.uint8),
        np.zeros((8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 3), dtype=np.uint8),
        [[0, 0, 0]],
    ],
    ids=["float", "grey", "rgba", "empty", "list"],
)
def test_bad_image_is_a_one_line_value_error(tiny_vlm, bad) -> None:
    _, model, processor = tiny_vlm
    with pytest.raises(ValueError, match="image must be") as info:
        Captioner.from_components(model, processor).caption(bad, "washer")
    assert "\n" not in str(info.value)


def test_bad_category_and_token_count_are_refused(tiny_vlm, images: list[np.ndarray]) -> None:
    path, model, processor = tiny_vlm
    with pytest.raises(ValueError, match="category"):
        Captioner.from_components(model, processor).caption(images[0], "  ")
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner.from_components(model, processor, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner(str(path), device="cpu", max_new_tokens=0)


def test_missing_model_names_the_config_field(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="proposer.caption_model") as info:
        Captioner(str(tmp_path / "no-such-model"), device="cpu")
    assert "\n" not in str(info.value)

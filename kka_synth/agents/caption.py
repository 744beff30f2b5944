"""A one-sentence caption of a normal image, written by a vision-language model, for the proposer's prompt.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880)
prompts an LLM with knowledge of a category in words. When ``proposer.caption`` is on, an image-text-to-text
model first describes a normal image of the category (material, colour, parts), and the chat backends read
that sentence next to the knowledge base (:attr:`~kka_synth.agents.base.ProposalContext.caption`), so a text
LLM learns what this dataset's object actually looks like. The default model is SmolVLM-256M-Instruct
(Marafioti et al., "SmolVLM: Redefining small and efficient multimodal models", arXiv 2504.05299); any model
transformers loads with ``AutoModelForImageTextToText`` and ``AutoProcessor`` works (Idefics3, LLaVA, ...).

Decoding is greedy, so the same image gives the same caption; captions are cached per image in the instance.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from kka_synth.prompts.templates import render_prompt
from kka_synth.utils.devices import resolve_device, resolve_dtype
from kka_synth.utils.hub import load_pretrained

logger = logging.getLogger(__name__)

FIELD = "proposer.caption_model"
"""The config field that names the caption model (named in load errors)."""


class Captioner:
    """Describes a normal image of a category in one line with an image-text-to-text model.

    Args:
        model: Hub id or local directory of the model and its processor (``proposer.caption_model``).
        device: auto (cuda when available), cpu, cuda, cuda:N or mps.
        max_new_tokens: longest caption in tokens.

    Raises:
        ModelLoadError: the model or processor cannot be loaded (one line naming ``proposer.caption_model``).
        ValueError: an unknown or unavailable device, or ``max_new_tokens`` < 1.
    """

    def __init__(self, model: str, device: str = "auto", max_new_tokens: int = 48) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        _check_tokens(max_new_tokens)
        target = resolve_device(device)
        dtype = resolve_dtype("auto", target, cuda_auto="bfloat16")
        processor = load_pretrained(
            AutoProcessor.from_pretrained, model, "the caption model's processor", FIELD
        )
        vlm = load_pretrained(
            AutoModelForImageTextToText.from_pretrained, model, "the caption model", FIELD, dtype=dtype
        )
        self._setup(vlm.to(target), processor, max_new_tokens)

    @classmethod
    def from_components(cls, model: Any, processor: Any, max_new_tokens: int = 48) -> Captioner:
        """A captioner around a loaded image-text-to-text ``model`` (on its device) and its ``processor``."""
        _check_tokens(max_new_tokens)
        captioner = cls.__new__(cls)
        captioner._setup(model, processor, max_new_tokens)
        return captioner

    def _setup(self, model: Any, processor: Any, max_new_tokens: int) -> None:
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self._cache: dict[tuple[str, str], str] = {}

    def caption(self, image: np.ndarray, category: str) -> str:
        """One line describing ``image`` (RGB uint8, (H, W, 3)), a normal sample of ``category``.

        Raises:
            ValueError: ``image`` is not an RGB uint8 array, or ``category`` is empty.
        """
        _check_image(image)
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"category must be a non-empty string, got {category!r}")
        digest = hashlib.sha256(
            repr(image.shape).encode() + np.ascontiguousarray(image).tobytes()
        ).hexdigest()
        key = (digest, category.strip())
        if key not in self._cache:
            self._cache[key] = self._generate(image, category.strip())
            logger.debug("caption of a %s image: %s", category, self._cache[key])
        return self._cache[key]

    def prompt(self, category: str) -> str:
        """What the model reads: one image and the ``caption_question`` prompt in the processor's template."""
        question = render_prompt("caption_question", category=category)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", None)
        if not image_token:
            raise ValueError(
                f"the caption model's processor ({type(self.processor).__name__}) has neither a chat "
                "template nor an image token; use an instruct image-text-to-text model"
            )
        return f"{image_token}\n{question}"

    def _generate(self, image: np.ndarray, category: str) -> str:
        import torch
        from PIL import Image

        inputs = self.processor(
            images=[Image.fromarray(image)], text=[self.prompt(category)], return_tensors="pt"
        )
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # casts only the float tensors
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens
            )  # (1, prompt + new tokens)
        new = out[:, inputs["input_ids"].shape[1] :]
        text = self.processor.batch_decode(new, skip_special_tokens=True)[0]
        return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _check_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"image must be RGB uint8 of shape (H, W, 3), got {image.dtype} {image.shape}")

"""Tiny random diffusers pipelines saved to a folder, so tests load them through the real ``from_pretrained``.

Every component is built from a config with a fixed seed: a two-block UNet (``in_channels`` 9 for inpainting,
8 for instruction editing, 4 for text-to-image), a two-block ``AutoencoderKL``, a two-layer ``CLIPTextModel``,
a ``CLIPTokenizer`` whose byte-level vocabulary and (empty) merges are written here, and a DDIM scheduler.
Two steps at 64 pixels take a fraction of a second on one CPU thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KINDS = {
    "inpaint": ("StableDiffusionInpaintPipeline", 9),
    "edit": ("StableDiffusionInstructPix2PixPipeline", 8),
    "text2img": ("StableDiffusionPipeline", 4),
}
"""Kind -> (diffusers pipeline class, UNet input channels)."""

HIDDEN = 32
"""Width of the text encoder and of the UNet's cross-attention."""


def byte_characters() -> list[str]:
    """The 256 printable characters a byte-level BPE uses for the bytes 0..255, in byte order.

    Printable Latin-1 bytes stand for themselves; the others are mapped, in order, to code points from 256 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = 0
    characters = []
    for byte in range(256):
        if byte in printable:
            characters.append(chr(byte))
        else:
            characters.append(chr(256 + extra))
            extra += 1
    return characters


def write_clip_tokenizer(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a CLIP tokenizer with no merges (one token per byte)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    characters = byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(str(folder))
    return folder


def build_components(kind: str, tokenizer_folder: Path, vae_blocks: int = 2) -> dict:
    """The pipeline's components (random weights, seed 0) for ``kind`` in :data:`KINDS`.

    The VAE has ``vae_blocks`` blocks, so its latent grid is ``2 ** (vae_blocks - 1)`` times coarser than the
    image (2 by default; 4 blocks give Stable Diffusion's 8, which keeps 512-pixel images cheap).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=KINDS[kind][1],
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32) if vae_blocks == 2 else (8,) * vae_blocks,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=16 if vae_blocks == 2 else 8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def save_tiny_pipeline(kind: str, folder: Path, vae_blocks: int = 2) -> Path:
    """Build the tiny ``kind`` pipeline ("inpaint", "edit" or "text2img") and save it into ``folder``."""
    import diffusers

    folder = Path(folder)
    components = build_components(kind, write_clip_tokenizer(folder / "_tokenizer"), vae_blocks)
    pipeline = getattr(diffusers, KINDS[kind][0])(**components)
    pipeline.save_pretrained(str(folder))
    return folder

"""A tiny random DINOv2 saved to a folder, which tests load with ``from_pretrained(path)``."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_DINOV2 = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "patch_size": 8,
    "image_size": 64,
}
"""Shape of the default tiny backbone: 2 blocks of width 32 over 8-pixel patches."""


def save_tiny_dinov2(folder: str | Path, seed: int = 0, **changes: int) -> Path:
    """Write a random ``Dinov2Model`` (``TINY_DINOV2`` updated with ``changes``) drawn from ``seed`` into
    ``folder``; the global torch random state is left as it was."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(Dinov2Config(**{**TINY_DINOV2, **changes}))
    model.save_pretrained(folder)
    return folder

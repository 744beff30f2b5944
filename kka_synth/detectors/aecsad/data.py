"""Image checks and conversions shared by AeCSAD's fit, predict and calibration set.

Inputs are checked and resized to the working square (``image_size``) with
:mod:`kka_synth.detectors.inputs`, then turned into float tensors in [0, 1] here. AeCSAD
(Amjad, MSc thesis, Ontario Tech University, 2025) and CSAD (Hsieh and Lai, BMVC 2024) work at 256 x 256.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_tensor(images: Sequence[np.ndarray], device: str) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    array = np.stack(images).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)

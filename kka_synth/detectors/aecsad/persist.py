"""What a fitted AeCSAD detector stores (written by :mod:`kka_synth.detectors.saved`), and its teacher check.

The detector (Amjad, MSc thesis, Ontario Tech University, 2025; after CSAD, Hsieh and Lai, BMVC 2024) holds
trained modules (segmentation decoder, teacher projection, students) and fitted numbers (patch-histogram
Gaussians, z-statistics, map quantiles). All of them go to one safetensors file under a prefix each; the
JSON holds the config and the small fitted values. The frozen WRN-50-2 teacher (275 MB) is left out unless
asked for: its weights are rebuilt from the seed or reloaded from ``teacher_weights``, and
:func:`teacher_checksum` guards against a rebuild that differs. Its batch-norm buffers are always written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kka_synth.detectors.saved import WEIGHTS_FILE


def teacher_checksum(wrn: nn.Module) -> float:
    """A fingerprint of a network's weights: the sum of the absolute values of every ``*weight`` parameter."""
    return float(
        sum(p.detach().abs().double().sum() for n, p in wrn.named_parameters() if n.endswith("weight"))
    )


def buffer_keys(module: nn.Module) -> set[str]:
    """State-dict keys of a module's saved buffers (batch-norm statistics)."""
    return set(module.state_dict()) & set(dict(module.named_buffers()))


def module_tensors(
    modules: dict[str, nn.Module], keep: dict[str, set[str]] | None = None
) -> dict[str, torch.Tensor]:
    """``prefix.key`` -> CPU tensor of each module's state dict (only ``keep[prefix]``'s keys when given)."""
    return {
        f"{prefix}.{key}": value.detach().cpu().contiguous()
        for prefix, module in modules.items()
        for key, value in module.state_dict().items()
        if keep is None or prefix not in keep or key in keep[prefix]
    }


def array_tensors(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``prefix.key`` -> tensor of numpy arrays (saved in their own dtype)."""
    return {f"{prefix}.{key}": torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def under(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved under ``prefix.``, with the prefix removed."""
    start = len(prefix) + 1
    return {key[start:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}


def restore_teacher(wrn: nn.Module, state: dict[str, torch.Tensor], checksum: float, where: Path) -> None:
    """Load a rebuilt teacher's saved buffers (or its whole saved state) after checking it is the same one."""
    if set(state) == set(wrn.state_dict()):
        wrn.load_state_dict(state)
        return
    rebuilt = teacher_checksum(wrn)
    if not np.isclose(rebuilt, checksum, rtol=1e-9):
        raise ValueError(
            f"{where}: the rebuilt teacher differs from the saved one (checksum {rebuilt:.6g} vs "
            f"{checksum:.6g}); save with aecsad.save_teacher true to keep its weights"
        )
    missing = buffer_keys(wrn) - set(state)
    if missing:
        raise ValueError(
            f"{where / WEIGHTS_FILE} lacks the teacher's batch-norm statistics ({sorted(missing)[0]})"
        )
    wrn.load_state_dict(state, strict=False)

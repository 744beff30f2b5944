"""Devices and dtypes named in the config ("auto", "cuda:1", "bfloat16"), resolved to torch objects."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` ("auto", "cpu", "cuda", "cuda:N", "mps") asks for; ValueError if absent."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use device auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available; use device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, cuda_auto: str = "float16") -> torch.dtype:
    """The torch dtype ``name`` means on ``device``: auto is ``cuda_auto`` on cuda, else float32.

    float16 on cpu is refused (slow or unsupported kernels); bfloat16 is allowed there.
    """
    import torch

    if name == "auto":
        name = cuda_auto if device.type == "cuda" else "float32"
    if name == "float16" and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on cpu; use dtype auto, float32 or bfloat16")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]

"""Answers "is this optional package installed?" and names the extra that brings it."""

from __future__ import annotations

import importlib.util

EXTRAS = {
    "diffusers": "diffusion",
    "vllm": "vllm",
    "langchain": "agents",
    "langchain_openai": "agents",
}


def is_available(module: str) -> bool:
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str) -> None:
    """Raise ImportError naming the pip extra when ``module`` is missing."""
    if not is_available(module):
        extra = EXTRAS.get(module)
        hint = f'pip install "kka-synth[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(f"{module} is not installed; {hint}")

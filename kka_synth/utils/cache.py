"""Where kka-synth keeps what it builds on first use (the demo dataset, the compact proposer)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``$KKA_SYNTH_CACHE`` or ``~/.cache/kka-synth``, joined with ``parts`` and created."""
    root = os.environ.get("KKA_SYNTH_CACHE")
    base = (
        Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kka-synth"
    )
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Loading pretrained weights by Hub id or local directory, with one clear error when they are not there.

Every ``from_pretrained`` of the hub profile goes through :func:`load_pretrained`, so a missing model reads
the same everywhere: one line naming what was asked for, the config field that names it, and the offline
profile that needs no weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ModelLoadError(RuntimeError):
    """Pretrained weights could not be loaded; the message is one line that says what to do."""


def load_pretrained(loader: Callable[..., T], name_or_path: str, what: str, field: str, **kwargs: Any) -> T:
    """Call ``loader(name_or_path, **kwargs)`` (a ``from_pretrained``) and turn a failure into ModelLoadError.

    ``what`` names the model in words ("the inpainting pipeline"); ``field`` is the config field that holds
    ``name_or_path`` ("render.inpaint.model").
    """
    if not name_or_path:
        raise ModelLoadError(f"{field} is empty: give a Hub id or a local directory for {what}")
    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{field} {name_or_path!r} is a file; {what} needs a model directory")
    try:
        return loader(str(local) if local.is_dir() else name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        where = (
            "local directory" if local.is_dir() else "Hub id (not found locally, and the Hub is unreachable?)"
        )
        logger.debug("loading %s from %s failed", what, name_or_path, exc_info=True)
        raise ModelLoadError(
            f"cannot load {what} from {where} {name_or_path!r} ({first[:160]}); set {field} to a local "
            "directory with the weights, or run with --profile offline"
        ) from None

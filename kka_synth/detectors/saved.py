"""How every detector is stored: ``config.json`` (its config and small fitted values) beside
``model.safetensors`` (its tensors), both written atomically into one folder.

:func:`write_saved` and :func:`read_saved` are the two halves; what goes into the JSON and under which
tensor names is each detector's own business.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def write_saved(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``meta`` and ``tensors`` into folder ``path``, each via a temporary name that is then renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights_tmp = path / (WEIGHTS_FILE + ".tmp")
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(weights_tmp))
    weights_tmp.replace(path / WEIGHTS_FILE)
    config_tmp = path / (CONFIG_FILE + ".tmp")
    config_tmp.write_text(json.dumps(meta, indent=2))
    config_tmp.replace(path / CONFIG_FILE)


def read_saved(
    path: Path, detector: str, title: str, device: str = "cpu"
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, tensors) of a folder :func:`write_saved` wrote for ``detector`` (``meta["detector"]``).

    ``title`` names the detector in errors: FileNotFoundError when a file is missing, ValueError when the
    JSON is unreadable or describes another detector.
    """
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no {title} detector at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / CONFIG_FILE} is not valid JSON: {error.msg}") from None
    if not isinstance(meta, dict) or meta.get("detector") != detector or "config" not in meta:
        raise ValueError(f"{path / CONFIG_FILE} does not describe a saved {title} detector")
    return meta, load_file(str(path / WEIGHTS_FILE), device=device)

"""The settings of a tiny demo run that the end-to-end tests share: two iterations of twelve proposals on
64 px demo images, a compact proposer pretrained for 150 steps, a small Deep SAD judge and one short DPO
epoch.

Tests take a fresh copy with :func:`tiny_settings`, passing what they change (deep-merged, so
``data={"categories": ["brick"]}`` keeps the dataset and image size).
"""

from __future__ import annotations

import copy
from typing import Any

TINY_RUN: dict[str, Any] = {
    "iterations": 2,
    "proposals_per_iteration": 12,
    "data": {"dataset": "demo", "image_size": 64},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {
        "pairs_per_prompt": 4,
        "max_pairs": 16,
        "dpo": {"num_train_epochs": 1, "per_device_train_batch_size": 4},
    },
}
"""Run settings (a RunConfig dict without ``name`` and ``out``) of the tiny demo run."""


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``overrides`` merged in: dicts merge by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_settings(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_RUN` with ``overrides`` deep-merged into it.

    Args:
        **overrides: top-level config fields; a dict value merges into the field's dict (a nested dict
            merges likewise), any other value replaces the field.

    Returns:
        The settings, sharing no mutable part with :data:`TINY_RUN` or ``overrides``.
    """
    return _merged(TINY_RUN, overrides)

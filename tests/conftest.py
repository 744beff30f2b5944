"""Shared fixtures. Every test runs offline with a private cache folder shared by the session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the cache at a session folder so tests never touch the user's cache."""
    os.environ["KKA_SYNTH_CACHE"] = str(tmp_path_factory.mktemp("kka-cache"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)

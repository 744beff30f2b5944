"""Detectors trained on normal images plus synthetic anomalies and evaluated on a real test split.

Every detector follows one interface; ``DETECTORS`` maps CLI names to classes (one plain dict, no plugin
machinery). Each detector lives in its own folder (``model.py`` holds the nn.Modules, ``train.py`` the loop).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from kka_synth.detectors.aecsad import AecsadDetector
from kka_synth.detectors.draem import DraemDetector
from kka_synth.detectors.vfm import VfmDetector
from kka_synth.types import DetectorOutput, SyntheticStage


class Detector(Protocol):
    def fit(self, normal: list[np.ndarray], synthetic: list[SyntheticStage] | None = None) -> None:
        """Train on normal RGB images, then on each synthetic stage in order for its share of the steps.

        ``synthetic=None`` trains on normal images alone (the "none" variant of the evaluation protocol).
        """

    def predict(self, images: list[np.ndarray]) -> DetectorOutput:
        """Score RGB images: one score per image and one map per image at the input size."""

    def save(self, path: Path) -> None: ...

    @classmethod
    def load(cls, path: Path) -> Detector: ...


DETECTORS: dict[str, type] = {"aecsad": AecsadDetector, "draem": DraemDetector, "vfm": VfmDetector}
"""CLI name -> detector class; the bundled detectors register here as they are added."""

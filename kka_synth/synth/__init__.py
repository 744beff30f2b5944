"""Renderers that draw a :class:`~kka_synth.types.DefectSpec` onto a normal image, and the filters that
reject failed renders.

``RENDERERS`` maps each CLI name to its class; every renderer is
``render(image, spec, rng) -> (image, mask)``.
"""

from kka_synth.synth.base import Renderer, RenderError
from kka_synth.synth.filters import (
    EditLocality,
    FilterError,
    MatchCountBand,
    apply_filters,
    build_filters,
    calibrate_filters,
    restore_filters,
)
from kka_synth.synth.foreground import ForegroundCache, estimate_foreground, foreground_box
from kka_synth.synth.perlin import PerlinRenderer
from kka_synth.synth.procedural import ProceduralRenderer

RENDERERS: dict[str, type] = {"procedural": ProceduralRenderer, "perlin": PerlinRenderer}

__all__ = [
    "RENDERERS",
    "EditLocality",
    "FilterError",
    "MatchCountBand",
    "apply_filters",
    "build_filters",
    "calibrate_filters",
    "restore_filters",
    "ForegroundCache",
    "PerlinRenderer",
    "ProceduralRenderer",
    "RenderError",
    "Renderer",
    "estimate_foreground",
    "foreground_box",
]

"""Renderers that draw a :class:`~kka_synth.types.DefectSpec` onto a normal image, and the filters that
reject failed renders.

``RENDERERS`` maps each CLI name to its class; every renderer is
``render(image, spec, rng) -> (image, mask)``. The diffusion renderers (inpaint, edit, text2img) import
diffusers only when they load their pipeline, so this package imports without it.
"""

from kka_synth.synth.base import Renderer, RenderError, RenderOutput, render_many
from kka_synth.synth.edit import EditRenderer
from kka_synth.synth.filters import (
    EditLocality,
    FilterError,
    MatchBand,
    MatchCountBand,
    apply_filters,
    apply_filters_batch,
    band_from_dict,
    build_band,
    build_filters,
    calibrate_filters,
    match_distribution,
    narrow_band,
    restore_filters,
)
from kka_synth.synth.foreground import ForegroundCache, estimate_foreground, foreground_box
from kka_synth.synth.inpaint import InpaintRenderer
from kka_synth.synth.lightglue import LightGlueBand
from kka_synth.synth.perlin import PerlinRenderer
from kka_synth.synth.procedural import ProceduralRenderer
from kka_synth.synth.text2img import Text2ImageRenderer

RENDERERS: dict[str, type] = {
    "procedural": ProceduralRenderer,
    "perlin": PerlinRenderer,
    "inpaint": InpaintRenderer,
    "edit": EditRenderer,
    "text2img": Text2ImageRenderer,
}

__all__ = [
    "RENDERERS",
    "EditLocality",
    "EditRenderer",
    "FilterError",
    "LightGlueBand",
    "MatchBand",
    "MatchCountBand",
    "apply_filters",
    "apply_filters_batch",
    "band_from_dict",
    "build_band",
    "build_filters",
    "calibrate_filters",
    "match_distribution",
    "narrow_band",
    "restore_filters",
    "ForegroundCache",
    "InpaintRenderer",
    "PerlinRenderer",
    "ProceduralRenderer",
    "RenderError",
    "RenderOutput",
    "Renderer",
    "Text2ImageRenderer",
    "estimate_foreground",
    "foreground_box",
    "render_many",
]

"""The renderer contract shared by every renderer of :mod:`kka_synth.synth`.

A renderer turns a normal image and a :class:`~kka_synth.types.DefectSpec` into a defect image and the mask of
the pixels it changed: ``render(image, spec, rng) -> (image, mask)``. Images are RGB ``uint8`` (H, W, 3);
masks are ``bool`` (H, W). A render that cannot be made raises :class:`RenderError` with a short ``reason``
code that the loop counts, never a traceback from inside numpy.

Renderers that run a model in batches (the diffusion renderers) also have ``render_batch(images, specs,
rngs) -> list[RenderOutput | RenderError]``: one entry per candidate, a failure never sinking the batch, and
each candidate's pixels fixed by its own rng whatever batch it lands in. :func:`render_many` calls either
kind the same way.

This module also holds the small pieces every renderer shares: input checks, smoothstep, and the final
rounding that keeps unmasked pixels bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from kka_synth.types import DefectSpec

MIN_SIDE = 8
"""Smallest image side a renderer accepts."""


class RenderError(ValueError):
    """A render could not be made; ``reason`` is a short stable code such as ``"no_foreground"``."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Renderer(Protocol):
    """Draws one defect described by a spec onto a normal image."""

    name: str

    def render(
        self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return a new RGB uint8 image of the same size and the bool mask of the pixels that changed."""
        ...


@dataclass
class RenderOutput:
    """One render of a batch."""

    image: np.ndarray
    """RGB uint8 (H, W, 3), the size of the source image."""
    mask: np.ndarray | None
    """bool (H, W): the pixels the defect changed; None when the renderer cannot tell (text-to-image far from
    every normal), which the run records as an absent mask."""
    source: int | None = None
    """For renderers that draw a whole new image: the index, among the references they were given, of the
    normal it is compared with. None means the source image passed in."""
    info: dict[str, Any] = field(default_factory=dict)
    """Plain JSON facts about the render (seed, areas, ...), kept in the candidate's record."""


def render_many(
    renderer: Renderer,
    images: Sequence[np.ndarray],
    specs: Sequence[DefectSpec],
    rngs: Sequence[np.random.Generator],
) -> list[RenderOutput | RenderError]:
    """Render every (image, spec, rng) with ``renderer.render_batch`` when it has one, else one at a time."""
    batch = getattr(renderer, "render_batch", None)
    if batch is not None:
        return batch(list(images), list(specs), list(rngs))
    out: list[RenderOutput | RenderError] = []
    for image, spec, rng in zip(images, specs, rngs, strict=True):
        try:
            rendered, mask = renderer.render(image, spec, rng)
            out.append(RenderOutput(rendered, mask))
        except RenderError as error:
            out.append(error)
    return out


def check_image(image: object, field: str = "image") -> np.ndarray:
    """Return ``image`` when it is an RGB uint8 array of shape (H, W, 3), else raise ``RenderError``."""
    if not isinstance(image, np.ndarray):
        raise RenderError("bad_image", f"{field} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise RenderError(
            "bad_image", f"{field} must be RGB uint8 (H, W, 3), got {image.dtype} {image.shape}"
        )
    if min(image.shape[:2]) < MIN_SIDE:
        raise RenderError(
            "bad_image", f"{field} sides must be at least {MIN_SIDE} pixels, got {image.shape[:2]}"
        )
    return image


def check_inputs(image: object, spec: object, rng: object) -> np.ndarray:
    """Validate the three arguments of ``render`` and return the image."""
    checked = check_image(image)
    if not isinstance(spec, DefectSpec):
        raise RenderError("bad_spec", f"spec must be a DefectSpec, got {type(spec).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise RenderError("bad_rng", f"rng must be a numpy Generator, got {type(rng).__name__}")
    return checked


def smoothstep(x: np.ndarray) -> np.ndarray:
    """The cubic smoothstep of ``x`` clipped to [0, 1]."""
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def finish(image: np.ndarray, rendered: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round a float render to uint8, keep every pixel outside ``mask`` bit-identical, and check the mask."""
    if not mask.any():
        raise RenderError("empty_mask", "the defect covers no pixel")
    out = np.clip(np.rint(rendered), 0, 255).astype(np.uint8)
    out = np.where(mask[..., None], out, image)
    return out, mask

"""Mask-guided diffusion inpainting of a spec's defect at the spec's place.

The pipeline is any diffusers inpainting pipeline its ``model_index.json`` names (Stable Diffusion
inpainting, Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022; SDXL;
FLUX fill/inpaint). Where the defect goes and what shape it has come from the spec exactly as for the
procedural renderer (:meth:`~kka_synth.synth.procedural.ProceduralRenderer.place`: region, size and shape on
the object's foreground, or on a foreground mask the user gives per category).

One candidate:

1. the requested mask is placed on the source image;
2. the image is resized to the working resolution, and the mask is grown to whole latent cells plus one cell
   of context (:func:`~kka_synth.synth.diffusion.grow_to_latent_grid`), so a one-pixel scratch is still
   repainted;
3. the pipeline repaints the mask from the prompt :meth:`DefectSpec.prompt` (used as is: it already names the
   defect, its look and the object) and the category's negative prompt;
4. the render is resized back and blended into the source through the requested mask feathered by
   ``config.feather`` of the shorter side; pixels with zero weight stay bit-identical;
5. the returned mask is what actually changed (:func:`~kka_synth.synth.diffusion.change_mask` inside the
   blend area), not the requested mask; nothing changed is ``RenderError("no_change")``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from kka_synth.config import DiffusionConfig
from kka_synth.synth.base import RenderError, RenderOutput, check_inputs
from kka_synth.synth.diffusion import (
    DiffusionRenderer,
    Job,
    SpecPlacer,
    change_mask,
    composite,
    feathered_alpha,
    grow_to_latent_grid,
    resize_mask,
    resize_rgb,
    seed_from,
    working_size,
)
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)


@dataclass
class InpaintPlan:
    """Where one candidate is repainted and blended."""

    requested: np.ndarray
    """bool (H, W): the spec's placed mask on the source."""
    repaint: np.ndarray
    """bool (h, w): the mask handed to the pipeline, at the working size, grown to whole latent cells."""
    alpha: np.ndarray
    """float32 (H, W): the blend weight of the render; exactly 0 where the source is kept."""
    seed: int
    size: tuple[int, int]
    """Working (height, width)."""


class InpaintRenderer(DiffusionRenderer):
    """Repaints the spec's placed mask with a diffusers inpainting pipeline and blends it into the source.

    Args:
        config: the pipeline and sampling settings (``render.inpaint``).
        negative_prompts: category -> negative prompt (a missing category gets "").
        foreground_masks: category -> bool (H, W) foreground that replaces the estimate for that category
            (resized to each image, nearest).
    """

    name = "inpaint"

    def __init__(
        self,
        config: DiffusionConfig,
        negative_prompts: dict[str, str] | None = None,
        foreground_masks: dict[str, np.ndarray] | None = None,
    ):
        super().__init__(config, negative_prompts)
        self.placer = SpecPlacer(foreground_masks)

    def plan(self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> InpaintPlan:
        """Place the spec and derive the pipeline's mask and the blend weight (draws from ``rng``)."""
        image = check_inputs(image, spec, rng)
        place_rng = np.random.default_rng(seed_from(rng))
        seed = seed_from(rng)
        requested = self.placer.place(image, spec, place_rng)
        height, width = image.shape[:2]
        size = working_size(height, width, self.config.resolution)
        repaint = grow_to_latent_grid(resize_mask(requested, size), self.latent_cell)
        alpha = feathered_alpha(requested, self.config.feather * min(height, width))
        return InpaintPlan(requested, repaint, alpha, seed, size)

    def _prepare(self, index: int, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> Job:
        plan = self.plan(image, spec, rng)
        return Job(
            index=index,
            prompt=spec.prompt(),
            negative_prompt=self.negative_prompt(spec.category),
            seed=plan.seed,
            size=plan.size,
            source=image,
            image=resize_rgb(image, plan.size),
            mask=plan.repaint,
            context=plan,
        )

    def _pipeline_kwargs(self, jobs: list[Job]) -> dict[str, Any]:
        return {
            "image": [Image.fromarray(job.image) for job in jobs],
            "mask_image": [Image.fromarray(job.mask.astype(np.uint8) * 255) for job in jobs],
            "strength": self.config.strength,
        }

    def _finish(self, job: Job, rendered: np.ndarray) -> RenderOutput:
        plan: InpaintPlan = job.context
        source = job.source
        out = composite(source, resize_rgb(rendered, source.shape[:2]), plan.alpha)
        changed = change_mask(source, out, self.config.change_threshold, within=plan.alpha > 0)
        if not changed.any():
            raise RenderError(
                "no_change", f"no pixel changed by more than {self.config.change_threshold} grey levels"
            )
        info = {
            "seed": plan.seed,
            "requested_area": int(plan.requested.sum()),
            "changed_area": int(changed.sum()),
            "working_size": list(plan.size),
        }
        return RenderOutput(out, changed, None, info)

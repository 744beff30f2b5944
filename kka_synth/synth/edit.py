"""Instruction editing: a spec turned into an edit instruction, kept inside the spec's allowed area.

The pipeline is InstructPix2Pix (Brooks, Holynski and Efros, "InstructPix2Pix: Learning to Follow Image
Editing Instructions", CVPR 2023), or a MagicBrush checkpoint (Zhang et al., "MagicBrush: A Manually
Annotated Dataset for Instruction-Guided Image Editing", NeurIPS 2023), which loads the same way. "Anomaly
Detection by Effectively Leveraging Synthetic Images" (arXiv 2512.23227) makes its generative defects with
such training-free local edits.

One candidate:

1. the instruction is ``"add " + spec.prompt()``, e.g. "add a subtle dark scratch (scratch) in the top area
   of a bottle"; text guidance is ``config.guidance_scale`` and image guidance
   ``config.image_guidance_scale``;
2. the editor sees the whole image at the working resolution and returns a whole image; it gives no mask;
3. for spatial control, the edit is kept only inside the spec's allowed area (the object's foreground inside
   the spec's region box, as the procedural renderer places it) grown by :data:`EDIT_MARGIN` of the shorter
   side and feathered by ``config.feather``; the source is kept bit-identical elsewhere;
4. the mask is what changed (:func:`~kka_synth.synth.diffusion.change_mask`). Nothing changed is
   ``RenderError("no_change")``; a change covering more than ``max_change_share`` of the edit area (where the
   blend weight is at least one half) restyles the whole region rather than adding a defect:
   ``RenderError("global_change")``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import cv2
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
    resize_rgb,
    seed_from,
    working_size,
)
from kka_synth.synth.foreground import allowed_area
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)

EDIT_MARGIN = 0.02
"""How far, as a share of the shorter side, an edit may reach beyond the spec's allowed area."""


def instruction(spec: DefectSpec) -> str:
    """The edit instruction for a spec."""
    return f"add {spec.prompt()}"


class EditRenderer(DiffusionRenderer):
    """Edits the image by an instruction made from the spec and keeps the edit inside the spec's area.

    Args:
        config: the pipeline and sampling settings (``render.edit``).
        negative_prompts: category -> negative prompt (a missing category gets "").
        foreground_masks: category -> bool (H, W) foreground that replaces the estimate for that category.
        max_change_share: largest share of the edit area (blend weight at least 0.5) the change may cover;
            None accepts any.
    """

    name = "edit"

    def __init__(
        self,
        config: DiffusionConfig,
        negative_prompts: dict[str, str] | None = None,
        foreground_masks: dict[str, np.ndarray] | None = None,
        max_change_share: float | None = 0.9,
    ):
        super().__init__(config, negative_prompts)
        if max_change_share is not None and not 0.0 < max_change_share <= 1.0:
            raise ValueError(f"max_change_share must be in (0, 1] or None, got {max_change_share}")
        self.placer = SpecPlacer(foreground_masks)
        self.max_change_share = max_change_share

    def blend_alpha(self, image: np.ndarray, spec: DefectSpec) -> np.ndarray:
        """float32 (H, W): where the edit is kept, 1 on the grown allowed area and feathered around it."""
        foreground = self.placer.foreground(image, spec.category)
        allowed, _ = allowed_area(foreground, spec)
        side = min(image.shape[:2])
        grow = math.ceil(EDIT_MARGIN * side)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
        grown = cv2.dilate(allowed.astype(np.uint8), kernel).astype(bool)
        return feathered_alpha(grown, self.config.feather * side)

    def _prepare(self, index: int, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> Job:
        image = check_inputs(image, spec, rng)
        size = working_size(*image.shape[:2], self.config.resolution)
        return Job(
            index=index,
            prompt=instruction(spec),
            negative_prompt=self.negative_prompt(spec.category),
            seed=seed_from(rng),
            size=size,
            source=image,
            image=resize_rgb(image, size),
            context=self.blend_alpha(image, spec),
        )

    def _pipeline_kwargs(self, jobs: list[Job]) -> dict[str, Any]:
        return {
            "image": [Image.fromarray(job.image) for job in jobs],
            "image_guidance_scale": self.config.image_guidance_scale,
        }

    def _finish(self, job: Job, rendered: np.ndarray) -> RenderOutput:
        alpha: np.ndarray = job.context
        source = job.source
        out = composite(source, resize_rgb(rendered, source.shape[:2]), alpha)
        blend = alpha > 0
        changed = change_mask(source, out, self.config.change_threshold, within=blend)
        if not changed.any():
            raise RenderError(
                "no_change",
                f"the edit changed no pixel by more than {self.config.change_threshold} grey levels",
            )
        kept = int((alpha >= 0.5).sum())
        share = float(changed.sum()) / max(kept, 1)
        if self.max_change_share is not None and share > self.max_change_share:
            raise RenderError(
                "global_change",
                f"the edit changed {share:.0%} of its area (more than {self.max_change_share:.0%})",
            )
        info = {
            "seed": job.seed,
            "instruction": job.prompt,
            "edit_area": kept,
            "changed_area": int(changed.sum()),
            "working_size": list(job.size),
        }
        return RenderOutput(out, changed, None, info)

"""Text-to-image defects, KKA's renderer: a whole new image drawn from the spec's description.

KKA ("Improving Vision Anomaly Detection through Anomaly-related Knowledge from LLMs", arXiv 2502.14880) turns
each LLM-written anomaly description into an image with a text-to-image diffusion model. Here the prompt is
``"a photo showing " + spec.prompt()`` (the spec's defect, look, place and object) with the category's
negative prompt, and the image is drawn at the source image's size (through the working resolution).

A generated image has no source to diff against, so it is compared with the nearest normal image of its
category: among the references given by :meth:`Text2ImageRenderer.set_references` (nearest by the distance
between 16x16 grayscale thumbnails), or the image passed to ``render`` when the category has none. The mask
is the cleaned difference to that normal (:func:`~kka_synth.synth.diffusion.change_mask`). When it is empty,
or covers more than ``max_mask_share`` of the image (the generated image is not that normal plus a defect),
the mask is absent: ``RenderOutput.mask`` is None and ``info["mask"]`` is ``"absent"``.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from kka_synth.config import DiffusionConfig
from kka_synth.synth.base import RenderOutput, check_image, check_inputs
from kka_synth.synth.diffusion import DiffusionRenderer, Job, change_mask, resize_rgb, seed_from, working_size
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)

THUMBNAIL = 16
"""Side of the grayscale thumbnails that pick the nearest reference."""


def thumbnail(image: np.ndarray) -> np.ndarray:
    """float32 (16, 16) grayscale thumbnail of an RGB uint8 image."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMBNAIL, THUMBNAIL), interpolation=cv2.INTER_AREA).astype(np.float32)


def text2img_prompt(spec: DefectSpec) -> str:
    """The text-to-image prompt for a spec."""
    return f"a photo showing {spec.prompt()}"


class Text2ImageRenderer(DiffusionRenderer):
    """Draws a whole image from the spec and reads its mask from the nearest normal reference.

    Args:
        config: the pipeline and sampling settings (``render.text2img``).
        negative_prompts: category -> negative prompt (a missing category gets "").
        max_mask_share: largest share of the image the difference mask may cover before it is absent.
    """

    name = "text2img"

    def __init__(
        self,
        config: DiffusionConfig,
        negative_prompts: dict[str, str] | None = None,
        max_mask_share: float = 0.5,
    ):
        super().__init__(config, negative_prompts)
        if not 0.0 < max_mask_share <= 1.0:
            raise ValueError(f"max_mask_share must be in (0, 1], got {max_mask_share}")
        self.max_mask_share = max_mask_share
        self.references: dict[str, list[np.ndarray]] = {}
        self._thumbnails: dict[str, np.ndarray] = {}

    def set_references(self, category: str, normals: list[np.ndarray]) -> None:
        """Normal images of ``category`` (RGB uint8, any sizes) that renders are compared with."""
        if not normals:
            raise ValueError(f"set_references needs at least one normal image for {category!r}")
        checked = [check_image(image, f"normals[{i}]") for i, image in enumerate(normals)]
        self.references[category] = checked
        self._thumbnails[category] = np.stack([thumbnail(image) for image in checked])  # (N, 16, 16)

    def nearest_reference(self, image: np.ndarray, category: str) -> int | None:
        """Index of the reference of ``category`` nearest to ``image``; None when it has none."""
        if category not in self._thumbnails:
            return None
        distances = ((self._thumbnails[category] - thumbnail(image)[None]) ** 2).mean(axis=(1, 2))
        return int(np.argmin(distances))

    def _prepare(self, index: int, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> Job:
        image = check_inputs(image, spec, rng)
        return Job(
            index=index,
            prompt=text2img_prompt(spec),
            negative_prompt=self.negative_prompt(spec.category),
            seed=seed_from(rng),
            size=working_size(*image.shape[:2], self.config.resolution),
            source=image,
            context=spec,
        )

    def _finish(self, job: Job, rendered: np.ndarray) -> RenderOutput:
        spec: DefectSpec = job.context
        out = resize_rgb(rendered, job.source.shape[:2]).copy()
        nearest = self.nearest_reference(out, spec.category)
        normal = job.source if nearest is None else self.references[spec.category][nearest]
        normal = resize_rgb(normal, out.shape[:2])
        mask: np.ndarray | None = change_mask(normal, out, self.config.change_threshold)
        share = float(mask.mean())
        info = {"seed": job.seed, "mask": "difference", "mask_share": share, "working_size": list(job.size)}
        if not mask.any() or share > self.max_mask_share:
            mask = None
            info["mask"] = "absent"
        return RenderOutput(out, mask, nearest, info)

"""Preview renders for `kka-synth chat`: a few proposals drawn on normal images and saved as PNG files.

The ``preview`` tool of :class:`~kka_synth.agents.chat.ChatSession` renders the specs a chat just proposed
with the run's own renderers (``config.render``, the same pick-and-fall-back order as a run's render stage),
so the user sees what a run would make before starting one. For proposal ``k`` of a category it writes
``<category>-<k>.png`` (the render), ``<category>-<k>-mask.png`` (the defect mask) and
``<category>-<k>-overlay.png`` (the render with the masked pixels tinted and the mask outlined).

The data loaders, renderers and image writers are imported inside the functions, so importing the chat does
not load them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kka_synth.agents.chat_values import ToolError
from kka_synth.config import DataConfig, RunConfig
from kka_synth.types import Proposal

if TYPE_CHECKING:
    from kka_synth.synth.base import RenderOutput
    from kka_synth.synth.stage import RenderResult

TINT = 0.4
"""Share of the outline colour mixed into the masked pixels of a preview overlay."""


def normal_images(data: DataConfig, category: str) -> list[np.ndarray]:
    """The category's normal training images (RGB uint8 (H, W, 3) at ``data.image_size``), sorted by path.

    Raises:
        ToolError: the category has no normal training image.
    """
    from kka_synth.data import load_rgb, load_samples

    samples = load_samples(data.dataset, data.root, [category], columns=data.hf_columns)
    good = sorted(
        (s for s in samples if s.split == "train" and s.label == 0), key=lambda s: str(s.image_path)
    )
    if not good:
        raise ToolError(f"{category} has no normal training images to render on")
    return [load_rgb(s.image_path, data.image_size) for s in good]


def build_render_stage(config: RunConfig, negative_prompts: dict[str, str]) -> dict[str, Any]:
    """The renderers ``config.render`` names, by name; diffusion pipelines load here.

    Args:
        config: the run configuration (its ``render`` section and the image size of ``data``).
        negative_prompts: each category's negative prompt, for the diffusion renderers.
    """
    from kka_synth.data import load_mask
    from kka_synth.synth import RENDERERS
    from kka_synth.synth.stage import build_renderers

    size = config.data.image_size
    masks = {n: load_mask(p, size) for n, p in config.render.foreground_masks.items()}
    return build_renderers(config.render, RENDERERS, negative_prompts, masks)


def render_previews(
    config: RunConfig,
    category: str,
    proposals: list[Proposal],
    normals: list[np.ndarray],
    renderers: dict[str, Any],
    draw: int,
) -> list[RenderResult]:
    """Render each parsed proposal on one of ``normals``; results follow ``proposals``, keyed 1, 2, ...

    Proposal ``k`` gets its own generator, seeded by ``(config.seed, draw, k)``: it picks the source image
    and the renderer order (``config.render.weights``) and drives the render, so a new ``draw`` gives new
    previews and the same draw gives the same pixels.

    Args:
        config: the run configuration (seed and render section).
        category: the category the proposals are for.
        proposals: parsed proposals (each has a spec).
        normals: the category's normal images, RGB uint8 (H, W, 3).
        renderers: the renderers by name (:func:`build_render_stage`).
        draw: the number of this preview in the chat.
    """
    from kka_synth.synth.stage import RenderJob, render_jobs, renderer_order

    jobs = []
    for k, proposal in enumerate(proposals, 1):
        if proposal.spec is None:
            raise ToolError(f"proposal {k} for {category} was rejected ({proposal.error}); nothing to render")
        rng = np.random.default_rng([config.seed, draw, k])
        order = renderer_order(config.render.renderers, config.render.weights, rng)
        jobs.append(RenderJob(k, category, proposal.spec, int(rng.integers(len(normals))), rng, order))
    return render_jobs(jobs, renderers, {category: normals})


def preview_lines(results: list[RenderResult], category: str, folder: Path) -> list[str]:
    """Save each rendered result to ``folder`` and describe it in a numbered line with its file paths.

    A failed render gets one line with the reason and the renderers tried.
    """
    lines = []
    for result in results:
        k, spec = result.job.key, result.job.spec
        if result.output is None:
            tried = ", ".join(result.job.errors) or "no renderer"
            lines.append(f"{k}. {spec.defect_type}: render failed ({result.reason}; tried {tried})")
            continue
        lines.append(f"{k}. {spec.defect_type} at {spec.region_name() or 'a box'} ({result.renderer}):")
        lines += [f"   {path}" for path in save_preview(folder, category, k, result.output)]
    return lines


def tinted(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` (RGB uint8 (H, W, 3)) with the pixels of ``mask`` (bool (H, W)) mixed :data:`TINT` toward
    ``colour``; the other pixels are unchanged."""
    pixels = image.astype(np.float32)  # (H, W, 3)
    pixels[mask] = (1 - TINT) * pixels[mask] + TINT * np.asarray(colour, np.float32)
    return pixels.round().astype(np.uint8)


def save_preview(folder: Path, category: str, k: int, output: RenderOutput) -> list[Path]:
    """Write render ``k`` of ``category`` to ``folder``: image, overlay and (when it has one) mask.

    Without a mask the overlay is the render itself.

    Returns:
        The paths written: image, overlay, then mask when there is one.
    """
    from PIL import Image

    from kka_synth.data import save_mask, save_rgb
    from kka_synth.eval.html import OUTLINE, outlined

    image_path = folder / f"{category}-{k}.png"
    overlay_path = folder / f"{category}-{k}-overlay.png"
    save_rgb(image_path, output.image)
    if output.mask is None:
        save_rgb(overlay_path, output.image)
        return [image_path, overlay_path]
    mask_path = folder / f"{category}-{k}-mask.png"
    save_mask(mask_path, output.mask)
    overlay = outlined(Image.fromarray(tinted(output.image, output.mask, OUTLINE)), mask_path)
    save_rgb(overlay_path, np.asarray(overlay))
    return [image_path, overlay_path, mask_path]


__all__ = [
    "TINT",
    "build_render_stage",
    "normal_images",
    "preview_lines",
    "render_previews",
    "save_preview",
    "tinted",
]

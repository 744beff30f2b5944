"""What the diffusion renderers (inpaint, edit, text2img) share: loading, devices, batching, masks, blending.

The renderers run latent diffusion pipelines from diffusers (Rombach et al., "High-Resolution Image Synthesis
with Latent Diffusion Models", CVPR 2022): the model works on a latent grid the VAE makes ``vae_scale_factor``
(8 for Stable Diffusion) times coarser than the image, which is why a requested mask is grown to whole latent
cells before it reaches an inpainting pipeline.

Choices made here, in one place for the three renderers:

- device ``auto`` is cuda when available, else cpu; dtype ``auto`` is float16 on cuda and float32 elsewhere.
  An explicit float16 on cpu is refused with a one-line ``ValueError`` (half-precision kernels are missing or
  very slow there) rather than silently run in float32; bfloat16 is honoured everywhere.
- Every candidate gets its own CPU ``torch.Generator`` seeded from its numpy rng, and diffusers draws each
  batch member's noise from its own generator, so a candidate's pixels do not depend on the batch it lands in
  (bit-identical on CPU; GPU kernels may pick batch-size-dependent algorithms and differ in the last bits).
- The pipeline works at ``config.resolution`` (longer side; both sides multiples of 8) and its result is
  resized back to the source size. Candidates of one working size share a pipeline call, ``batch_size`` at
  a time; a failed call fails only its own candidates.
- The mask of what changed is read from the difference to the source (:func:`change_mask`), and a render is
  blended into the source through :func:`feathered_alpha`, which is exactly 0 far from its mask, so those
  pixels stay bit-identical.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from kka_synth.config import DiffusionConfig
from kka_synth.synth.base import RenderError, RenderOutput
from kka_synth.synth.procedural import ProceduralRenderer
from kka_synth.types import DefectSpec
from kka_synth.utils.devices import resolve_device, resolve_dtype
from kka_synth.utils.hub import ModelLoadError, load_pretrained
from kka_synth.utils.imports import require

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PIPELINE_LOADERS = {
    "inpaint": ("AutoPipelineForInpainting", "the inpainting pipeline"),
    "edit": ("DiffusionPipeline", "the instruction-editing pipeline"),
    "text2img": ("AutoPipelineForText2Image", "the text-to-image pipeline"),
}
"""Renderer name -> (the diffusers class whose ``from_pretrained`` loads it, the pipeline in words)."""

EDIT_PIPELINES = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")
"""Pipeline classes the edit renderer accepts (MagicBrush checkpoints are InstructPix2Pix pipelines)."""

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "dpm_solver": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
"""``config.SCHEDULERS`` names -> diffusers scheduler classes."""

STRONG_CHANGE = 2.0
"""A pixel whose change exceeds this many times the threshold is always in the change mask."""

MIN_COMPONENT_SHARE = 1e-4
"""Weakly changed components smaller than this share of the image (and 9 pixels) are dropped."""

PLACE_SIDE = 128
"""Longest side at which a spec is placed. The procedural geometry scales with the image side (its widths
are set for 128 pixels and scaled by side / 128), so a larger image is placed on a downscaled copy and the
mask scaled back: the same shape at a fraction of the cost (placing a scratch directly on a 512-pixel image
takes about 0.7 s on one CPU thread, on its 128-pixel copy a few ms)."""


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Switch off the progress bars diffusers and transformers draw while loading, then restore them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    modules = (diffusers_logging, transformers_logging)
    states = [module.is_progress_bar_enabled() for module in modules]
    for module in modules:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, state in zip(modules, states, strict=True):
            if state:
                module.enable_progress_bar()


def load_pipeline(config: DiffusionConfig, kind: str, field: str, dtype: torch.dtype) -> Any:
    """Load the ``kind`` pipeline (a key of :data:`PIPELINE_LOADERS`) named by ``config.model``.

    The pipeline's ``model_index.json`` is read first: the edit renderer refuses anything but an
    InstructPix2Pix pipeline before loading weights, and the safety checker is switched off where the class
    has one. Failures are :class:`~kka_synth.utils.hub.ModelLoadError` naming ``field``.
    """
    require("diffusers")
    import diffusers

    loader_name, what = PIPELINE_LOADERS[kind]
    index = load_pretrained(diffusers.DiffusionPipeline.load_config, config.model, what, field)
    class_name = str(index.get("_class_name", ""))
    if kind == "edit" and class_name not in EDIT_PIPELINES:
        raise ModelLoadError(
            f"{field} {config.model!r} holds a {class_name or 'unknown'} pipeline; the edit renderer needs "
            f"an InstructPix2Pix pipeline ({' or '.join(EDIT_PIPELINES)})"
        )
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if "safety_checker" in index:
        kwargs["safety_checker"] = None
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = False
    loader = getattr(diffusers, loader_name)
    with _quiet_loading(), warnings.catch_warnings():
        # Recent diffusers renamed torch_dtype to dtype; torch_dtype still works in every version we support.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        pipeline = load_pretrained(loader.from_pretrained, config.model, what, field, **kwargs)
    logger.info("loaded %s %s from %s", what, type(pipeline).__name__, config.model)
    return pipeline


def prepare_pipeline(pipeline: Any, config: DiffusionConfig, device: torch.device, dtype: torch.dtype) -> Any:
    """Set a loaded pipeline's scheduler, attention slicing, dtype, and offload or device; no progress bar."""
    import diffusers

    pipeline.set_progress_bar_config(disable=True)
    if config.scheduler is not None:
        current = type(pipeline.scheduler).__name__
        if current.startswith("FlowMatch"):
            raise ValueError(
                f"scheduler {config.scheduler!r} cannot drive the flow-matching {type(pipeline).__name__} "
                f"(scheduler {current}); set scheduler to null"
            )
        scheduler_class = getattr(diffusers, SCHEDULERS[config.scheduler])
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    if config.attention_slicing:
        pipeline.enable_attention_slicing()
    if pipeline.dtype != dtype:
        pipeline.to(dtype=dtype)
    if config.offload != "none" and device.type != "cuda":
        logger.info("offload %r only applies on cuda; ignored on %s", config.offload, device)
    elif config.offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
        return pipeline
    elif config.offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
        return pipeline
    return pipeline.to(device)


def working_size(height: int, width: int, resolution: int | None) -> tuple[int, int]:
    """(height, width) the pipeline works at: the longer side scaled to ``resolution``, both rounded to 8.

    With ``resolution`` None the image keeps its size, rounded to multiples of 8.
    """
    scale = 1.0 if resolution is None else resolution / max(height, width)
    return max(8, round(height * scale / 8) * 8), max(8, round(width * scale / 8) * 8)


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 image resized to ``size`` (height, width): area when shrinking, cubic when enlarging."""
    if image.shape[:2] == tuple(size):
        return image
    shrink = size[0] <= image.shape[0] and size[1] <= image.shape[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``size`` (height, width), keeping every pixel that any masked pixel touches."""
    if mask.shape == tuple(size):
        return mask.copy()
    shrink = size[0] <= mask.shape[0] and size[1] <= mask.shape[1]
    resized = cv2.resize(
        mask.astype(np.float32),
        (size[1], size[0]),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    )
    return resized > 0


def grow_to_latent_grid(mask: np.ndarray, cell: int, margin: int = 1) -> np.ndarray:
    """The bool (H, W) mask grown to whole ``cell``-pixel latent cells, plus ``margin`` cells around them.

    Pipelines shrink the mask to the latent grid by nearest sampling (one pixel per cell), so a mask thinner
    than a cell could vanish; after this every touched cell is fully masked and survives.
    """
    height, width = mask.shape
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    padded = np.zeros((rows * cell, cols * cell), dtype=bool)
    padded[:height, :width] = mask
    cells = padded.reshape(rows, cell, cols, cell).any(axis=(1, 3)).astype(np.uint8)
    if margin > 0:
        cells = cv2.dilate(cells, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    return np.repeat(np.repeat(cells.astype(bool), cell, axis=0), cell, axis=1)[:height, :width]


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _window(mask: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """Row and column slices of ``mask``'s bounding box grown by ``pad`` (clipped); None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    return (
        slice(max(rows[0] - pad, 0), rows[-1] + pad + 1),
        slice(max(cols[0] - pad, 0), cols[-1] + pad + 1),
    )


def feathered_alpha(mask: np.ndarray, width: float) -> np.ndarray:
    """A float32 (H, W) blend weight: 1 on ``mask``, falling off over a Gaussian of sigma ``width`` outside.

    The mask is first grown by ``2 * width`` so that its own pixels keep full weight; the Gaussian's kernel
    is cut at three sigmas, so pixels farther than about ``5 * width`` from the mask get exactly 0. With
    ``width`` below half a pixel the alpha is the mask itself.
    """
    alpha = mask.astype(np.float32)
    window = _window(mask, math.ceil(2.0 * width) + math.ceil(3.0 * width) + 1)
    if width < 0.5 or window is None:
        return alpha
    # Computed on the mask's window only: the blur reaches no farther, so the result is the same.
    hard = alpha[window]
    grown = cv2.dilate(hard.astype(np.uint8), _disc(math.ceil(2.0 * width))).astype(np.float32)
    radius = math.ceil(3.0 * width)
    soft = cv2.GaussianBlur(grown, (2 * radius + 1, 2 * radius + 1), width, borderType=cv2.BORDER_CONSTANT)
    alpha[window] = np.clip(np.maximum(soft, hard), 0.0, 1.0)
    return alpha


def composite(source: np.ndarray, render: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend ``render`` into ``source`` (RGB uint8) by ``alpha``; pixels where alpha is 0 stay identical."""
    out = source.copy()
    window = _window(alpha > 0, 0)
    if window is None:
        return out
    weight = alpha[window][..., None]
    blended = source[window].astype(np.float32) * (1.0 - weight) + render[window].astype(np.float32) * weight
    rounded = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[window] = np.where(weight > 0, rounded, source[window])
    return out


def change_mask(
    source: np.ndarray,
    render: np.ndarray,
    threshold: float,
    within: np.ndarray | None = None,
    min_area: int | None = None,
) -> np.ndarray:
    """The bool (H, W) mask of pixels ``render`` changed: largest channel change above ``threshold``, cleaned.

    Weak changes (above ``threshold``) must survive a 3x3 opening, which drops isolated specks; strong ones
    (above ``STRONG_CHANGE * threshold``) are always kept. A 3x3 closing fills pinholes, and components
    smaller than ``min_area`` pixels (default: :data:`MIN_COMPONENT_SHARE` of the image, at least 9) without a
    strong pixel are dropped. ``within`` limits the result (e.g. to the blend area); the work is then done on
    its bounding box (plus the morphology's reach), which is exact when nothing changed outside it.
    """
    if min_area is None:
        min_area = max(9, round(MIN_COMPONENT_SHARE * source.shape[0] * source.shape[1]))
    if within is not None:
        mask = np.zeros(within.shape, dtype=bool)
        window = _window(within, 4)
        if window is not None:
            mask[window] = change_mask(source[window], render[window], threshold, None, min_area)
        return mask & within
    difference = np.abs(render.astype(np.int16) - source.astype(np.int16)).max(axis=2)
    weak = (difference > threshold).astype(np.uint8)
    strong = difference > STRONG_CHANGE * threshold
    square = np.ones((3, 3), np.uint8)
    kept = cv2.morphologyEx(weak, cv2.MORPH_OPEN, square) | strong.astype(np.uint8)
    kept = cv2.morphologyEx(kept, cv2.MORPH_CLOSE, square)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(kept, connectivity=8)
    has_strong = np.bincount(labels[strong], minlength=count) > 0
    keep = (stats[:, cv2.CC_STAT_AREA] >= min_area) | has_strong
    keep[0] = False
    return keep[labels]


def seed_from(rng: np.random.Generator) -> int:
    """A torch seed drawn from a numpy generator."""
    return int(rng.integers(0, 2**63 - 1))


class FixedForeground:
    """A user's foreground mask, resized (nearest) to whatever image it is asked about."""

    def __init__(self, mask: np.ndarray):
        self.mask = mask

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if self.mask.shape == (height, width):
            return self.mask
        resized = cv2.resize(self.mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
        return resized.astype(bool)


class SpecPlacer:
    """:meth:`ProceduralRenderer.place` with per-category user foreground masks overriding the estimate."""

    def __init__(self, foreground_masks: dict[str, np.ndarray] | None = None):
        self.default = ProceduralRenderer()
        self.by_category: dict[str, ProceduralRenderer] = {}
        for category, mask in (foreground_masks or {}).items():
            if not isinstance(mask, np.ndarray) or mask.ndim != 2 or not mask.any():
                raise ValueError(
                    f"foreground_masks[{category!r}] must be a non-empty 2-D array, "
                    f"got {getattr(mask, 'shape', type(mask).__name__)}"
                )
            placer = ProceduralRenderer(cache_size=1)
            placer.foreground = FixedForeground(mask.astype(bool))  # type: ignore[assignment]
            self.by_category[category] = placer

    def _placer(self, category: str) -> ProceduralRenderer:
        return self.by_category.get(category, self.default)

    def foreground(self, image: np.ndarray, category: str) -> np.ndarray:
        """The bool (H, W) foreground of ``image`` for ``category``."""
        return self._placer(category).foreground(image)

    def place(self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> np.ndarray:
        """The spec's shaped bool (H, W) mask on the foreground (see :meth:`ProceduralRenderer.place`).

        Images larger than :data:`PLACE_SIDE` are placed on a downscaled copy; the mask is scaled back and
        kept on the full-size foreground.
        """
        placer = self._placer(spec.category)
        height, width = image.shape[:2]
        scale = PLACE_SIDE / max(height, width)
        if scale >= 1.0:
            return placer.place(image, spec, rng)[1].mask
        size = (max(8, round(width * scale)), max(8, round(height * scale)))
        _, geometry = placer.place(cv2.resize(image, size, interpolation=cv2.INTER_AREA), spec, rng)
        mask = cv2.resize(geometry.mask.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        mask = (mask > 0.5) & placer.foreground(image)
        if not mask.any():
            raise RenderError("empty_mask", f"the {spec.shape} covers no foreground pixel at full size")
        return mask


@dataclass
class Job:
    """One candidate's share of a pipeline call."""

    index: int
    """Position of the candidate in its ``render_batch`` call."""
    prompt: str
    negative_prompt: str
    seed: int
    size: tuple[int, int]
    """Working (height, width)."""
    source: np.ndarray
    """RGB uint8 (H, W, 3) source image at its own size."""
    image: np.ndarray | None = None
    """RGB uint8 (h, w, 3) pipeline input at the working size, for inpaint and edit."""
    mask: np.ndarray | None = None
    """bool (h, w) mask to repaint at the working size, for inpaint."""
    context: Any = None
    """What the renderer needs to finish the candidate (alpha, requested mask, spec, ...)."""


class DiffusionRenderer:
    """Base of the diffusion renderers: loads the pipeline on first use and runs candidates in batches.

    Subclasses set ``name`` (a key of :data:`PIPELINE_LOADERS`) and implement ``_prepare`` (a candidate ->
    :class:`Job`), ``_pipeline_kwargs`` (their own call arguments) and ``_finish`` (the pipeline's image at
    the working size -> :class:`~kka_synth.synth.base.RenderOutput`).
    """

    name = ""

    def __init__(self, config: DiffusionConfig, negative_prompts: dict[str, str] | None = None):
        if not isinstance(config, DiffusionConfig):
            raise ValueError(f"config must be a DiffusionConfig, got {type(config).__name__}")
        if negative_prompts is not None and not (
            isinstance(negative_prompts, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in negative_prompts.items())
        ):
            raise ValueError("negative_prompts must map category names to strings")
        self.config = config
        self.negative_prompts = dict(negative_prompts or {})
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.pipeline: Any = None
        self._accepted: set[str] | None = None

    @property
    def field(self) -> str:
        """The config field that names this renderer's model."""
        return f"render.{self.name}.model"

    def load(self) -> Any:
        """Load and prepare the pipeline once (ModelLoadError when it cannot be loaded); return it."""
        if self.pipeline is None:
            pipeline = load_pipeline(self.config, self.name, self.field, self.dtype)
            self.pipeline = prepare_pipeline(pipeline, self.config, self.device, self.dtype)
        return self.pipeline

    @property
    def latent_cell(self) -> int:
        """Pixels per latent cell of the loaded pipeline (8 until one is loaded)."""
        return int(getattr(self.pipeline, "vae_scale_factor", 8))

    def negative_prompt(self, category: str) -> str:
        return self.negative_prompts.get(category, "")

    def render(
        self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Render one candidate (a batch of one); raises RenderError when it fails."""
        (result,) = self.render_batch([image], [spec], [rng])
        if isinstance(result, RenderError):
            raise result
        return result.image, result.mask

    def render_batch(
        self,
        images: Sequence[np.ndarray],
        specs: Sequence[DefectSpec],
        rngs: Sequence[np.random.Generator],
    ) -> list[RenderOutput | RenderError]:
        """Render every (image, spec, rng); one entry per candidate, a failure never sinking the others."""
        if not len(images) == len(specs) == len(rngs):
            raise ValueError(
                "render_batch needs as many images, specs and rngs, "
                f"got {len(images)}, {len(specs)}, {len(rngs)}"
            )
        self.load()
        results: list[RenderOutput | RenderError | None] = [None] * len(images)
        jobs = []
        for index, (image, spec, rng) in enumerate(zip(images, specs, rngs, strict=True)):
            try:
                jobs.append(self._prepare(index, image, spec, rng))
            except RenderError as error:
                results[index] = error
        for job, raw in self._run(jobs):
            if isinstance(raw, RenderError):
                results[job.index] = raw
                continue
            try:
                results[job.index] = self._finish(job, raw)
            except RenderError as error:
                results[job.index] = error
        return results  # type: ignore[return-value]

    def _run(self, jobs: list[Job]) -> Iterator[tuple[Job, np.ndarray | RenderError]]:
        """Run jobs grouped by working size, ``batch_size`` per pipeline call."""
        import torch

        groups: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.size, []).append(job)
        for size, group in groups.items():
            for start in range(0, len(group), self.config.batch_size):
                chunk = group[start : start + self.config.batch_size]
                kwargs = {
                    "prompt": [job.prompt for job in chunk],
                    "negative_prompt": [job.negative_prompt for job in chunk],
                    "num_inference_steps": self.config.steps,
                    "guidance_scale": self.config.guidance_scale,
                    "generator": [torch.Generator("cpu").manual_seed(job.seed) for job in chunk],
                    "height": size[0],
                    "width": size[1],
                    **self._pipeline_kwargs(chunk),
                }
                try:
                    rendered = self.call_pipeline(kwargs)
                except (RuntimeError, ValueError) as error:
                    logger.warning(
                        "%s pipeline call failed for %d candidates", self.name, len(chunk), exc_info=True
                    )
                    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                    rendered = [RenderError("pipeline_failed", first)] * len(chunk)
                yield from zip(chunk, rendered, strict=True)

    def call_pipeline(self, kwargs: dict[str, Any]) -> np.ndarray:
        """Call the pipeline with the arguments it accepts; returns RGB uint8 (B, h, w, 3).

        This is the only place the model runs (benchmarks wrap it to time the model alone).
        """
        if self._accepted is None:
            self._accepted = set(inspect.signature(self.pipeline.__call__).parameters)
            dropped = sorted(set(kwargs) - self._accepted)
            if dropped:
                logger.debug("%s takes no %s; not passed", type(self.pipeline).__name__, ", ".join(dropped))
        accepted = {key: value for key, value in kwargs.items() if key in self._accepted}
        images = self.pipeline(**accepted, output_type="np").images  # (B, h, w, 3) float in [0, 1]
        return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)

    def _prepare(self, index: int, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator) -> Job:
        raise NotImplementedError

    def _pipeline_kwargs(self, jobs: list[Job]) -> dict[str, Any]:
        return {}

    def _finish(self, job: Job, rendered: np.ndarray) -> RenderOutput:
        raise NotImplementedError

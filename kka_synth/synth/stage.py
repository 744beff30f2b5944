"""The render stage of an iteration: pick each candidate's renderer, render in batches, fall back on failure.

A run names its renderers in ``render.renderers``. Without ``render.weights`` the first one renders every
candidate and the others are fallbacks, tried in order when a render fails. With weights each candidate
draws its first renderer from the mix (its own generator, so the draw does not depend on the others) and the
rest stay fallbacks in the listed order.

Renderers that run a model (the diffusion renderers) get their candidates in batches of their
``config.batch_size``; the others get them one at a time. Each candidate carries its own generator, so its
pixels do not depend on which batch it lands in or on the order in which renderers are tried for others.
Nothing here reads or writes files: the loop does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kka_synth.config import RenderConfig
from kka_synth.synth.base import Renderer, RenderError, RenderOutput, render_many
from kka_synth.types import DefectSpec

logger = logging.getLogger(__name__)

DIFFUSION = ("inpaint", "edit", "text2img")
"""Renderers that take a :class:`~kka_synth.config.DiffusionConfig` section of the same name."""


@dataclass
class RenderJob:
    """One candidate to render."""

    key: int
    """The caller's index of the candidate."""
    category: str
    spec: DefectSpec
    source: int
    """Index of the source image among the category's normals."""
    rng: np.random.Generator
    order: list[str]
    """Renderers to try, first choice first."""
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """``"<renderer>:<reason>"`` of each failed try."""


@dataclass
class RenderResult:
    job: RenderJob
    output: RenderOutput | None
    """None when every renderer failed."""
    renderer: str
    """The renderer that made ``output`` ("" when none did)."""

    @property
    def reason(self) -> str:
        """``render:<reason>`` of the last failure when nothing was rendered, else ""."""
        if self.output is not None:
            return ""
        return f"render:{self.job.errors[-1].split(':', 1)[1]}" if self.job.errors else "render:none"


def build_renderers(
    config: RenderConfig,
    registry: dict[str, type],
    negative_prompts: dict[str, str] | None = None,
    foreground_masks: dict[str, np.ndarray] | None = None,
) -> dict[str, Renderer]:
    """Construct every renderer ``config.renderers`` names (diffusion ones load their pipeline now)."""
    renderers: dict[str, Renderer] = {}
    for name in config.renderers:
        cls = registry[name]
        if name == "text2img":
            renderers[name] = cls(config.text2img, negative_prompts=negative_prompts)
        elif name in DIFFUSION:
            renderers[name] = cls(
                getattr(config, name), negative_prompts=negative_prompts, foreground_masks=foreground_masks
            )
        else:
            renderers[name] = cls()
        if hasattr(renderers[name], "load"):
            renderers[name].load()  # a missing model fails here, before anything is rendered
    return renderers


def renderer_order(names: list[str], weights: list[float] | None, rng: np.random.Generator) -> list[str]:
    """The renderers one candidate tries: the mix's draw first (or the first name), then the rest in order."""
    if weights is None or len(names) == 1:
        return list(names)
    p = np.asarray(weights, dtype=float)
    first = names[int(rng.choice(len(names), p=p / p.sum()))]
    return [first, *(n for n in names if n != first)]


def _batch_size(renderer: Renderer) -> int:
    config = getattr(renderer, "config", None)
    return max(1, int(getattr(config, "batch_size", 1))) if hasattr(renderer, "render_batch") else 1


def render_jobs(
    jobs: list[RenderJob],
    renderers: dict[str, Renderer],
    normals: dict[str, list[np.ndarray]],
    progress: Callable[[int, int], None] | None = None,
) -> list[RenderResult]:
    """Render every job, first choice first, falling back through its order; results follow ``jobs``.

    ``normals`` maps each category to its source images; renderers that compare with the nearest normal
    (``set_references``) get them first.
    """
    for renderer in renderers.values():
        if hasattr(renderer, "set_references"):
            for category, images in normals.items():
                renderer.set_references(category, images)
    results: dict[int, RenderResult] = {}
    pending = list(jobs)
    done = 0
    while pending:
        waiting: list[RenderJob] = []
        groups = {name: [job for job in pending if job.order[len(job.tried)] == name] for name in renderers}
        for name, renderer in renderers.items():
            group = groups[name]
            size = _batch_size(renderer)
            for start in range(0, len(group), size):
                chunk = group[start : start + size]
                outputs = render_many(
                    renderer,
                    [normals[job.category][job.source] for job in chunk],
                    [job.spec for job in chunk],
                    [job.rng for job in chunk],
                )
                for job, output in zip(chunk, outputs, strict=True):
                    job.tried.append(name)
                    if isinstance(output, RenderError):
                        job.errors.append(f"{name}:{output.reason}")
                        if len(job.tried) < len(job.order):
                            waiting.append(job)
                            continue
                        results[job.key] = RenderResult(job, None, "")
                    else:
                        results[job.key] = RenderResult(job, output, name)
                    done += 1
                    if progress is not None:
                        progress(done, len(jobs))
        pending = waiting
    for name in renderers:
        failures = sum(e.startswith(f"{name}:") for r in results.values() for e in r.job.errors)
        if failures:
            logger.info("renderer %s failed %d time(s) this stage", name, failures)
    return [results[job.key] for job in jobs]

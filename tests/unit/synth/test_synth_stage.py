"""The render stage: renderer choice from a mix, batching, and fallback when a render fails."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from kka_synth.config import RenderConfig
from kka_synth.synth import ProceduralRenderer
from kka_synth.synth.base import RenderError, RenderOutput
from kka_synth.synth.stage import RenderJob, build_renderers, render_jobs, renderer_order
from kka_synth.types import DefectSpec


def _spec(shape: str = "blob") -> DefectSpec:
    return DefectSpec("tile", "stain", "", (0.1, 0.1, 0.9, 0.9), 0.02, shape, "darker", 0.6)


class Failing:
    name = "failing"

    def __init__(self) -> None:
        self.calls = 0

    def render(self, image: np.ndarray, spec: DefectSpec, rng: np.random.Generator):
        self.calls += 1
        raise RenderError("no_change", "nothing changed")


class Batched:
    """Adds a value drawn from each candidate's own rng; records the batch sizes it was called with."""

    name = "batched"

    def __init__(self, batch_size: int) -> None:
        self.config = SimpleNamespace(batch_size=batch_size)
        self.batches: list[int] = []

    def render_batch(self, images, specs, rngs):
        self.batches.append(len(images))
        out = []
        for image, rng in zip(images, rngs, strict=True):
            value = int(rng.integers(1, 50))
            rendered = np.clip(image.astype(int) + value, 0, 255).astype(np.uint8)
            out.append(RenderOutput(rendered, np.ones(image.shape[:2], bool), info={"value": value}))
        return out


@pytest.fixture
def normals() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(3)
    return {"tile": [rng.integers(60, 200, (48, 48, 3), dtype=np.uint8) for _ in range(3)]}


def _jobs(count: int, order: list[str], seed: int = 0) -> list[RenderJob]:
    return [
        RenderJob(i, "tile", _spec(), i % 3, np.random.default_rng([seed, i]), list(order))
        for i in range(count)
    ]


def test_renderer_order_follows_the_mix_and_keeps_the_rest_as_fallbacks():
    names = ["inpaint", "procedural"]
    assert renderer_order(names, None, np.random.default_rng(0)) == names
    firsts = Counter(renderer_order(names, [3.0, 1.0], np.random.default_rng(i))[0] for i in range(2000))
    assert 0.70 < firsts["inpaint"] / 2000 < 0.80
    order = renderer_order(["perlin", "procedural", "inpaint"], [0.0, 0.0, 1.0], np.random.default_rng(1))
    assert order == ["inpaint", "perlin", "procedural"]


def test_a_failed_render_falls_back_to_the_next_renderer(normals):
    failing = Failing()
    renderers = {"failing": failing, "procedural": ProceduralRenderer()}
    results = render_jobs(_jobs(4, ["failing", "procedural"]), renderers, normals)
    assert failing.calls == 4
    assert all(r.renderer == "procedural" and r.output is not None for r in results)
    assert all(
        r.job.errors == ["failing:no_change"] and r.job.tried == ["failing", "procedural"] for r in results
    )
    alone = render_jobs(_jobs(2, ["failing"]), {"failing": Failing()}, normals)
    assert [r.output for r in alone] == [None, None]
    assert [r.reason for r in alone] == ["render:no_change"] * 2


def test_batches_follow_the_batch_size_and_pixels_do_not_depend_on_the_batch(normals):
    big = Batched(batch_size=4)
    results = render_jobs(_jobs(10, ["batched"]), {"batched": big}, normals)
    assert big.batches == [4, 4, 2]
    assert [r.job.key for r in results] == list(range(10))
    small = Batched(batch_size=3)
    again = render_jobs(_jobs(10, ["batched"]), {"batched": small}, normals)
    assert small.batches == [3, 3, 3, 1]
    for a, b in zip(results, again, strict=True):
        assert np.array_equal(a.output.image, b.output.image)


def test_progress_counts_every_candidate_once(normals):
    seen = []
    render_jobs(
        _jobs(5, ["failing", "procedural"]),
        {"failing": Failing(), "procedural": ProceduralRenderer()},
        normals,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(i, 5) for i in range(1, 6)]


def test_build_renderers_constructs_the_offline_ones():
    renderers = build_renderers(
        RenderConfig(renderers=["perlin", "procedural"]),
        {"perlin": Failing, "procedural": ProceduralRenderer},
    )
    assert list(renderers) == ["perlin", "procedural"]
    assert isinstance(renderers["procedural"], ProceduralRenderer)

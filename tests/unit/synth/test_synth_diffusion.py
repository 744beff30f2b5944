from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tiny_diffusion import save_tiny_pipeline  # noqa: E402

from kka_synth.config import DiffusionConfig  # noqa: E402
from kka_synth.synth import (  # noqa: E402
    RENDERERS,
    EditRenderer,
    InpaintRenderer,
    RenderError,
    RenderOutput,
    Text2ImageRenderer,
)
from kka_synth.synth.diffusion import (  # noqa: E402
    change_mask,
    composite,
    feathered_alpha,
    grow_to_latent_grid,
    resize_mask,
    working_size,
)
from kka_synth.types import DefectSpec  # noqa: E402
from kka_synth.utils.devices import resolve_device, resolve_dtype
from kka_synth.utils.hub import ModelLoadError  # noqa: E402

THRESHOLD = 12.0


def spec(shape="scratch", region=(0.0, 0.0, 1.0, 1.0), size=0.01, category="part", description="thin"):
    return DefectSpec(category, shape, description, region, size, shape, "darker", 0.5)


def config(folder: Path, **fields) -> DiffusionConfig:
    values = {"steps": 2, "resolution": 64, "batch_size": 2, "change_threshold": THRESHOLD, "feather": 0.02}
    return DiffusionConfig(model=str(folder), **{**values, **fields})


def rngs(*seeds):
    return [np.random.default_rng(seed) for seed in seeds]


def change(a, b):
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-diffusion")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("inpaint", "edit", "text2img")}


@pytest.fixture(scope="module")
def inpaint(models) -> InpaintRenderer:
    renderer = InpaintRenderer(config(models["inpaint"]), negative_prompts={"part": "blurry"})
    renderer.load()
    return renderer


@pytest.fixture(scope="module")
def edit(models) -> EditRenderer:
    renderer = EditRenderer(config(models["edit"]))
    renderer.load()
    return renderer


@pytest.fixture(scope="module")
def text2img(models) -> Text2ImageRenderer:
    renderer = Text2ImageRenderer(config(models["text2img"], resolution=None))
    renderer.load()
    return renderer


def echo(kwargs):
    """A pipeline that returns its input images unchanged."""
    return np.stack([np.asarray(image) for image in kwargs["image"]])


# --- import and registry ---


def test_import_does_not_import_diffusers():
    code = "import sys, kka_synth.synth; print('diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]


def test_registry_has_the_diffusion_renderers():
    assert RENDERERS["inpaint"] is InpaintRenderer
    assert RENDERERS["edit"] is EditRenderer
    assert RENDERERS["text2img"] is Text2ImageRenderer
    assert all(RENDERERS[name].name == name for name in ("inpaint", "edit", "text2img"))


# --- shared pieces, hand-computed ---


def test_working_size_scales_the_longer_side_and_rounds_to_8():
    assert working_size(100, 75, 64) == (64, 48)
    assert working_size(128, 128, None) == (128, 128)
    assert working_size(30, 21, None) == (32, 24)
    assert working_size(1000, 10, 512) == (512, 8)
    assert working_size(256, 512, 1024) == (512, 1024)


def test_grow_to_latent_grid_keeps_a_one_pixel_line_on_nearest_sampling():
    mask = np.zeros((32, 40), dtype=bool)
    mask[13, 5:30] = True
    grown = grow_to_latent_grid(mask, cell=8, margin=0)
    expected = np.zeros_like(mask)
    expected[8:16, 0:32] = True
    assert np.array_equal(grown, expected)
    # What a pipeline sees after nearest downsampling to the latent grid (one pixel per cell).
    assert grown[::8, ::8].sum() == 4
    with_margin = grow_to_latent_grid(mask, cell=8, margin=1)
    assert with_margin[0:24, 0:40].all() and not with_margin[24:].any()


def test_resize_mask_keeps_thin_structures_when_shrinking():
    mask = np.zeros((128, 128), dtype=bool)
    mask[40, 10:100] = True
    small = resize_mask(mask, (64, 64))
    assert small[20, 5:50].all()


def test_feathered_alpha_is_one_on_the_mask_and_exactly_zero_far_away():
    mask = np.zeros((64, 64), dtype=bool)
    mask[30:34, 30:34] = True
    alpha = feathered_alpha(mask, 2.0)
    assert alpha.dtype == np.float32
    assert np.all(alpha[mask] == 1.0)
    assert 0.0 < alpha[32, 38] < 1.0  # in the fringe
    # Grown by ceil(2 * 2) = 4, blurred with a kernel of radius ceil(3 * 2) = 6: nothing beyond 10 pixels.
    assert np.all(alpha[:, :20] == 0.0) and np.all(alpha[:, 44:] == 0.0)
    assert np.all(alpha[:20] == 0.0) and np.all(alpha[44:] == 0.0)
    assert np.array_equal(feathered_alpha(mask, 0.0), mask.astype(np.float32))


def test_composite_keeps_zero_alpha_pixels_and_blends_the_rest():
    source = np.full((4, 4, 3), 100, np.uint8)
    render = np.full((4, 4, 3), 200, np.uint8)
    alpha = np.zeros((4, 4), np.float32)
    alpha[0, 0], alpha[1, 1] = 1.0, 0.25
    out = composite(source, render, alpha)
    assert out[0, 0, 0] == 200 and out[1, 1, 0] == 125
    assert np.all(out[alpha == 0] == 100)


def test_change_mask_drops_weak_specks_and_keeps_strong_pixels_and_weak_blobs():
    source = np.zeros((40, 40, 3), np.uint8)
    render = source.copy()
    render[5, 5] = 15  # weak speck: dropped
    render[5, 30, 1] = 40  # strong single pixel (one channel): kept
    render[20:25, 20:25] = 15  # weak 5x5 blob: kept
    mask = change_mask(source, render, THRESHOLD)
    assert not mask[5, 5] and mask[5, 30]
    assert mask[20:25, 20:25].all()
    assert mask.sum() == 26
    within = np.zeros_like(mask)
    within[:, 25:] = True
    assert change_mask(source, render, THRESHOLD, within=within).sum() == 1


def test_change_mask_within_a_window_equals_the_full_frame_result():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    within = np.zeros((64, 80), dtype=bool)
    within[10:40, 30:70] = True
    render = source.copy()
    noise = rng.integers(-40, 41, (64, 80, 3))
    render[within] = np.clip(source[within] + noise[within], 0, 255).astype(np.uint8)
    full = change_mask(source, render, THRESHOLD, min_area=9)
    assert np.array_equal(change_mask(source, render, THRESHOLD, within=within, min_area=9), full & within)


def test_large_images_are_placed_on_a_downscaled_copy_with_the_same_shape(object_image):
    from kka_synth.synth.diffusion import PLACE_SIDE, SpecPlacer
    from kka_synth.synth.foreground import estimate_foreground

    side = 2 * PLACE_SIDE
    large = np.ascontiguousarray(np.repeat(np.repeat(object_image, side // 128, axis=0), side // 128, axis=1))
    foreground = estimate_foreground(large)
    placer = SpecPlacer()
    blob = spec("blob", size=0.03, description="")
    mask = placer.place(large, blob, np.random.default_rng(0))
    assert mask.shape == (side, side) and not (mask & ~foreground).any()
    assert 0.5 * 0.03 < mask.sum() / foreground.sum() < 2.0 * 0.03
    assert np.array_equal(mask, placer.place(large, blob, np.random.default_rng(0)))


def test_device_and_dtype_resolution():
    import torch

    device = resolve_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="float16 is not supported on cpu"):
        resolve_dtype("float16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            InpaintRenderer(DiffusionConfig(model="x", device="cuda"))


def test_bad_constructor_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="DiffusionConfig"):
        InpaintRenderer({"model": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative_prompts"):
        InpaintRenderer(DiffusionConfig(model="x"), negative_prompts={"part": 3})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="foreground_masks"):
        InpaintRenderer(DiffusionConfig(model="x"), foreground_masks={"part": np.zeros((4, 4, 3), bool)})
    with pytest.raises(ValueError, match="max_mask_share"):
        Text2ImageRenderer(DiffusionConfig(model="x"), max_mask_share=0.0)


# --- loading ---


@pytest.mark.parametrize("cls", [InpaintRenderer, EditRenderer, Text2ImageRenderer])
def test_missing_model_directory_names_the_field_and_the_offline_profile(tmp_path, cls):
    renderer = cls(DiffusionConfig(model=str(tmp_path / "no-such-model")))
    with pytest.raises(ModelLoadError) as error:
        renderer.load()
    message = str(error.value)
    assert f"render.{cls.name}.model" in message and "--profile offline" in message
    assert "\n" not in message


def test_edit_refuses_a_pipeline_that_is_not_instruct_pix2pix(models):
    with pytest.raises(ModelLoadError, match="InstructPix2Pix") as error:
        EditRenderer(config(models["text2img"])).load()
    assert "render.edit.model" in str(error.value) and "StableDiffusionPipeline" in str(error.value)


def test_scheduler_by_name_and_offload_ignored_on_cpu(models):
    renderer = InpaintRenderer(config(models["inpaint"], scheduler="euler", offload="model", device="cpu"))
    pipeline = renderer.load()
    assert type(pipeline).__name__ == "StableDiffusionInpaintPipeline"
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.unet.device.type == "cpu"
    assert renderer.load() is pipeline


# --- inpaint ---


def test_inpaint_keeps_size_and_every_pixel_outside_the_feathered_mask(inpaint, object_image):
    image = object_image[:100, :90].copy()
    (result,) = inpaint.render_batch([image], [spec()], rngs(5))
    assert isinstance(result, RenderOutput)
    assert result.image.shape == image.shape and result.image.dtype == np.uint8
    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    plan = inpaint.plan(image, spec(), np.random.default_rng(5))
    outside = plan.alpha == 0
    assert outside.mean() > 0.5
    assert np.array_equal(result.image[outside], image[outside])
    assert not result.mask[outside].any()
    assert result.info["seed"] == plan.seed
    assert result.info["requested_area"] == int(plan.requested.sum())
    assert result.info["changed_area"] == int(result.mask.sum())
    assert result.info["working_size"] == [64, 56]


def test_inpaint_mask_covers_every_clearly_changed_pixel(inpaint, brick):
    specs = [spec(), spec("stain", region=(0.5, 0.5, 1.0, 1.0), size=0.05, description="")]
    for result in inpaint.render_batch([brick, brick], specs, rngs(1, 2)):
        difference = change(result.image, brick)
        assert result.mask[difference > 2 * THRESHOLD].all()
        assert (difference[result.mask] > 0).mean() > 0.9  # the mask is change, not the whole blend area


def test_inpaint_repaint_mask_survives_the_latent_grid(inpaint, brick):
    plan = inpaint.plan(brick, spec(size=0.0005), np.random.default_rng(3))
    cell = inpaint.latent_cell
    latent = plan.repaint[::cell, ::cell]  # nearest sampling, as the pipeline shrinks the mask
    seen = np.repeat(np.repeat(latent, cell, axis=0), cell, axis=1)
    assert seen[resize_mask(plan.requested, plan.size)].all()


def test_inpaint_same_seed_same_pixels_whatever_the_batch(inpaint, brick, object_image):
    specs = [spec(), spec("blob", size=0.03, description=""), spec("spot", size=0.02, description="")]
    images = [brick, object_image, brick]
    batched = inpaint.render_batch(images, specs, rngs(10, 11, 12))  # chunks of 2 and 1
    alone = inpaint.render_batch([images[1]], [specs[1]], rngs(11))[0]
    again = inpaint.render_batch([images[2], images[1]], [specs[2], specs[1]], rngs(12, 11))
    assert np.array_equal(alone.image, batched[1].image) and np.array_equal(alone.mask, batched[1].mask)
    assert np.array_equal(again[1].image, batched[1].image)
    assert np.array_equal(again[0].image, batched[2].image)
    other = inpaint.render_batch([images[1]], [specs[1]], rngs(99))[0]
    assert not np.array_equal(other.image, alone.image)


def test_inpaint_bad_input_fails_only_its_candidate(inpaint, brick):
    gray = brick[..., 0]
    results = inpaint.render_batch([brick, gray], [spec(), spec()], rngs(1, 2))
    assert isinstance(results[0], RenderOutput)
    assert isinstance(results[1], RenderError) and results[1].reason == "bad_image"
    with pytest.raises(RenderError) as error:
        inpaint.render(gray, spec(), np.random.default_rng(0))
    assert error.value.reason == "bad_image"
    image, mask = inpaint.render(brick, spec(), np.random.default_rng(1))
    assert np.array_equal(image, results[0].image) and np.array_equal(mask, results[0].mask)


def test_inpaint_user_foreground_mask_overrides_the_estimate(models, brick):
    left = np.zeros((32, 32), dtype=bool)
    left[:, :10] = True
    renderer = InpaintRenderer(config(models["inpaint"]), foreground_masks={"part": left})
    for seed in range(4):
        plan = renderer.plan(brick, spec("blob", size=0.05, description=""), np.random.default_rng(seed))
        assert plan.requested.any() and not plan.requested[:, 40:].any()


def test_inpaint_passes_the_category_negative_prompt(inpaint, brick, monkeypatch):
    seen = {}

    def record(kwargs):
        seen.update(kwargs)
        return echo(kwargs)

    monkeypatch.setattr(inpaint, "call_pipeline", record)
    results = inpaint.render_batch([brick, brick], [spec(), spec(category="other")], rngs(1, 2))
    assert seen["negative_prompt"] == ["blurry", ""]
    assert seen["prompt"][0] == spec().prompt()
    assert seen["num_inference_steps"] == 2 and seen["strength"] == 1.0
    # An echo changes nothing: the render is rejected, not returned with a requested-but-unchanged mask.
    assert all(isinstance(r, RenderError) and r.reason == "no_change" for r in results)


# --- edit ---


def test_edit_rejects_a_no_op(edit, brick, monkeypatch):
    monkeypatch.setattr(edit, "call_pipeline", echo)
    with pytest.raises(RenderError) as error:
        edit.render(brick[:64, :64].copy(), spec(), np.random.default_rng(0))  # 64 = the working size
    assert error.value.reason == "no_change"


def test_edit_keeps_the_change_inside_the_allowed_area_and_masks_it(edit, object_image, monkeypatch):
    def dark_squares(kwargs):
        images = echo(kwargs).copy()
        images[:, 16:28, 16:28] //= 4  # a dark square in the spec's region (top left of the object)
        images[:, 46:58, 46:58] //= 4  # and one at the bottom right, outside it
        return images

    monkeypatch.setattr(edit, "call_pipeline", dark_squares)
    source = object_image[::2, ::2].copy()  # 64 x 64, the working size: no resizing
    top_left = spec("blob", region=(0.0, 0.0, 0.5, 0.5), description="")
    image, mask = edit.render(source, top_left, np.random.default_rng(0))
    alpha = edit.blend_alpha(source, top_left)
    assert np.array_equal(image[alpha == 0], source[alpha == 0])
    assert np.array_equal(image[46:58, 46:58], source[46:58, 46:58])  # cut away
    assert mask[16:28, 16:28].any() and not mask[alpha == 0].any()
    assert mask[change(image, source) > 2 * THRESHOLD].all()
    assert mask.sum() <= 144


def test_edit_rejects_a_change_of_the_whole_area(edit, brick, monkeypatch):
    monkeypatch.setattr(edit, "call_pipeline", lambda kwargs: 255 - echo(kwargs))
    with pytest.raises(RenderError) as error:
        edit.render(brick, spec(region=(0.0, 0.0, 0.5, 0.5)), np.random.default_rng(0))
    assert error.value.reason == "global_change"


def test_edit_with_the_tiny_pipeline_stays_local_and_deterministic(models, brick):
    renderer = EditRenderer(config(models["edit"]), max_change_share=None)
    top_left = spec(region=(0.0, 0.0, 0.5, 0.5))
    first, second = renderer.render_batch([brick, brick], [top_left, top_left], rngs(1, 1))
    assert np.array_equal(first.image, second.image)
    alpha = renderer.blend_alpha(brick, top_left)
    assert np.array_equal(first.image[alpha == 0], brick[alpha == 0])
    assert first.mask.any() and not first.mask[alpha == 0].any()
    assert "add a visible dark scratch" in first.info["instruction"]


# --- text2img ---


def test_text2img_random_image_has_an_absent_mask(text2img, brick):
    (result,) = text2img.render_batch([brick], [spec()], rngs(0))
    assert result.image.shape == brick.shape
    assert result.mask is None and result.info["mask"] == "absent"
    assert result.source is None  # no references: compared with the passed image


def test_text2img_compares_with_the_nearest_reference(models, brick, object_image, monkeypatch):
    renderer = Text2ImageRenderer(config(models["text2img"], resolution=None))
    references = [np.full_like(brick, 30), brick, object_image]
    renderer.set_references("part", references)

    def defect_on_brick(kwargs):
        image = brick.copy()
        image[50:70, 60:80] = 0
        return image[None].repeat(len(kwargs["prompt"]), axis=0)

    monkeypatch.setattr(renderer, "call_pipeline", defect_on_brick)
    (result,) = renderer.render_batch([object_image], [spec()], rngs(0))
    assert result.source == 1 and result.info["mask"] == "difference"
    expected = change(brick, result.image) > 2 * THRESHOLD
    assert result.mask[expected].all() and result.mask[50:70, 60:80].mean() > 0.9
    assert result.mask.sum() <= 400
    # A category without references falls back to the image passed in: everything differs, mask absent.
    (other,) = renderer.render_batch([object_image], [spec(category="other")], rngs(0))
    assert other.source is None and other.mask is None and other.info["mask"] == "absent"

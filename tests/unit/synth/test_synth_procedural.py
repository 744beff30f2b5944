from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage.morphology import skeletonize

from kka_synth.synth import (
    RENDERERS,
    EditRenderer,
    InpaintRenderer,
    PerlinRenderer,
    ProceduralRenderer,
    RenderError,
    Text2ImageRenderer,
)
from kka_synth.synth.foreground import estimate_foreground
from kka_synth.synth.procedural import read_hints, strength
from kka_synth.types import REGIONS, SHAPES, TONES, DefectSpec


def spec(
    shape="blob",
    tone="darker",
    region=(0.0, 0.0, 1.0, 1.0),
    size=0.02,
    severity=0.5,
    description="",
    defect_type="defect",
):
    return DefectSpec("part", defect_type, description, region, size, shape, tone, severity)


def render(image, **fields):
    seed = fields.pop("seed", 0)
    return ProceduralRenderer().render(image, spec(**fields), np.random.default_rng(seed))


def mean_change(image, out):
    return float(np.abs(out.astype(np.int16) - image.astype(np.int16)).mean())


@pytest.mark.parametrize("image_name", ["brick", "object"])
@pytest.mark.parametrize("tone", TONES)
@pytest.mark.parametrize("shape", SHAPES)
def test_render_stays_in_region_on_foreground_and_changes_only_the_mask(
    images, region_area, image_name, shape, tone
):
    image = images[image_name]
    region = REGIONS["bottom-right"] if image_name == "brick" else REGIONS["top-left"]
    out, mask = render(image, shape=shape, tone=tone, region=region, size=0.01, severity=0.6)
    assert out.dtype == np.uint8 and out.shape == image.shape and out is not image
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert mask.sum() > 0
    foreground = estimate_foreground(image)
    box = region_area(foreground, region)
    assert (mask & box).sum() >= 0.9 * mask.sum()
    assert (mask & foreground).sum() >= 0.9 * mask.sum()
    assert np.array_equal(out[~mask], image[~mask])
    assert mean_change(image[mask], out[mask]) > 2.0


@pytest.mark.parametrize("shape", SHAPES)
def test_same_seed_same_pixels_other_seed_other_pixels(object_image, shape):
    first, first_mask = render(object_image, shape=shape, seed=3)
    again, again_mask = render(object_image, shape=shape, seed=3)
    other, other_mask = render(object_image, shape=shape, seed=4)
    assert np.array_equal(first, again) and np.array_equal(first_mask, again_mask)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_area_follows_size(brick, object_image, shape):
    for image in (brick, object_image):
        object_area = estimate_foreground(image).sum()
        areas = []
        for size in (0.004, 0.02, 0.06):
            _, mask = render(image, shape=shape, size=size, seed=1)
            areas.append(mask.sum())
            assert 0.5 * size * object_area <= mask.sum() <= 2.0 * size * object_area
        assert areas[0] < areas[1] < areas[2]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tone", TONES)
def test_change_grows_with_severity(brick, shape, tone):
    changes = []
    for severity in (0.05, 0.4, 0.9):
        out, mask = render(brick, shape=shape, tone=tone, severity=severity, size=0.03, seed=2)
        changes.append(mean_change(brick[mask], out[mask]))
    assert changes[0] < changes[1] < changes[2]


def test_tones_move_brightness_and_hue_the_right_way(brick):
    dark, dark_mask = render(brick, tone="darker")
    bright, bright_mask = render(brick, tone="brighter")
    colour, colour_mask = render(brick, tone="colour", description="blue paint")
    assert dark[dark_mask].mean() < brick[dark_mask].mean() - 10
    assert bright[bright_mask].mean() > brick[bright_mask].mean() + 10
    # brick is gray: a colour defect adds chroma, and "blue" makes blue the strongest channel.
    pixels = colour[colour_mask].astype(np.float32)
    assert np.abs(pixels[:, 2] - pixels[:, 0]).mean() > 10
    assert pixels[:, 2].mean() > pixels[:, 0].mean()


def test_defect_is_shaded_not_flat(brick):
    out, mask = render(brick, shape="blob", size=0.05, severity=0.7)
    assert out[mask].astype(np.float32).std(axis=0).min() > 3.0


def test_missing_chunk_sits_on_the_object_edge_and_takes_background_colour(object_image, object_truth):
    out, mask = render(object_image, shape="missing", size=0.05, severity=1.0)
    foreground = estimate_foreground(object_image)
    outside = cv2.dilate((~foreground).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert (mask & outside).any()
    background = np.median(object_image[~foreground], axis=0)
    core = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert np.abs(out[core].astype(np.float32).mean(axis=0) - background).max() < 12


def test_hole_has_dark_interior_and_bright_rim(brick):
    out, mask = render(brick, shape="hole", size=0.03, severity=0.8)
    change = out.astype(np.float32).mean(axis=2) - brick.astype(np.float32).mean(axis=2)
    assert change[mask].min() < -60
    assert change[mask].max() > 5


def test_description_words_steer_the_render(brick):
    _, thin_mask = render(brick, shape="scratch", description="thin", size=0.01)
    _, wide_mask = render(brick, shape="scratch", description="wide", size=0.01)
    # Same area: a thin scratch is longer (more skeleton pixels per mask pixel).
    assert skeletonize(thin_mask).sum() / thin_mask.sum() > skeletonize(wide_mask).sum() / wide_mask.sum()
    hints = read_hints(spec(description="several rust spots", defect_type="corrosion"))
    assert hints.spots[0] >= 3 and hints.hue == 60.0
    assert read_hints(spec(description="a single dent")).spots == (1, 2)


def test_strength_is_monotone_and_bounded():
    values = [strength(s) for s in np.linspace(0.0, 1.0, 11)]
    assert values == sorted(values) and values[0] > 0.0 and values[-1] <= 1.0


def test_bad_inputs_raise_render_errors(brick, object_image):
    renderer = ProceduralRenderer()
    with pytest.raises(RenderError) as error:
        renderer.render(brick[..., 0], spec(), np.random.default_rng(0))
    assert error.value.reason == "bad_image"
    with pytest.raises(RenderError) as error:
        renderer.render(brick, {"shape": "blob"}, np.random.default_rng(0))
    assert error.value.reason == "bad_spec"
    with pytest.raises(RenderError) as error:
        renderer.render(brick, spec(), 0)
    assert error.value.reason == "bad_rng"
    with pytest.raises(RenderError) as error:
        renderer.render(object_image, spec(region=(0.0, 0.0, 0.08, 0.08)), np.random.default_rng(0))
    assert error.value.reason == "no_foreground"


def test_registry_names_every_renderer():
    assert RENDERERS == {
        "procedural": ProceduralRenderer,
        "perlin": PerlinRenderer,
        "inpaint": InpaintRenderer,
        "edit": EditRenderer,
        "text2img": Text2ImageRenderer,
    }
    assert all(cls.name == name for name, cls in RENDERERS.items())

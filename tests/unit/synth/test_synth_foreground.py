from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from kka_synth.synth import RenderError
from kka_synth.synth.foreground import (
    ForegroundCache,
    allowed_area,
    box_mask,
    estimate_foreground,
    foreground_box,
    pick_centre,
    region_pixel_box,
)
from kka_synth.types import DefectSpec


def disc_image(shape, centre, radius, background, colour, noise, seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    disc = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius**2
    image = np.empty((*shape, 3), dtype=np.float32)
    image[:] = background
    image[disc] = colour
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), disc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize(
    ("shape", "centre", "radius", "background", "colour", "noise"),
    [
        ((128, 128), (60, 70), 35, (60, 70, 80), (180, 150, 100), 3.0),
        ((128, 128), (40, 50), 20, (200, 200, 200), (150, 150, 150), 6.0),
        ((128, 128), (64, 64), 45, (20, 20, 20), (90, 60, 40), 2.0),
        ((300, 400), (220, 140), 80, (235, 235, 230), (90, 110, 160), 4.0),
    ],
)
def test_foreground_finds_a_disc_on_a_plain_background(shape, centre, radius, background, colour, noise):
    image, disc = disc_image(shape, centre, radius, background, colour, noise)
    mask = estimate_foreground(image)
    assert mask.dtype == bool and mask.shape == shape
    assert iou(mask, disc) > 0.9


def test_foreground_of_a_textured_object_covers_it(object_image, object_truth):
    assert iou(estimate_foreground(object_image), object_truth) > 0.9


@pytest.mark.parametrize("name", ["brick", "grass", "gravel"])
def test_foreground_of_a_texture_is_everything(name):
    sheet = getattr(data, name)()
    for y, x in [(0, 0), (200, 300)]:
        crop = np.ascontiguousarray(np.repeat(sheet[y : y + 128, x : x + 128, None], 3, axis=2))
        assert estimate_foreground(crop).all()


def test_foreground_is_deterministic(object_image):
    assert np.array_equal(estimate_foreground(object_image), estimate_foreground(object_image.copy()))


def test_foreground_rejects_bad_images():
    with pytest.raises(RenderError, match="bad_image"):
        estimate_foreground(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(RenderError, match="bad_image"):
        estimate_foreground(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(RenderError, match="bad_image"):
        estimate_foreground(np.zeros((4, 32, 3), dtype=np.uint8))


def test_foreground_box_is_the_tight_box_with_exclusive_ends():
    mask = np.zeros((20, 30), dtype=bool)
    mask[3:7, 10:25] = True
    mask[12, 4] = True
    assert foreground_box(mask) == (4, 3, 25, 13)
    with pytest.raises(RenderError) as error:
        foreground_box(np.zeros((5, 5), dtype=bool))
    assert error.value.reason == "no_foreground"


def test_region_pixel_box_maps_the_normalised_box_onto_the_object():
    assert region_pixel_box((10, 20, 110, 70), (0.0, 0.0, 1.0, 1.0)) == (10, 20, 110, 70)
    assert region_pixel_box((10, 20, 110, 70), (0.5, 0.5, 1.0, 1.0)) == (60, 45, 110, 70)
    assert region_pixel_box((10, 20, 110, 70), (0.25, 0.0, 0.5, 0.4)) == (35, 20, 60, 40)
    x0, y0, x1, y1 = region_pixel_box((0, 0, 3, 3), (0.9, 0.9, 0.95, 0.95))
    assert x1 > x0 and y1 > y0 and x1 <= 3 and y1 <= 3


def test_allowed_area_is_foreground_inside_the_region(object_image):
    foreground = estimate_foreground(object_image)
    spec = DefectSpec("c", "t", "", (0.5, 0.0, 1.0, 0.5), 0.01, "blob", "darker", 0.5)
    allowed, region = allowed_area(foreground, spec)
    assert np.array_equal(allowed, foreground & box_mask(foreground.shape, region))
    corner = DefectSpec("c", "t", "", (0.0, 0.0, 0.08, 0.08), 0.01, "blob", "darker", 0.5)
    with pytest.raises(RenderError) as error:
        allowed_area(foreground, corner)
    assert error.value.reason == "no_foreground"


def test_pick_centre_prefers_room_and_honours_candidates():
    allowed = np.zeros((40, 40), dtype=bool)
    allowed[5:35, 5:35] = True
    rng = np.random.default_rng(0)
    centres = np.array([pick_centre(allowed, 10.0, rng) for _ in range(200)])
    assert allowed[centres[:, 1].astype(int), centres[:, 0].astype(int)].all()
    # Pixels with 10 px of room (the inner 10x10 square) are 11% of the area but get far more of the picks.
    inner = (np.abs(centres - 19.5) <= 5.5).all(axis=1)
    assert inner.mean() > 0.2
    candidates = np.zeros_like(allowed)
    candidates[5, 5:35] = True
    picks = [pick_centre(allowed, 3.0, rng, candidates) for _ in range(20)]
    assert all(y == 5.0 for _, y in picks)


def test_foreground_cache_reuses_estimates(object_image, brick):
    cache = ForegroundCache(size=1)
    first = cache(object_image)
    assert cache(object_image.copy()) is first
    assert cache(brick).all()
    assert cache(object_image) is not first
    assert np.array_equal(cache(object_image), first)

from __future__ import annotations

import numpy as np
import pytest

from kka_synth.synth import PerlinRenderer, RenderError
from kka_synth.synth.foreground import estimate_foreground
from kka_synth.synth.perlin import AUGMENTATIONS, TEXTURES, fractal_noise, load_texture, perlin_noise
from kka_synth.types import REGIONS, TONES, DefectSpec


def spec(region=(0.0, 0.0, 1.0, 1.0), size=0.05, tone="darker", severity=0.5):
    return DefectSpec("part", "contamination", "", region, size, "blob", tone, severity)


@pytest.mark.parametrize(
    ("shape", "scale"), [((64, 64), (4.0, 4.0)), ((50, 77), (3.0, 5.0)), ((33, 20), (1.0, 1.0))]
)
def test_perlin_noise_shape_range_and_seed(shape, scale):
    noise = perlin_noise(shape, scale, np.random.default_rng(0))
    assert noise.shape == shape and noise.dtype == np.float32
    assert -1.0 <= noise.min() and noise.max() <= 1.0
    assert noise.std() > 0.05
    assert np.array_equal(noise, perlin_noise(shape, scale, np.random.default_rng(0)))
    assert not np.array_equal(noise, perlin_noise(shape, scale, np.random.default_rng(1)))


def test_perlin_noise_is_smooth_and_zero_on_the_lattice():
    noise = perlin_noise((64, 64), (4.0, 4.0), np.random.default_rng(0))
    # Neighbouring pixels differ far less than the field's range: gradient noise is continuous.
    assert np.abs(np.diff(noise, axis=1)).max() < 0.25
    # Noise vanishes on lattice points. The lattice is centred on the image: with 5 cells across 65 pixels
    # its points fall on pixels 32 +- 13k.
    noise = perlin_noise((65, 65), (5.0, 5.0), np.random.default_rng(0))
    assert np.abs(noise[6::13, 6::13]).max() < 1e-5
    assert np.abs(noise).max() > 0.2


def test_rotated_noise_differs_and_fractal_stays_in_range():
    plain = perlin_noise((48, 48), (3.0, 3.0), np.random.default_rng(0))
    turned = perlin_noise((48, 48), (3.0, 3.0), np.random.default_rng(0), angle=0.7)
    assert not np.allclose(plain, turned)
    fractal = fractal_noise((48, 48), (2.0, 2.0), np.random.default_rng(0), octaves=4)
    assert -1.0 <= fractal.min() and fractal.max() <= 1.0
    with pytest.raises(ValueError):
        perlin_noise((8, 8), (0.0, 1.0), np.random.default_rng(0))


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_augmentations_keep_type_and_shape(brick, name):
    out = AUGMENTATIONS[name](brick, np.random.default_rng(0))
    assert out.dtype == np.uint8 and out.shape == brick.shape


def test_textures_load_offline():
    for name in TEXTURES:
        texture = load_texture(name)
        assert texture.dtype == np.uint8 and texture.ndim == 3 and texture.shape[2] == 3
    with pytest.raises(RenderError):
        load_texture("marble")


@pytest.mark.parametrize("image_name", ["brick", "object"])
@pytest.mark.parametrize("region_name", ["center", "top-right", "bottom"])
@pytest.mark.parametrize("sources", [("texture",), ("self",)])
def test_perlin_mask_within_region_on_foreground(images, region_area, image_name, region_name, sources):
    image = images[image_name]
    region = REGIONS[region_name]
    out, mask = PerlinRenderer(sources=sources).render(image, spec(region=region), np.random.default_rng(5))
    foreground = estimate_foreground(image)
    assert mask.dtype == bool and mask.any()
    assert not (mask & ~region_area(foreground, region)).any()
    assert not (mask & ~foreground).any()
    assert np.array_equal(out[~mask], image[~mask])
    assert np.abs(out[mask].astype(np.int16) - image[mask]).mean() > 2.0


def test_perlin_is_deterministic_and_follows_size(object_image):
    renderer = PerlinRenderer()
    first = renderer.render(object_image, spec(), np.random.default_rng(2))
    again = renderer.render(object_image, spec(), np.random.default_rng(2))
    other = renderer.render(object_image, spec(), np.random.default_rng(3))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    area = estimate_foreground(object_image).sum()
    sizes = (0.01, 0.05, 0.2)
    counts = [renderer.render(object_image, spec(size=s), np.random.default_rng(2))[1].sum() for s in sizes]
    assert counts[0] < counts[1] < counts[2]
    for size, count in zip(sizes, counts, strict=True):
        assert 0.5 * size * area <= count <= 2.0 * size * area


@pytest.mark.parametrize("tone", TONES)
def test_perlin_severity_sets_the_blend_opacity(brick, tone):
    renderer = PerlinRenderer()
    changes = []
    for severity in (0.0, 0.5, 1.0):
        out, mask = renderer.render(brick, spec(tone=tone, severity=severity), np.random.default_rng(4))
        changes.append(np.abs(out[mask].astype(np.float32) - brick[mask]).mean())
    assert changes[0] < changes[1] < changes[2]
    assert PerlinRenderer.beta(0.0) == pytest.approx(0.1) and PerlinRenderer.beta(1.0) < 1.0


def test_perlin_tone_shifts_brightness(brick):
    renderer = PerlinRenderer()
    dark, dark_mask = renderer.render(brick, spec(tone="darker", severity=0.9), np.random.default_rng(6))
    bright, bright_mask = renderer.render(
        brick, spec(tone="brighter", severity=0.9), np.random.default_rng(6)
    )
    assert dark[dark_mask].mean() < brick[dark_mask].mean()
    assert bright[bright_mask].mean() > brick[bright_mask].mean()


def test_perlin_rejects_bad_settings():
    with pytest.raises(ValueError):
        PerlinRenderer(sources=("clouds",))
    with pytest.raises(ValueError):
        PerlinRenderer(max_scale_power=12)


def test_perlin_anomalies_draw_a_defect_and_repeat_with_the_seed():
    from kka_synth.synth.perlin import PerlinAnomalies

    image = np.full((64, 64, 3), 120, dtype=np.uint8)
    image[::8] = 60  # some structure so the foreground is the whole image
    draw = PerlinAnomalies("tile", ["crack", "stain"])
    result, mask = draw(image, np.random.default_rng(3))
    assert result.shape == image.shape and result.dtype == np.uint8
    assert mask.dtype == bool and mask.any() and not mask.all()
    assert not np.array_equal(result[mask], image[mask])
    assert np.array_equal(result[~mask], image[~mask])
    again, mask_again = draw(image, np.random.default_rng(3))
    assert np.array_equal(again, result) and np.array_equal(mask_again, mask)


def test_synthetic_stage_needs_anomalies_or_a_draw():
    from kka_synth.types import SyntheticStage

    with pytest.raises(ValueError, match="neither anomalies nor a draw"):
        SyntheticStage("kka")
    with pytest.raises(ValueError, match="share"):
        SyntheticStage("rule", draw=lambda image, rng: (image, image[..., 0] > 0), share=1.5)

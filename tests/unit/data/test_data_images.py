"""Image and mask reading and writing: mode conversion, resizing, errors naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kka_synth.data import DataError, image_size, load_mask, load_rgb, save_mask, save_rgb
from kka_synth.data.tree import list_images


def _random_rgb(rng: np.random.Generator, h: int = 24, w: int = 32) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip_is_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _random_rgb(rng)
    save_rgb(tmp_path / "sub" / "a.png", image)
    loaded = load_rgb(tmp_path / "sub" / "a.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (24, 32, 3)
    np.testing.assert_array_equal(loaded, image)
    assert not list((tmp_path / "sub").glob(".*.tmp"))


def test_grayscale_becomes_three_equal_channels(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, (20, 10), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = load_rgb(tmp_path / "g.png")
    assert rgb.shape == (20, 10, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[:, :, channel], gray)


def test_rgba_drops_alpha_and_keeps_colour(tmp_path: Path, rng: np.random.Generator) -> None:
    rgba = np.concatenate([_random_rgb(rng), rng.integers(0, 256, (24, 32, 1), dtype=np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # a fully transparent pixel keeps its stored colour
    Image.fromarray(rgba).save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert rgb.shape == (24, 32, 3)
    np.testing.assert_array_equal(rgb, rgba[:, :, :3])


def test_palette_one_bit_and_sixteen_bit_convert(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 2))
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    rgb = load_rgb(tmp_path / "p.png")
    assert rgb[0, 1].tolist() == [200, 10, 30] and rgb[0, 0].tolist() == [0, 0, 0]

    Image.fromarray(np.array([[True, False]])).save(tmp_path / "b.png")
    assert load_rgb(tmp_path / "b.png")[0].tolist() == [[255, 255, 255], [0, 0, 0]]

    deep = np.array([[0, 257 * 100, 65535, 300]], dtype=np.uint16)  # 300 / 257 rounds to 1
    Image.fromarray(deep).save(tmp_path / "d16.png")
    assert Image.open(tmp_path / "d16.png").mode.startswith("I")
    assert load_rgb(tmp_path / "d16.png")[0, :, 0].tolist() == [0, 100, 255, 1]


def test_resize_shrinks_by_area_and_grows(tmp_path: Path) -> None:
    tile = np.array([[0, 100], [200, 60]], dtype=np.uint8)  # each 2x2 block averages to 90
    gray = np.tile(tile, (16, 16))
    save_rgb(tmp_path / "t.png", np.repeat(gray[:, :, None], 3, axis=2))
    small = load_rgb(tmp_path / "t.png", size=16)
    assert small.shape == (16, 16, 3)
    assert np.all(small == 90)
    big = load_rgb(tmp_path / "t.png", size=50)
    assert big.shape == (50, 50, 3) and big.dtype == np.uint8
    with pytest.raises(DataError, match="size"):
        load_rgb(tmp_path / "t.png", size=0)


def test_mask_any_nonzero_is_true_and_resizes_nearest(tmp_path: Path) -> None:
    values = np.zeros((8, 8), dtype=np.uint8)
    values[2:4, 2:6] = 1
    values[6, 6] = 255
    Image.fromarray(values).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == np.bool_ and mask.sum() == 9
    colour = np.zeros((8, 8, 3), dtype=np.uint8)
    colour[1, 1, 2] = 7
    Image.fromarray(colour).save(tmp_path / "c.png")
    assert load_mask(tmp_path / "c.png").sum() == 1
    big = load_mask(tmp_path / "m.png", size=16)
    assert big.shape == (16, 16) and big.dtype == np.bool_ and big.sum() == 36


def test_save_mask_writes_0_255_png(tmp_path: Path) -> None:
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:3, 2:5] = True
    save_mask(tmp_path / "m.png", mask)
    stored = Image.open(tmp_path / "m.png")
    assert stored.mode == "L"
    assert set(np.unique(np.asarray(stored)).tolist()) == {0, 255}
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), mask)
    with pytest.raises(DataError, match="png"):
        save_mask(tmp_path / "m.jpg", mask)
    with pytest.raises(DataError, match=r"bool \(H, W\)"):
        save_mask(tmp_path / "x.png", np.zeros((2, 2, 3), dtype=bool))
    with pytest.raises(DataError, match=r"RGB uint8"):
        save_rgb(tmp_path / "x.png", np.zeros((2, 2, 3), dtype=np.float32))


def test_mask_folder_is_the_union(tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    first, second = np.zeros((6, 6), dtype=bool), np.zeros((6, 6), dtype=bool)
    first[0, :3] = True
    second[5, 5] = True
    save_mask(folder / "000.png", first)
    save_mask(folder / "001.png", second)
    union = load_mask(folder)
    assert union.sum() == 4 and union[0, 0] and union[5, 5]
    save_mask(folder / "002.png", np.ones((7, 6), dtype=bool))
    with pytest.raises(DataError, match="002.png"):
        load_mask(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_mask(tmp_path / "empty")


def test_missing_and_corrupt_files_raise_one_line_naming_the_file(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    with pytest.raises(DataError, match="nothing.png") as missing:
        load_rgb(tmp_path / "nothing.png")
    assert "\n" not in str(missing.value)

    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="junk.png") as junk:
        load_rgb(tmp_path / "junk.png")
    assert "\n" not in str(junk.value)
    with pytest.raises(DataError, match="junk.png"):
        load_mask(tmp_path / "junk.png")
    with pytest.raises(DataError, match="junk.png"):
        image_size(tmp_path / "junk.png")

    save_rgb(tmp_path / "whole.png", _random_rgb(rng, 64, 64))
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_rgb(tmp_path / "cut.png")


def test_other_formats_and_case_insensitive_extensions(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _random_rgb(rng)
    for name in ("a.BMP", "b.tif", "c.TIFF", "d.Png"):
        save_rgb(tmp_path / name, image)
        np.testing.assert_array_equal(load_rgb(tmp_path / name), image)
    save_rgb(tmp_path / "e.JPG", image)
    assert load_rgb(tmp_path / "e.JPG").shape == (24, 32, 3)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.BMP", "b.tif", "c.TIFF", "d.Png", "e.JPG"]
    assert image_size(tmp_path / "a.BMP") == (32, 24)

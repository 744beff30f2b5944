"""Property-based fuzzing of the parsers and loaders that read untrusted input.

Model replies, image files and dataset folders come from outside the program. Whatever they hold, each
reader must end in its documented outcome: a Proposal with a reason code, a SpecError, a DataError of one
line, or a valid value. Never another exception, a MemoryError, a warning turned into a crash, or a hang.
"""

from __future__ import annotations

import io
import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kka_synth.agents import ProposalContext
from kka_synth.agents.parsing import REASONS, parse_reply
from kka_synth.data import DataError
from kka_synth.data.folder import folder_categories, load_folder
from kka_synth.data.images import MAX_PIXELS, image_size, load_mask, load_rgb
from kka_synth.prompts import load_knowledge_file
from kka_synth.types import REGIONS, SHAPES, SPEC_FIELDS, TONES, DefectSpec, Proposal, SpecError

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BOTTLE = ProposalContext(category="bottle", knowledge=load_knowledge_file("mvtec_ad")["bottle"])
TYPES = list(BOTTLE.knowledge.defect_types)


# -------------------------------------------------------------------------------------------- spec text
def _json_values() -> st.SearchStrategy:
    """Nested JSON-like values whose leaves lean toward the spec's own keys and values."""
    words = st.sampled_from(
        [*SPEC_FIELDS, *SHAPES, *TONES, *REGIONS, *TYPES, "2%", "subtle", "3/10", "NaN", "", "\x00"]
    )
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(10**30), max_value=10**30)
        | st.floats(allow_nan=True, allow_infinity=True)
        | st.text(max_size=12)
        | words
    )
    keys = st.sampled_from(SPEC_FIELDS) | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=8),
        max_leaves=20,
    )


def _specs() -> st.SearchStrategy[dict]:
    """Dicts with every spec key, each value drawn from plausible and implausible ones."""
    values = {
        "defect_type": st.sampled_from(TYPES) | st.text(max_size=6) | st.integers(),
        "description": st.text(max_size=20) | st.none(),
        "region": st.sampled_from(list(REGIONS))
        | st.lists(st.floats(allow_nan=True) | st.text(max_size=3), min_size=0, max_size=5)
        | st.dictionaries(st.sampled_from(["x0", "y0", "x1", "y1", "x", "y"]), st.floats(), max_size=4),
        "size": st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.integers(),
        "shape": st.sampled_from(SHAPES) | st.text(max_size=6),
        "tone": st.sampled_from(TONES) | st.text(max_size=6),
        "severity": st.floats(allow_nan=True) | st.sampled_from(["subtle", "40%", "3/10", "high"]),
    }
    return st.fixed_dictionaries(values)


def _reply_texts() -> st.SearchStrategy[str]:
    decoded = st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="replace"))
    dumped = _json_values().map(lambda v: json.dumps(v, allow_nan=True))
    spec = _specs().map(lambda v: json.dumps(v, allow_nan=True))
    wrapped = st.tuples(st.text(max_size=20), spec, st.text(max_size=20)).map(
        lambda t: f"{t[0]}\n```json\n{t[1]}\n```\n{t[2]}"
    )
    cut = st.tuples(spec, st.integers(min_value=0, max_value=200)).map(lambda t: t[0][: t[1]])
    brackets = st.text(alphabet="{}[]\"':,/*#\\ \nabc0.5", max_size=200)
    return st.text(max_size=300) | decoded | dumped | spec | wrapped | cut | brackets


def _check_proposal(proposal: Proposal, detail: str, text: str) -> None:
    assert isinstance(proposal, Proposal) and proposal.text == text
    if proposal.spec is None:
        assert proposal.error in REASONS or proposal.error.startswith("constraint")
        assert "\n" not in detail and detail
    else:
        assert proposal.error is None and detail == ""
        assert proposal.spec.defect_type in TYPES
        x0, y0, x1, y1 = proposal.spec.region
        assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
        assert 0.0 <= proposal.spec.severity <= 1.0


@FUZZ
@given(text=_reply_texts())
def test_parse_reply_returns_a_proposal_for_any_text(text: str):
    proposal, detail = parse_reply(text, BOTTLE, prompt="p")
    _check_proposal(proposal, detail, text)


@FUZZ
@given(text=_reply_texts())
def test_from_text_raises_only_spec_error(text: str):
    try:
        spec = DefectSpec.from_text(text, "bottle", defect_types=TYPES)
    except SpecError as error:
        assert error.reason in REASONS and "\n" not in error.reason
        return
    assert isinstance(spec, DefectSpec) and spec.shape in SHAPES and spec.tone in TONES


def test_deep_nesting_is_a_reason_not_a_recursion_error():
    for text in ("[" * 100_000, "{" * 50_000 + "}" * 50_000, '{"a":' * 20_000 + "1" + "}" * 20_000):
        proposal, _ = parse_reply(text, BOTTLE)
        assert proposal.spec is None and proposal.error in REASONS
        with pytest.raises(SpecError):
            DefectSpec.from_text(text, "bottle")


# ------------------------------------------------------------------------------------------ image files
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, rows: bytes = b"", depth: int = 8, colour: int = 2) -> bytes:
    """A PNG with the given header; its pixel data is ``rows`` compressed (often too short on purpose)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _encoded(mode: str, fmt: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.new(mode, size)
    if mode in ("L", "RGB", "RGBA", "CMYK", "LA", "P", "1"):
        image = Image.frombytes(mode, size, rng.bytes(len(image.tobytes())))
    if mode == "P":
        image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _valid_files() -> list[tuple[str, bytes]]:
    files = []
    for mode, fmt in [
        ("RGB", "PNG"),
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("I;16", "PNG"),
        ("F", "TIFF"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("LA", "PNG"),
        ("1", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I", "TIFF"),
        ("RGB", "BMP"),
    ]:
        suffix = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}[fmt]
        files.append((suffix, _encoded(mode, fmt, (7, 5), len(files))))
    return files


VALID = _valid_files()
READERS = (load_rgb, load_mask, lambda p: load_rgb(p, 8), lambda p: load_mask(p, 8), image_size)


def _read_all(path: Path) -> None:
    """Every reader ends in a valid value or a one-line DataError, with warnings raised as errors."""
    for read in READERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                value = read(path)
            except DataError as error:
                assert "\n" not in str(error) and str(path) in str(error)
                continue
        if isinstance(value, tuple):
            assert len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)
        elif value.ndim == 3:
            assert value.dtype == np.uint8 and value.shape[2] == 3 and value.size
        else:
            assert value.dtype == np.bool_ and value.ndim == 2 and value.size


@pytest.mark.parametrize("index", range(len(VALID)))
def test_every_mode_reads_as_rgb_and_mask(tmp_path: Path, index: int):
    suffix, data = VALID[index]
    path = tmp_path / f"image{suffix}"
    path.write_bytes(data)
    rgb, mask = load_rgb(path), load_mask(path)
    assert rgb.shape == (5, 7, 3) and rgb.dtype == np.uint8 and mask.shape == (5, 7)


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp"]))
def test_random_bytes(tmp_path: Path, data: bytes, suffix: str):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    _read_all(path)


@FUZZ
@given(which=st.integers(0, len(VALID) - 1), cut=st.floats(0.0, 1.0), flips=st.lists(st.integers(0, 10**6)))
def test_truncated_and_corrupted_files(tmp_path: Path, which: int, cut: float, flips: list[int]):
    suffix, data = VALID[which]
    broken = bytearray(data[: int(len(data) * cut)])
    for position in flips:
        if broken:
            broken[position % len(broken)] ^= 0xFF
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(bytes(broken))
    _read_all(path)


@FUZZ
@given(
    width=st.integers(0, 2**31 - 1),
    height=st.integers(0, 2**31 - 1),
    depth_colour=st.sampled_from([(8, 2), (8, 0), (16, 0), (1, 0), (8, 6), (8, 3), (16, 2), (8, 4)]),
    rows=st.binary(max_size=64),
)
def test_png_headers_of_any_size(tmp_path: Path, width: int, height: int, depth_colour, rows: bytes):
    path = tmp_path / "header.png"
    path.write_bytes(_png(width, height, rows, *depth_colour))
    _read_all(path)


@pytest.mark.parametrize("side", [100_000, 20_000, int(MAX_PIXELS**0.5) + 1])
def test_decompression_bomb_is_a_data_error(tmp_path: Path, side: int):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, b"\x00" * 16))
    for read in (load_rgb, load_mask):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(DataError, match="pixels"):
                read(path)


def test_zero_size_image_is_a_data_error(tmp_path: Path):
    path = tmp_path / "empty.png"
    path.write_bytes(_png(0, 5))
    for read in (load_rgb, load_mask, image_size):
        with pytest.raises(DataError):
            read(path)


def test_palette_with_transparency_keeps_the_stored_colour(tmp_path: Path):
    image = Image.new("P", (3, 2))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putdata([0, 1, 0, 1, 1, 0])
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = load_rgb(path)
        mask = load_mask(path)
    assert rgb[0, 0].tolist() == [10, 20, 30] and rgb[0, 1].tolist() == [200, 100, 50]
    assert mask.all()  # every stored colour is nonzero, transparent or not


# --------------------------------------------------------------------------------------- dataset folder
def _rgb_png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(path, format="PNG")


def _tree(root: Path, entries: list[tuple[str, str]]) -> None:
    """Build a folder tree from (relative path, kind) pairs: kind is png, junk, dir, file, loop (a link to
    itself) or a link target. An entry that clashes with an earlier one is left out."""
    for relative, kind in entries:
        path = root / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "png":
                _rgb_png(path)
            elif kind == "junk":
                path.write_bytes(b"not an image")
            elif kind == "dir":
                path.mkdir()
            elif kind == "file":
                path.write_text("x")
            else:
                path.symlink_to(path.name if kind == "loop" else kind)
        except OSError:
            continue


NAMES = st.sampled_from(
    ["cat", "good", "train", "test", "ground_truth", "masks", "scratch", "a.png", "b.png"]
)
PARTS = st.lists(NAMES, min_size=1, max_size=4).map("/".join)
KINDS = st.sampled_from(["png", "png", "png", "junk", "dir", "file", ".", "..", "../..", "missing", "loop"])


@FUZZ
@given(entries=st.lists(st.tuples(PARTS, KINDS), max_size=12))
def test_folder_loader_on_random_trees(tmp_path_factory: pytest.TempPathFactory, entries):
    root = tmp_path_factory.mktemp("tree")
    _tree(root, entries)
    try:
        names = folder_categories(root)
        samples = load_folder(root)
    except DataError as error:
        assert "\n" not in str(error)
        return
    assert names and {s.category for s in samples} <= set(names)
    assert all(s.split in ("train", "test") and s.label in (0, 1) for s in samples)
    assert any(s.split == "train" and s.label == 0 for s in samples)


def _minimal(root: Path, normals: int = 5) -> Path:
    for i in range(normals):
        _rgb_png(root / "widget" / "good" / f"{i:03d}.png")
    return root


def test_folder_symlink_loops_do_not_hang(tmp_path: Path):
    root = _minimal(tmp_path / "data")
    (root / "widget" / "good" / "self.png").symlink_to("self.png")
    (root / "widget" / "crack").symlink_to("crack")
    (root / "widget" / "dent").symlink_to("..")  # a cycle back to the dataset root
    samples = load_folder(root)
    assert sum(s.label == 0 for s in samples) == 5
    assert all(not s.image_path.name.startswith("self") for s in samples)


def test_folder_root_that_is_a_loop_or_file(tmp_path: Path):
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_text("x")
    for root in (tmp_path / "loop", tmp_path / "file", tmp_path / "absent"):
        with pytest.raises(DataError, match="not found"):
            load_folder(root)


def test_folder_where_a_folder_is_expected_a_file(tmp_path: Path):
    root = tmp_path / "data"
    (root / "widget").mkdir(parents=True)
    (root / "widget" / "good").write_text("a file, not a folder")
    with pytest.raises(DataError, match="no folder categories"):
        load_folder(root)
    root = _minimal(tmp_path / "data2")
    (root / "widget" / "ground_truth").write_text("a file")
    (root / "widget" / "scratch").mkdir()
    _rgb_png(root / "widget" / "scratch" / "s.png")
    samples = load_folder(root)
    assert [s.mask_path for s in samples if s.label == 1] == [None]


def test_folder_empty_folders(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no folder categories"):
        load_folder(tmp_path / "empty")
    (tmp_path / "cat" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_folder(tmp_path / "cat")


def test_folder_unreadable_names_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = _minimal(tmp_path / "data")
    bad = os.fsencode(root / "widget" / "good") + b"/\xff\xfe.png"
    with open(bad, "wb") as handle:
        handle.write((root / "widget" / "good" / "000.png").read_bytes())
    os.mkdir(os.fsencode(root) + b"/\xffcat")
    with caplog.at_level("WARNING", logger="kka_synth.data.folder"):
        samples = load_folder(root)
    assert len(samples) == 5 and all(str(s.image_path).encode("utf-8") for s in samples)
    assert "2 entries" in caplog.text and "UTF-8" in caplog.text


def test_folder_unreadable_folder_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _minimal(tmp_path / "data")
    original = Path.iterdir

    def denied(self: Path):
        if self.name == "good":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", denied)
    with pytest.raises(DataError, match="permission denied"):
        load_folder(root)

"""The built-in ``demo`` dataset: two small categories in MVTec AD layout, built on first use.

``brick`` is a texture (crops of scikit-image's CC0 brick photograph, tinted) and ``washer`` an object
(a metal washer drawn procedurally on a plain background). Images are 128x128 RGB. Each category has 80
``train/good`` and 16 ``test/good`` images, and 8 test images for each of 3 defect types, each with its
mask ``ground_truth/<type>/<stem>_mask.png``; :mod:`kka_synth.data.demo_generator` draws the pixels.

The test anomalies come from a generator that is deliberately independent of kka-synth's own renderers
(``kka_synth.synth`` is never imported): gravel transplanted along an irregular polygon, elastic local
warps, Gaussian-blurred ink and oil smudges, and chips cut from the washer's rim. A demo whose test
defects came from the renderers under study would grade those renderers by themselves.

:func:`demo_root` builds the dataset once into ``<cache>/datasets/demo-v1``. The build writes into a
temporary sibling folder and renames it into place, so a killed build never leaves half a dataset; the
marker file ``demo.json`` is written last. The build is seeded and byte-identical when repeated.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from kka_synth.data.demo_generator import (
    BRICK_TEST_ROWS,
    BRICK_TRAIN_ROWS,
    DEMO_CATEGORIES,
    DEMO_DEFECT_TYPES,
    IMAGE_SIZE,
    SEED,
    demo_normal,
    demo_pair,
)
from kka_synth.data.images import DataError, save_mask, save_rgb
from kka_synth.utils.cache import cache_dir

logger = logging.getLogger(__name__)

DEMO_VERSION = "demo-v1"
TRAIN_COUNT = 80
TEST_GOOD_COUNT = 16
PER_DEFECT_COUNT = 8
MARKER = "demo.json"
"""Written last into a finished build; a demo folder without it is incomplete."""
STALE_BUILD_S = 3600.0
"""Temporary build folders older than this are leftovers of killed builds and are removed."""


def build_demo(dest: str | Path) -> Path:
    """Write the whole demo dataset into ``dest`` (a new or empty folder) and return it.

    This writes in place; :func:`demo_root` wraps it in the temporary-folder-and-rename build.
    """
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"cannot build the demo dataset into {dest}: the folder is not empty")
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    for category in DEMO_CATEGORIES:
        base = dest / category
        for index in range(TRAIN_COUNT):
            save_rgb(base / "train" / "good" / f"{index:03d}.png", demo_normal(category, "train", index))
        for index in range(TEST_GOOD_COUNT):
            save_rgb(base / "test" / "good" / f"{index:03d}.png", demo_normal(category, "test", index))
        for defect in DEMO_DEFECT_TYPES[category]:
            for index in range(PER_DEFECT_COUNT):
                _, anomalous, mask = demo_pair(category, defect, index)
                save_rgb(base / "test" / defect / f"{index:03d}.png", anomalous)
                save_mask(base / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
        counts[category] = {"train/good": TRAIN_COUNT, "test/good": TEST_GOOD_COUNT}
        counts[category].update({f"test/{d}": PER_DEFECT_COUNT for d in DEMO_DEFECT_TYPES[category]})
    text = _README.format(
        version=DEMO_VERSION,
        size=IMAGE_SIZE,
        categories=", ".join(DEMO_CATEGORIES),
        train=TRAIN_COUNT,
        test=TEST_GOOD_COUNT,
        per=PER_DEFECT_COUNT,
        defects="; ".join(f"{c}: {', '.join(DEMO_DEFECT_TYPES[c])}" for c in DEMO_CATEGORIES),
        train_rows=(BRICK_TRAIN_ROWS[0], BRICK_TRAIN_ROWS[1] - 1),
        test_rows=(BRICK_TEST_ROWS[0], BRICK_TEST_ROWS[1] - 1),
    )
    (dest / "README.txt").write_text(text)
    (dest / "LICENSE.txt").write_text(_LICENSE)
    meta = {"version": DEMO_VERSION, "seed": SEED, "image_size": IMAGE_SIZE, "counts": counts}
    (dest / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    logger.info("built the demo dataset in %s (%.1f s)", dest, time.perf_counter() - start)
    return dest


def _is_complete(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("version") == DEMO_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _remove_stale_builds(parent: Path) -> None:
    now = time.time()
    for folder in parent.glob(f".{DEMO_VERSION}.*.tmp"):
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > STALE_BUILD_S:
                shutil.rmtree(folder, ignore_errors=True)
                logger.debug("removed the leftover demo build %s", folder)
        except OSError:
            continue


def demo_root(cache: str | Path | None = None) -> Path:
    """The demo dataset's root folder, built on first use.

    ``cache`` replaces the kka-synth cache folder (``$KKA_SYNTH_CACHE`` or ``~/.cache/kka-synth``); the
    dataset lives in ``<cache>/datasets/demo-v1``.
    """
    parent = cache_dir("datasets") if cache is None else Path(cache).expanduser() / "datasets"
    final = parent / DEMO_VERSION
    if _is_complete(final):
        return final
    parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()  # an empty folder, e.g. made by cache_dir("datasets", "demo-v1")
    elif final.exists():
        if _is_complete(final):  # another process finished meanwhile
            return final
        raise DataError(f"{final} exists but is not a complete demo dataset (no {MARKER}); remove it")
    _remove_stale_builds(parent)
    temp = Path(tempfile.mkdtemp(prefix=f".{DEMO_VERSION}.", suffix=".tmp", dir=parent))
    try:
        build_demo(temp)
        os.chmod(temp, 0o755)
        try:
            os.rename(temp, final)
        except OSError:
            if not _is_complete(final):  # not another process finishing first: a real failure
                raise
            logger.debug("another process built %s first", final)
    except OSError as error:
        raise DataError(f"cannot build the demo dataset in {parent}: {error}") from None
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return final


_README = """kka-synth demo dataset ({version}), MVTec AD layout, {size}x{size} RGB PNG.

Categories: {categories}.
Per category: {train} train/good, {test} test/good, and {per} test images per defect type,
each with its mask in ground_truth/<type>/<stem>_mask.png (0/255).
Defect types: {defects}.

brick: crops of scikit-image's "brick" photograph, tinted brick red; training crops come from rows
{train_rows[0]}-{train_rows[1]} and test crops from rows {test_rows[0]}-{test_rows[1]} of the 512x512 source.
washer: a metal washer drawn procedurally on a plain cloth background.
Test anomalies are made by kka_synth.data.demo_generator, which shares no code with kka-synth's renderers.
Rebuilt byte-identically by kka_synth.data.demo.build_demo.
"""

_LICENSE = """The brick and contamination textures are scikit-image's sample images "brick" (from CC0Textures
Bricks25) and "gravel" (from CC0Textures Gravel04), released under the Creative Commons CC0 1.0 Universal
public domain dedication and shipped with scikit-image (skimage.data). The washer images are drawn by a
program and contain no third-party pixels.
"""

"""Loader for generic image folders, for data that follows no benchmark's layout.

Two shapes of a category folder are accepted:

*structured* (the MVTec AD layout with optional masks)::

    <category>/train/good/*          normal training images (required, not empty)
    <category>/test/good/*           normal test images (optional)
    <category>/test/<defect>/*       anomalous test images, one folder per defect type
    <category>/ground_truth/<defect>/<stem>_mask.png or <stem>.png   (optional)

*minimal* (no split at all)::

    <category>/good/*                normal images (required, not empty)
    <category>/<defect>/*            anomalous images, one folder per defect type
    <category>/ground_truth/<defect>/<stem>_mask.png or <stem>.png   (optional)

In the minimal shape the normals are split deterministically: sorted by name, every 5th image goes to
test (20%) and the rest to train; anomalies are test images. A folder named ``ground_truth`` or
``masks`` is never a defect type.

ROOT itself may be a category: it is taken as one when it holds ``train/good`` (structured) or ``good``
(minimal), and the category is then named after ROOT's folder name. Otherwise every subfolder of ROOT
in one of the two shapes is a category. Masks are optional here: an anomalous image without a mask gets
``mask_path=None`` (a debug log line counts them).

Only fixed depths are listed, so a symbolic link back up the tree cannot make the loader loop; a link that
points nowhere (or to itself) is neither a file nor a folder and is passed over. Files and folders whose
names are not valid UTF-8 are skipped, counted and logged once per load, because such names cannot be
written into a run's JSON and parquet files. A folder that cannot be listed (permissions, I/O) is a
:class:`~kka_synth.data.images.DataError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from kka_synth.data.images import DataError
from kka_synth.data.tree import (
    NORMAL,
    find_mask,
    index_by_stem,
    list_images,
    require_images,
    require_root,
    select_categories,
    split_normals,
    subfolders,
)
from kka_synth.types import Sample

T = TypeVar("T")

logger = logging.getLogger(__name__)

MASK_FOLDERS = ("ground_truth", "masks")
"""Folder names that hold masks, never defect images."""


def _utf8(name: str) -> bool:
    """True when ``name`` (as Python decoded it from the file system) is valid UTF-8 text."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Skipped:
    """Counts the entries a load passed over because their names are not valid UTF-8."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def keep(self, names: list[T], key: Callable[[T], str]) -> list[T]:
        kept = [n for n in names if _utf8(key(n))]
        self.names += [key(n) for n in names if not _utf8(key(n))]
        return kept

    def log(self, root: Path) -> None:
        if self.names:
            logger.warning(
                "folder: skipped %d entries under %s whose names are not valid UTF-8 (first: %r)",
                len(self.names),
                root,
                self.names[0],
            )


def _listing(root: Path, read: Callable[[], T]) -> T:
    """``read()``, with a folder that cannot be listed turned into a one-line :class:`DataError`."""
    try:
        return read()
    except OSError as error:
        where = os.fsdecode(error.filename) if error.filename is not None else str(root)
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        raise DataError(f"cannot read dataset folder {where}: {reason}") from None


def _shape(folder: Path) -> str | None:
    """ "structured", "minimal" or None for a folder that is no category."""
    if (folder / "train" / NORMAL).is_dir():
        return "structured"
    if (folder / NORMAL).is_dir():
        return "minimal"
    return None


def _category_dirs(root: Path, skipped: _Skipped) -> dict[str, Path]:
    """Category name -> folder, following the rules of the module docstring."""
    if _shape(root) is not None:
        return {name: root for name in skipped.keep([root.resolve().name], str)}
    names = skipped.keep(subfolders(root), str)
    return {name: root / name for name in names if _shape(root / name) is not None}


def folder_categories(root: str | Path) -> list[str]:
    """Sorted category names of a generic folder root."""
    path = require_root(root, "folder")
    skipped = _Skipped()
    names = sorted(_listing(path, lambda: _category_dirs(path, skipped)))
    skipped.log(path)
    return names


def _mask_index(base: Path, defect: str, skipped: _Skipped) -> dict[str, Path]:
    for name in MASK_FOLDERS:
        folder = base / name / defect
        if folder.is_dir():
            kept = skipped.keep(list(index_by_stem(folder).items()), lambda item: item[1].name)
            return dict(kept)
    return {}


def _anomalies(base: Path, images_dir: Path, category: str, defect: str, skipped: _Skipped) -> list[Sample]:
    masks = _mask_index(base, defect, skipped)
    images = skipped.keep(list_images(images_dir), lambda p: p.name)
    samples = [Sample(p, category, "test", 1, defect, find_mask(masks, p.stem)) for p in images]
    unmasked = sum(s.mask_path is None for s in samples)
    if unmasked:
        logger.debug("folder: %d of %d images in %s have no mask", unmasked, len(samples), images_dir)
    return samples


def _load_structured(base: Path, category: str, skipped: _Skipped) -> list[Sample]:
    train = skipped.keep(require_images(base / "train" / NORMAL, "normal training images"), lambda p: p.name)
    if not train:
        raise DataError(f"folder {base / 'train' / NORMAL} holds no images with readable names")
    samples = [Sample(p, category, "train", 0, NORMAL) for p in train]
    test_dir = base / "test"
    if not test_dir.is_dir():
        logger.warning("folder: %s has no test folder; only training images are loaded", base)
        return samples
    names = skipped.keep(subfolders(test_dir), str)
    if NORMAL in names:
        normals = skipped.keep(list_images(test_dir / NORMAL), lambda p: p.name)
        samples += [Sample(p, category, "test", 0, NORMAL) for p in normals]
    for defect in (name for name in names if name != NORMAL):
        samples += _anomalies(base, test_dir / defect, category, defect, skipped)
    return samples


def _load_minimal(base: Path, category: str, skipped: _Skipped) -> list[Sample]:
    normals = skipped.keep(require_images(base / NORMAL, "normal images"), lambda p: p.name)
    train, test = split_normals(normals)
    if not train:
        raise DataError(f"folder {base / NORMAL} holds no images with readable names")
    samples = [Sample(p, category, "train", 0, NORMAL) for p in train]
    samples += [Sample(p, category, "test", 0, NORMAL) for p in test]
    for defect in skipped.keep(subfolders(base), str):
        if defect == NORMAL or defect in MASK_FOLDERS:
            continue
        samples += _anomalies(base, base / defect, category, defect, skipped)
    return samples


def load_folder(root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Samples of a generic folder dataset (see the module docstring for what is accepted)."""
    path = require_root(root, "folder")
    skipped = _Skipped()

    def read() -> list[Sample]:
        dirs = _category_dirs(path, skipped)
        chosen = select_categories(sorted(dirs), categories, "folder", path)
        samples: list[Sample] = []
        for category in chosen:
            base = dirs[category]
            load = _load_structured if _shape(base) == "structured" else _load_minimal
            samples += load(base, category, skipped)
        return samples

    samples = _listing(path, read)
    skipped.log(path)
    logger.debug("folder: %d samples from %s", len(samples), path)
    return samples

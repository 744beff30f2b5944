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
"""

from __future__ import annotations

import logging
from pathlib import Path

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

logger = logging.getLogger(__name__)

MASK_FOLDERS = ("ground_truth", "masks")
"""Folder names that hold masks, never defect images."""


def _shape(folder: Path) -> str | None:
    """ "structured", "minimal" or None for a folder that is no category."""
    if (folder / "train" / NORMAL).is_dir():
        return "structured"
    if (folder / NORMAL).is_dir():
        return "minimal"
    return None


def _category_dirs(root: Path) -> dict[str, Path]:
    """Category name -> folder, following the rules of the module docstring."""
    if _shape(root) is not None:
        return {root.resolve().name: root}
    return {name: root / name for name in subfolders(root) if _shape(root / name) is not None}


def folder_categories(root: str | Path) -> list[str]:
    """Sorted category names of a generic folder root."""
    return sorted(_category_dirs(require_root(root, "folder")))


def _mask_index(base: Path, defect: str) -> dict[str, Path]:
    for name in MASK_FOLDERS:
        folder = base / name / defect
        if folder.is_dir():
            return index_by_stem(folder)
    return {}


def _anomalies(base: Path, images_dir: Path, category: str, defect: str) -> list[Sample]:
    masks = _mask_index(base, defect)
    images = list_images(images_dir)
    samples = [Sample(p, category, "test", 1, defect, find_mask(masks, p.stem)) for p in images]
    unmasked = sum(s.mask_path is None for s in samples)
    if unmasked:
        logger.debug("folder: %d of %d images in %s have no mask", unmasked, len(samples), images_dir)
    return samples


def _load_structured(base: Path, category: str) -> list[Sample]:
    train = require_images(base / "train" / NORMAL, "normal training images")
    samples = [Sample(p, category, "train", 0, NORMAL) for p in train]
    test_dir = base / "test"
    if not test_dir.is_dir():
        logger.warning("folder: %s has no test folder; only training images are loaded", base)
        return samples
    names = subfolders(test_dir)
    if NORMAL in names:
        samples += [Sample(p, category, "test", 0, NORMAL) for p in list_images(test_dir / NORMAL)]
    for defect in (name for name in names if name != NORMAL):
        samples += _anomalies(base, test_dir / defect, category, defect)
    return samples


def _load_minimal(base: Path, category: str) -> list[Sample]:
    train, test = split_normals(require_images(base / NORMAL, "normal images"))
    samples = [Sample(p, category, "train", 0, NORMAL) for p in train]
    samples += [Sample(p, category, "test", 0, NORMAL) for p in test]
    for defect in subfolders(base):
        if defect == NORMAL or defect in MASK_FOLDERS:
            continue
        samples += _anomalies(base, base / defect, category, defect)
    return samples


def load_folder(root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Samples of a generic folder dataset (see the module docstring for what is accepted)."""
    path = require_root(root, "folder")
    dirs = _category_dirs(path)
    chosen = select_categories(sorted(dirs), categories, "folder", path)
    samples: list[Sample] = []
    for category in chosen:
        base = dirs[category]
        load = _load_structured if _shape(base) == "structured" else _load_minimal
        samples += load(base, category)
    logger.debug("folder: %d samples from %s", len(samples), path)
    return samples

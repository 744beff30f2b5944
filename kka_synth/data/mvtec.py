"""Loaders for the MVTec AD and MVTec LOCO AD folder layouts.

MVTec AD (Bergmann et al., "MVTec AD — A Comprehensive Real-World Dataset for Unsupervised Anomaly
Detection", CVPR 2019)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/good/*.png
    ROOT/<category>/test/<defect_type>/*.png
    ROOT/<category>/ground_truth/<defect_type>/<stem>_mask.png

MVTec LOCO AD (Bergmann et al., "Beyond Dents and Scratches: Logical Constraints in Unsupervised Anomaly
Detection and Localization", IJCV 2022) has a validation split and keeps one or more mask files per
anomalous image in a folder; ``Sample.mask_path`` then points at that folder and
:func:`kka_synth.data.images.load_mask` reads it as the union::

    ROOT/<category>/{train/good, validation/good}/*.png
    ROOT/<category>/test/{good, logical_anomalies, structural_anomalies}/*.png
    ROOT/<category>/ground_truth/<defect_type>/<stem>/000.png [, 001.png, ...]
    ROOT/<category>/defects_config.json   (optional; see :func:`loco_defects_config`)

A category is a subfolder of ROOT holding ``train`` or ``test``. Every anomalous test image must have its
mask; a missing folder or mask raises :class:`DataError` naming it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.data.images import DataError, load_rgb, mask_files, resize_mask
from kka_synth.data.tree import (
    NORMAL,
    find_mask,
    index_by_stem,
    list_images,
    require_dir,
    require_images,
    require_root,
    select_categories,
    subfolders,
)
from kka_synth.types import Sample

logger = logging.getLogger(__name__)


def _is_category(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "test").is_dir()


def mvtec_categories(root: str | Path) -> list[str]:
    """Sorted category names under an MVTec AD or MVTec LOCO AD root."""
    path = require_root(root, "mvtec")
    return [name for name in subfolders(path) if _is_category(path / name)]


def _normals(folder: Path, category: str, split: str, what: str) -> list[Sample]:
    return [
        Sample(image_path=p, category=category, split=split, label=0, defect_type=NORMAL)
        for p in require_images(folder, what)
    ]


def _test_folders(base: Path) -> Iterator[tuple[str, list[Path]]]:
    """(defect type, images) of each non-empty test folder, "good" first and the rest sorted."""
    test_dir = require_dir(base / "test", "test images")
    require_dir(test_dir / NORMAL, "normal test images")
    names = subfolders(test_dir)
    for defect in [NORMAL] * (NORMAL in names) + [name for name in names if name != NORMAL]:
        images = list_images(test_dir / defect)
        if not images:
            logger.warning("skipping empty test folder %s", test_dir / defect)
            continue
        yield defect, images


def _load_mvtec_ad_category(root: Path, category: str) -> list[Sample]:
    base = root / category
    samples = _normals(base / "train" / NORMAL, category, "train", "normal training images")
    for defect, images in _test_folders(base):
        if defect == NORMAL:
            samples += [Sample(p, category, "test", 0, NORMAL) for p in images]
            continue
        mask_dir = require_dir(base / "ground_truth" / defect, f"masks of test/{defect}")
        masks = index_by_stem(mask_dir)
        for image in images:
            mask = find_mask(masks, image.stem)
            if mask is None:
                raise DataError(f"missing mask {mask_dir / (image.stem + '_mask.png')} for {image}")
            samples.append(Sample(image, category, "test", 1, defect, mask))
    return samples


def load_mvtec_ad(root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Samples of the MVTec AD layout: train/good, then test (good first), category by category."""
    path = require_root(root, "mvtec_ad")
    chosen = select_categories(mvtec_categories(path), categories, "mvtec_ad", path)
    samples = [s for category in chosen for s in _load_mvtec_ad_category(path, category)]
    logger.debug("mvtec_ad: %d samples from %s", len(samples), path)
    return samples


def _load_loco_category(root: Path, category: str) -> list[Sample]:
    base = root / category
    samples = _normals(base / "train" / NORMAL, category, "train", "normal training images")
    if (base / "validation").is_dir():
        samples += _normals(base / "validation" / NORMAL, category, "validation", "normal validation images")
    for defect, images in _test_folders(base):
        if defect == NORMAL:
            samples += [Sample(p, category, "test", 0, NORMAL) for p in images]
            continue
        mask_root = require_dir(base / "ground_truth" / defect, f"masks of test/{defect}")
        for image in images:
            mask_dir = mask_root / image.stem
            if not mask_dir.is_dir():
                raise DataError(f"missing mask folder {mask_dir} for {image}")
            if not list_images(mask_dir):
                raise DataError(f"mask folder {mask_dir} holds no images (masks of {image})")
            samples.append(Sample(image, category, "test", 1, defect, mask_dir))
    return samples


def load_mvtec_loco(root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Samples of the MVTec LOCO AD layout: train, validation (when present), then test (good first)."""
    path = require_root(root, "mvtec_loco")
    chosen = select_categories(mvtec_categories(path), categories, "mvtec_loco", path)
    samples = [s for category in chosen for s in _load_loco_category(path, category)]
    logger.debug("mvtec_loco: %d samples from %s", len(samples), path)
    return samples


def loco_defects_config(root: str | Path, category: str) -> list[dict[str, Any]]:
    """The entries of ``ROOT/<category>/defects_config.json`` (defect names, pixel values, saturation
    thresholds used by the sPRO metric), or an empty list when the file does not exist."""
    path = Path(root) / category / "defects_config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(data, list) or not all(isinstance(entry, dict) for entry in data):
        raise DataError(f"{path} must hold a JSON list of objects")
    return data


def _defects_by_value(defects_config: list[dict[str, Any]]) -> dict[int, tuple[float, bool]]:
    """pixel_value -> (saturation_threshold, relative_saturation), checked."""
    by_value: dict[int, tuple[float, bool]] = {}
    for entry in defects_config:
        try:
            value, threshold = entry["pixel_value"], entry["saturation_threshold"]
            relative = entry["relative_saturation"]
        except (KeyError, TypeError):
            raise DataError(
                "defects_config entries need pixel_value, saturation_threshold and relative_saturation, "
                f"got {entry!r}"
            ) from None
        numbers_ok = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in (value, threshold)
        )
        if not numbers_ok or not isinstance(relative, bool) or not threshold > 0 or value != int(value):
            raise DataError(f"bad defects_config entry {entry!r}")
        by_value[int(value)] = (float(threshold), relative)
    return by_value


def loco_regions(
    mask_dir: str | Path, defects_config: list[dict[str, Any]], size: int | None = None
) -> list[tuple[np.ndarray, float]]:
    """The annotated regions of one MVTec LOCO AD test image, as the sPRO metric takes them.

    ``mask_dir`` holds one mask image per region (sorted by name), whose nonzero pixels all carry the
    ``pixel_value`` of a ``defects_config`` entry (see :func:`loco_defects_config`). A region's saturation
    is ``saturation_threshold * area`` when ``relative_saturation``, else ``saturation_threshold`` pixels at
    full resolution, scaled by the change of image area when ``size`` resizes the mask (nearest neighbour, to
    ``size`` x ``size``); it is capped at the region's area.

    Returns:
        One (bool mask (H, W), saturation in pixels) per mask file.

    Raises:
        DataError: naming the file that cannot be read, holds no or several pixel values, carries a value
            that no entry describes, or loses all its pixels when resized.
    """
    by_value = _defects_by_value(defects_config)
    regions: list[tuple[np.ndarray, float]] = []
    for path in mask_files(mask_dir):
        rgb = load_rgb(path)  # (H, W, 3) uint8; a gray mask repeats its value in every channel
        gray = rgb[:, :, 0]
        if not (np.array_equal(gray, rgb[:, :, 1]) and np.array_equal(gray, rgb[:, :, 2])):
            raise DataError(f"LOCO mask {path} is not a gray image")
        mask = gray != 0
        values = np.unique(gray[mask])
        if values.size != 1:
            raise DataError(f"LOCO mask {path} must hold one nonzero pixel value, found {values.tolist()}")
        value = int(values[0])
        if value not in by_value:
            known = sorted(by_value)
            raise DataError(f"LOCO mask {path} has pixel value {value}, not in defects_config {known}")
        threshold, relative = by_value[value]
        full_pixels = mask.size
        if size is not None:
            mask = resize_mask(mask, size)
        area = int(np.count_nonzero(mask))
        if area == 0:
            raise DataError(f"LOCO mask {path} has no pixels left at size {size}")
        saturation = threshold * area if relative else threshold * mask.size / full_pixels
        regions.append((mask, float(min(saturation, area))))
    return regions

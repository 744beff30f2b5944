"""One entry point over every dataset layout, and the pixels of a :class:`~kka_synth.types.Sample`.

``load_samples(dataset, root, categories)`` returns the samples of a layout in a deterministic order:
category by category, train and validation before test, normal before anomalous, then by file name.
Pixels are read lazily: :func:`load_sample` reads an image and its mask and checks that their sizes
agree, and :func:`validate_pair` does the same check from the file headers alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from kka_synth.config import HF_PREFIX
from kka_synth.data.demo import demo_root
from kka_synth.data.folder import folder_categories, load_folder
from kka_synth.data.hf_mirror import hf_mirror_categories, load_hf_mirror
from kka_synth.data.images import (
    DataError,
    image_size,
    load_mask,
    load_rgb,
    mask_files,
    resize_mask,
    resize_rgb,
)
from kka_synth.data.mvtec import load_mvtec_ad, load_mvtec_loco, mvtec_categories
from kka_synth.data.visa import load_visa, visa_categories
from kka_synth.types import Sample

LOADERS: dict[str, Callable[..., list[Sample]]] = {
    "mvtec_ad": load_mvtec_ad,
    "mvtec_loco": load_mvtec_loco,
    "visa": load_visa,
    "folder": load_folder,
}
"""Dataset name -> loader ``(root, categories) -> list[Sample]``; "demo" is the MVTec AD loader on the
built-in demo dataset. A dataset named ``hf:<repo id or path>`` goes to :data:`HF_LOADER` instead."""

HF_LOADER: Callable[..., list[Sample]] = load_hf_mirror
"""Loader of ``hf:<name>`` datasets: ``(name, root, categories, columns) -> list[Sample]``."""

_CATEGORY_LISTERS: dict[str, Callable[[str | Path], list[str]]] = {
    "mvtec_ad": mvtec_categories,
    "mvtec_loco": mvtec_categories,
    "visa": visa_categories,
    "folder": folder_categories,
}

DATASET_NAMES = ("demo", *LOADERS)


def _hf_name(dataset: str) -> str | None:
    """The mirror name of an ``hf:<name>`` dataset, else None."""
    if isinstance(dataset, str) and dataset.startswith(HF_PREFIX) and len(dataset) > len(HF_PREFIX):
        return dataset[len(HF_PREFIX) :]
    return None


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASET_NAMES and _hf_name(dataset) is None:
        raise DataError(
            f"unknown dataset {dataset!r} (known: {', '.join(DATASET_NAMES)}, or hf:<repo id or path>)"
        )


def load_samples(
    dataset: str,
    root: str | Path | None,
    categories: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Sample]:
    """The samples of ``dataset`` under ``root``, restricted to ``categories`` (all when None or empty).

    For ``"demo"``, ``root`` is the cache folder the demo is built into (None: the kka-synth cache). For
    ``"hf:<name>"``, ``root`` is where the mirror's images are written (None: the cache) and ``columns``
    maps its columns (``DataConfig.hf_columns``); other datasets ignore ``columns``.
    Unknown datasets or categories and missing folders or masks raise :class:`DataError`.
    """
    _check_dataset(dataset)
    requested = list(categories) if categories else None
    mirror = _hf_name(dataset)
    if mirror is not None:
        return HF_LOADER(mirror, root, requested, columns)
    if dataset == "demo":
        return load_mvtec_ad(demo_root(root), requested)
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a root folder (pass --data-root)")
    return LOADERS[dataset](root, requested)


def list_categories(
    dataset: str, root: str | Path | None, columns: Mapping[str, str] | None = None
) -> list[str]:
    """Sorted category names of ``dataset`` under ``root`` (``columns``: see :func:`load_samples`)."""
    _check_dataset(dataset)
    mirror = _hf_name(dataset)
    if mirror is not None:
        return hf_mirror_categories(mirror, columns)
    if dataset == "demo":
        return mvtec_categories(demo_root(root))
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a root folder (pass --data-root)")
    return _CATEGORY_LISTERS[dataset](root)


def sample_id(sample: Sample) -> str:
    """A stable, readable id: ``category/split/defect_type/stem``."""
    return f"{sample.category}/{sample.split}/{sample.defect_type}/{Path(sample.image_path).stem}"


def _size_mismatch(
    sample: Sample, image_wh: tuple[int, ...], mask_wh: tuple[int, ...], mask: Path
) -> DataError:
    return DataError(
        f"mask {mask} is {mask_wh[0]}x{mask_wh[1]} but image {sample.image_path} "
        f"is {image_wh[0]}x{image_wh[1]}"
    )


def validate_pair(sample: Sample) -> None:
    """Check from the file headers that the image and its mask(s) are readable and have the same size."""
    image_wh = image_size(sample.image_path)
    if sample.mask_path is None:
        return
    for path in mask_files(sample.mask_path):
        mask_wh = image_size(path)
        if mask_wh != image_wh:
            raise _size_mismatch(sample, image_wh, mask_wh, path)


def load_sample(sample: Sample, size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(image RGB uint8 (H, W, 3), mask bool (H, W) or None), resized to (size, size) when given.

    The image and mask are compared at their stored sizes before resizing; a mismatch raises
    :class:`DataError` naming both files.
    """
    image = load_rgb(sample.image_path)
    mask = None
    if sample.mask_path is not None:
        mask = load_mask(sample.mask_path)
        if mask.shape != image.shape[:2]:
            raise _size_mismatch(sample, image.shape[1::-1], mask.shape[::-1], Path(sample.mask_path))
    if size is not None:
        image = resize_rgb(image, size)
        mask = None if mask is None else resize_mask(mask, size)
    return image, mask


def load_batch(samples: Sequence[Sample], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8 and masks (N, size, size) bool; a sample without mask is all False."""
    images = np.zeros((len(samples), size, size, 3), dtype=np.uint8)
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, sample in enumerate(samples):
        image, mask = load_sample(sample, size)
        images[i] = image
        if mask is not None:
            masks[i] = mask
    return images, masks

"""Folder-tree checks shared by the dataset loaders: required folders, image listings, category choice.

Every listing is sorted by name, so the order of samples never depends on the file system. Hidden entries
(names starting with a dot, such as macOS ``._`` resource files) are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kka_synth.data.images import DataError, is_image_file

NORMAL = "good"
"""Defect type of normal images (MVTec AD's folder name)."""

NORMAL_TEST_EVERY = 5
"""Layouts without a train/test split send every 5th normal image (sorted by name) to test, 20%."""


def require_dir(path: Path, what: str) -> Path:
    """``path`` when it is a folder, else a :class:`DataError` naming it and what it should hold."""
    if not path.is_dir():
        raise DataError(f"missing folder {path} ({what})")
    return path


def require_root(root: str | Path | None, dataset: str) -> Path:
    """The dataset root as a Path, checked to exist."""
    if root is None:
        raise DataError(f"dataset {dataset!r} needs a root folder (pass --data-root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"dataset root not found: {path}")
    return path


def subfolders(folder: Path) -> list[str]:
    """Names of the visible subfolders of ``folder``, sorted."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (extensions of :data:`IMAGE_EXTENSIONS`), sorted by name."""
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)


def require_images(folder: Path, what: str) -> list[Path]:
    """:func:`list_images` of a folder that must exist and hold at least one image."""
    images = list_images(require_dir(folder, what))
    if not images:
        raise DataError(f"folder {folder} holds no images ({what})")
    return images


def index_by_stem(folder: Path) -> dict[str, Path]:
    """Map file stem to path for the images in ``folder``; a .png wins over other extensions."""
    index: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem not in index or path.suffix.lower() == ".png":
            index[path.stem] = path
    return index


def find_mask(index: dict[str, Path], stem: str) -> Path | None:
    """The mask of image ``stem`` in an :func:`index_by_stem`: ``<stem>_mask`` first, then ``<stem>``."""
    return index.get(f"{stem}_mask") or index.get(stem)


def select_categories(
    known: Sequence[str], requested: Sequence[str] | None, dataset: str, root: Path
) -> list[str]:
    """The requested categories (all known ones when None or empty), checked against ``known``."""
    if not known:
        raise DataError(f"no {dataset} categories found under {root}")
    if not requested:
        return list(known)
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise DataError(f"unknown {dataset} category {unknown[0]!r} under {root} (known: {', '.join(known)})")
    return list(dict.fromkeys(requested))


def split_normals(images: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Deterministic train/test split for layouts without one: every :data:`NORMAL_TEST_EVERY`-th image
    of the name-sorted list (the 5th, 10th, ...) goes to test, the rest to train."""
    ordered = sorted(images, key=lambda p: p.name)
    train = [p for i, p in enumerate(ordered) if i % NORMAL_TEST_EVERY != NORMAL_TEST_EVERY - 1]
    test = [p for i, p in enumerate(ordered) if i % NORMAL_TEST_EVERY == NORMAL_TEST_EVERY - 1]
    return train, test

"""Loader for the VisA dataset (Zou et al., "SPot-the-Difference Self-Supervised Pre-training for
Anomaly Detection and Segmentation", ECCV 2022).

Two layouts are accepted. When ``ROOT/split_csv/1cls.csv`` exists it is the split: one row per image with
the columns ``object,split,label,image,mask``; ``split`` is train or test, ``label`` is normal or anomaly,
and the paths are relative to ROOT (the mask is empty for normal images)::

    object,split,label,image,mask
    candle,train,normal,candle/Data/Images/Normal/0000.JPG,
    candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png

Without the csv, the per-category raw layout is read::

    ROOT/<category>/Data/Images/Normal/*.JPG
    ROOT/<category>/Data/Images/Anomaly/*.JPG
    ROOT/<category>/Data/Masks/Anomaly/<stem>.png

and the raw layout carries no split, so the normals are split deterministically: sorted by file name,
every 5th image (the 5th, 10th, ...) goes to test and the rest to train, which sends 20% to test. All
anomalies are test images. VisA names no defect type in either layout, so anomalies get ``"anomaly"``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from kka_synth.data.images import DataError
from kka_synth.data.tree import (
    NORMAL,
    index_by_stem,
    require_dir,
    require_images,
    require_root,
    select_categories,
    split_normals,
    subfolders,
)
from kka_synth.types import Sample

logger = logging.getLogger(__name__)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
ANOMALY = "anomaly"
"""Defect type given to VisA anomalies."""


def _read_csv(root: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) for every data row of the split csv, with the header checked."""
    path = root / SPLIT_CSV
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                needed = ",".join(CSV_COLUMNS)
                raise DataError(f"{path} lacks the column(s) {', '.join(missing)} (needs {needed})")
            return [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def _raw_categories(root: Path) -> list[str]:
    return [name for name in subfolders(root) if (root / name / "Data" / "Images").is_dir()]


def visa_categories(root: str | Path) -> list[str]:
    """Sorted categories: the csv's ``object`` values, or the raw layout's category folders."""
    path = require_root(root, "visa")
    if (path / SPLIT_CSV).is_file():
        return sorted({row["object"] for _, row in _read_csv(path) if row["object"]})
    return _raw_categories(path)


def _from_csv(root: Path, categories: list[str] | None) -> list[Sample]:
    csv_path = root / SPLIT_CSV
    rows = _read_csv(root)
    known = sorted({row["object"] for _, row in rows if row["object"]})
    chosen = select_categories(known, categories, "visa", root)
    by_category: dict[str, list[Sample]] = {name: [] for name in chosen}
    for line, row in rows:
        if row["object"] not in by_category:
            continue
        where = f"{csv_path} line {line}"
        if row["split"] not in ("train", "test"):
            raise DataError(f"{where}: split must be train or test, got {row['split']!r}")
        if row["label"] not in ("normal", "anomaly"):
            raise DataError(f"{where}: label must be normal or anomaly, got {row['label']!r}")
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            raise DataError(f"{where}: image file not found: {image}")
        if row["label"] == "normal":
            sample = Sample(image, row["object"], row["split"], 0, NORMAL)
        else:
            mask = root / row["mask"]
            if not row["mask"] or not mask.is_file():
                raise DataError(f"{where}: mask file not found: {mask} (for {image})")
            sample = Sample(image, row["object"], row["split"], 1, ANOMALY, mask)
        by_category[row["object"]].append(sample)
    return [s for name in chosen for s in sorted(by_category[name], key=_order)]


def _order(sample: Sample) -> tuple[int, int, str]:
    """train before test, normal before anomaly, then by path."""
    return (sample.split != "train", sample.label, str(sample.image_path))


def _from_raw(root: Path, categories: list[str] | None) -> list[Sample]:
    chosen = select_categories(_raw_categories(root), categories, "visa", root)
    samples: list[Sample] = []
    for category in chosen:
        data = root / category / "Data"
        normals = require_images(data / "Images" / "Normal", "normal images")
        anomalies = require_images(data / "Images" / "Anomaly", "anomalous images")
        mask_dir = require_dir(data / "Masks" / "Anomaly", "masks of the anomalous images")
        masks = index_by_stem(mask_dir)
        train, test = split_normals(normals)
        samples += [Sample(p, category, "train", 0, NORMAL) for p in train]
        samples += [Sample(p, category, "test", 0, NORMAL) for p in test]
        for image in anomalies:
            mask = masks.get(image.stem)
            if mask is None:
                raise DataError(f"missing mask {mask_dir / (image.stem + '.png')} for {image}")
            samples.append(Sample(image, category, "test", 1, ANOMALY, mask))
    return samples


def load_visa(root: str | Path, categories: list[str] | None = None) -> list[Sample]:
    """Samples of VisA from ``split_csv/1cls.csv`` when present, else from the raw per-category layout."""
    path = require_root(root, "visa")
    if (path / SPLIT_CSV).is_file():
        samples = _from_csv(path, categories)
        logger.debug("visa: %d samples from %s", len(samples), path / SPLIT_CSV)
    else:
        samples = _from_raw(path, categories)
        logger.debug("visa: %d samples from the raw layout under %s (no %s)", len(samples), path, SPLIT_CSV)
    return samples

"""Loader for Hugging Face dataset mirrors of anomaly-detection datasets (``--dataset hf:ORG/NAME``).

A mirror is any dataset the ``datasets`` library opens: a Hub repository id, a folder written by
``save_to_disk``, or a local folder (or file) of parquet. Its columns are mapped to kka-synth's fields by
``columns`` (``DataConfig.hf_columns``; missing keys take :data:`~kka_synth.config.HF_COLUMNS`):

- ``image`` (required) and ``mask`` (optional, None for normal images): ``datasets.Image`` columns.
- ``label``: 0/1, a bool, a string such as "good"/"anomaly", or a ``ClassLabel`` whose names say so.
- ``defect_type``: MVTec AD's folder name ("good" for normal images); ``category``: the category name.
- ``split``: "train", "test" or "validation" per row. Without this column the mirror's own splits are used,
  and they must carry those names.

``label`` and ``defect_type`` may each be missing, not both: a missing label follows from the defect type
("good" is normal), a missing defect type is "good" or "anomaly". Without a category column every row
belongs to one category named after the mirror. Training rows must be normal: kka-synth never trains on
anomalies, so an anomalous training row raises :class:`DataError` instead of being moved.

:class:`~kka_synth.types.Sample` holds file paths, so the images are written once as PNG files to
``<root>/<mirror>/<split>-<fingerprint>/<row>.png`` (masks as ``<row>_mask.png``, 0/255), keyed by the
``datasets`` fingerprint of each split and the row index; ``root`` defaults to the kka-synth cache. A file
already there is not written again. Every write goes through a temporary file and a rename.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kka_synth.config import HF_COLUMNS
from kka_synth.data.images import DataError, save_mask
from kka_synth.data.tree import NORMAL
from kka_synth.types import Sample
from kka_synth.utils.cache import cache_dir

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
"""Split names a mirror may use, in the order samples are listed."""
ANOMALY = "anomaly"
"""Defect type of an anomalous row when the mirror has no defect-type column."""
_NORMAL_WORDS = {"good", "normal", "ok", "0", "false"}
_ANOMALOUS_WORDS = {"anomaly", "anomalous", "abnormal", "bad", "defect", "defective", "ng", "1", "true"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _open(name: str) -> Any:
    """The mirror as a DatasetDict or Dataset: a Hub id, a ``save_to_disk`` folder or local parquet."""
    import datasets

    local = Path(name).expanduser()
    try:
        if local.is_dir() and any(
            (local / marker).is_file() for marker in ("state.json", "dataset_dict.json")
        ):
            return datasets.load_from_disk(str(local))
        if local.is_file():
            builder = "parquet" if local.suffix == ".parquet" else None
            if builder is None:
                raise DataError(f"hf mirror {name!r} is a file but not a .parquet file")
            return datasets.load_dataset(builder, data_files=str(local))
        return datasets.load_dataset(str(local) if local.is_dir() else name)
    except DataError:
        raise
    except Exception as error:  # the datasets library raises many types (offline, missing repo, bad files)
        first = _first_line(error)[:200]
        if local.exists():
            raise DataError(f"cannot load the local dataset {name!r}: {first}") from None
        raise DataError(
            f"cannot load the Hub dataset {name!r} (no such local path either): {first}"
        ) from None


def _splits(opened: Any, split_column: str) -> dict[str, Any]:
    """Split name (the mirror's) -> Dataset."""
    import datasets

    if isinstance(opened, datasets.Dataset):
        if split_column not in opened.column_names:
            raise DataError(
                f"the hf mirror is a single table without a {split_column!r} column; map its split column "
                "with data.hf_columns.split"
            )
        return {"all": opened}
    return dict(opened)


def _slug(name: str) -> str:
    """A readable folder name for a mirror: its last path part (less .parquet), unsafe characters replaced."""
    last = Path(name.rstrip("/\\")).name or "mirror"
    last = last.removesuffix(".parquet")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip(".") or "mirror"


def _names(feature: Any, values: list[Any]) -> list[Any]:
    """ClassLabel integers -> their names; other values unchanged."""
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return [None if v is None or int(v) < 0 else feature.int2str(int(v)) for v in values]
    return values


def _label(value: Any, where: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _NORMAL_WORDS:
            return 0
        if word in _ANOMALOUS_WORDS:
            return 1
    raise DataError(f"{where}: label {value!r} is neither normal (0, good) nor anomalous (1, anomaly)")


def _check_image_column(table: Any, column: str, split: str) -> None:
    import datasets

    feature = table.features.get(column)
    if not isinstance(feature, datasets.Image):
        kind = "missing" if feature is None else f"a {type(feature).__name__}, not an Image feature"
        raise DataError(
            f"hf mirror split {split!r}: column {column!r} is {kind} "
            f"(columns: {', '.join(table.column_names)}; map yours with data.hf_columns)"
        )


def _metadata(table: Any, split: str, columns: Mapping[str, str]) -> dict[str, list[Any]]:
    """Our field -> its values for every row, for the mapped columns the table has; ``mask`` -> has a mask."""
    import datasets

    present = set(table.column_names)
    _check_image_column(table, columns["image"], split)
    if columns["label"] not in present and columns["defect_type"] not in present:
        raise DataError(
            f"hf mirror split {split!r} has neither a {columns['label']!r} nor a {columns['defect_type']!r} "
            "column; map one with data.hf_columns"
        )
    fields = [key for key in ("split", "category", "label", "defect_type") if columns[key] in present]
    values = table.select_columns([columns[key] for key in fields])[:] if fields else {}
    meta = {key: _names(table.features[columns[key]], list(values[columns[key]])) for key in fields}
    if columns["mask"] in present:  # which rows have a mask, without decoding any
        _check_image_column(table, columns["mask"], split)
        masks = table.select_columns([columns["mask"]])
        masks = masks.cast_column(columns["mask"], datasets.Image(decode=False))
        meta["mask"] = [value is not None for value in masks[columns["mask"]]]
    return meta


def _row(meta: dict[str, list[Any]], index: int, split: str, category: str, where: str) -> dict[str, Any]:
    """One row's split, category, label, defect type and mask flag, checked."""
    row_split = str(meta["split"][index] if "split" in meta else split).strip().lower()
    if row_split not in SPLITS:
        raise DataError(f"{where}: split {row_split!r} is none of {', '.join(SPLITS)}")
    defect = meta["defect_type"][index] if "defect_type" in meta else None
    if "label" not in meta and defect is None:
        raise DataError(f"{where}: no label and no defect type")
    label = _label(meta["label"][index], where) if "label" in meta else int(str(defect) != NORMAL)
    defect = str(defect) if defect is not None else (NORMAL if label == 0 else ANOMALY)
    if (defect == NORMAL) != (label == 0):
        raise DataError(f"{where}: label {label} disagrees with defect type {defect!r}")
    if label == 1 and row_split != "test":
        raise DataError(f"{where}: an anomalous {row_split} image; kka-synth trains on normal images only")
    return {
        "split": row_split,
        "category": str(meta["category"][index]) if "category" in meta else category,
        "label": label,
        "defect": defect,
        "mask": bool(meta["mask"][index]) if "mask" in meta else False,
    }


def _rows(name: str, table: Any, split: str, columns: Mapping[str, str]) -> list[dict[str, Any]]:
    """Every row of one split of the mirror, parsed from its metadata columns (no pixels read)."""
    meta = _metadata(table, split, columns)
    where = f"hf mirror {name!r} split {split!r} row"
    return [_row(meta, i, split, _slug(name), f"{where} {i}") for i in range(table.num_rows)]


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise DataError(f"cannot write {path}: {_first_line(error)}") from None


def _encoded(value: dict[str, Any], where: str) -> bytes:
    """The encoded bytes of an ``Image(decode=False)`` value (inline bytes, or the file it points to)."""
    if value.get("bytes"):
        return value["bytes"]
    path = value.get("path")
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    raise DataError(f"{where}: the image has neither bytes nor a readable file ({path!r})")


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{where}: cannot decode the image: {_first_line(error)}") from None


def _save_image(data: bytes, path: Path, where: str) -> None:
    """PNG bytes as they are; anything else decoded and written as PNG (RGB unless PNG holds its mode)."""
    if data.startswith(_PNG_SIGNATURE):
        _write_atomic(path, data)
        return
    image = _decode(data, where)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_atomic(path, buffer.getvalue())


def _save_mask(data: bytes, path: Path, where: str) -> None:
    """Any nonzero pixel (in any channel) is True; written as a 0/255 PNG."""
    image = _decode(data, where)
    if image.mode in ("PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode in ("1", "L", "I", "F", "I;16", "I;16L", "I;16B"):
        mask = np.asarray(image) != 0
    else:
        mask = np.any(np.asarray(image.convert("RGB")) != 0, axis=2)
    save_mask(path, mask)


def _materialise(
    table: Any, folder: Path, columns: Mapping[str, str], rows: list[dict[str, Any]], indices: list[int]
) -> None:
    """Write the PNG files of rows ``indices`` that are not there yet."""
    import datasets

    needed = [
        i
        for i in indices
        if not _image_path(folder, i).is_file() or (rows[i]["mask"] and not _mask_path(folder, i).is_file())
    ]
    if not needed:
        return
    folder.mkdir(parents=True, exist_ok=True)
    logger.info("hf mirror: writing %d images to %s", len(needed), folder)
    pixel_columns = [c for c in (columns["image"], columns["mask"]) if c in table.column_names]
    raw = table.select(needed).select_columns(pixel_columns)
    for column in pixel_columns:
        raw = raw.cast_column(column, datasets.Image(decode=False))
    for index, values in zip(needed, raw, strict=True):
        where = f"hf mirror row {index} of {folder.name}"
        _save_image(_encoded(values[columns["image"]], where), _image_path(folder, index), where)
        mask = values.get(columns["mask"])
        if rows[index]["mask"] and mask is not None:
            _save_mask(_encoded(mask, where), _mask_path(folder, index), where)


def _image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def _mask_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}_mask.png"


def _resolve_columns(columns: Mapping[str, str] | None) -> dict[str, str]:
    merged = {**HF_COLUMNS, **(columns or {})}
    unknown = sorted(set(merged) - set(HF_COLUMNS))
    if unknown:
        raise DataError(f"unknown hf column field {unknown[0]!r} (known: {', '.join(HF_COLUMNS)})")
    return merged


def _check_categories(known: Sequence[str], categories: Sequence[str] | None, name: str) -> list[str]:
    if not known:
        raise DataError(f"hf mirror {name!r} has no rows")
    if not categories:
        return list(known)
    unknown = [c for c in categories if c not in known]
    if unknown:
        raise DataError(f"unknown category {unknown[0]!r} in hf mirror {name!r} (known: {', '.join(known)})")
    return list(dict.fromkeys(categories))


def hf_mirror_categories(name: str, columns: Mapping[str, str] | None = None) -> list[str]:
    """Sorted category names of a mirror (reads its metadata columns, no pixels)."""
    columns = _resolve_columns(columns)
    splits = _splits(_open(name), columns["split"])
    return sorted(
        {row["category"] for split, table in splits.items() for row in _rows(name, table, split, columns)}
    )


def load_hf_mirror(
    name: str,
    root: str | Path | None = None,
    categories: Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Sample]:
    """Samples of a Hugging Face dataset mirror, its images written as PNG files under ``root``.

    Args:
        name: A Hub repository id, a ``save_to_disk`` folder, or a local parquet folder or file (without the
            ``hf:`` prefix of ``data.dataset``).
        root: Folder the PNG files go to (None: ``<kka-synth cache>/datasets/hf``).
        categories: Categories to keep; all when None or empty.
        columns: Our field -> the mirror's column (see the module docstring); missing keys keep the defaults.

    Returns:
        Samples in the order of the other loaders: category by category, train before validation before test,
        normal before anomalous, then by defect type and row.

    Raises:
        DataError: the mirror cannot be opened, lacks a mapped column, has an unknown split or label, an
            anomalous training row, or an unknown requested category.
    """
    columns = _resolve_columns(columns)
    base = Path(root).expanduser() if root is not None else cache_dir("datasets", "hf")
    splits = _splits(_open(name), columns["split"])
    tables = {split: (table, _rows(name, table, split, columns)) for split, table in splits.items()}
    known = sorted({row["category"] for _, rows in tables.values() for row in rows})
    chosen = _check_categories(known, categories, name)
    samples: list[Sample] = []
    for split, (table, rows) in tables.items():
        folder = base / _slug(name) / f"{_slug(split)}-{table._fingerprint}"
        keep = [i for i, row in enumerate(rows) if row["category"] in chosen]
        _materialise(table, folder, columns, rows, keep)
        for i in keep:
            row = rows[i]
            mask = _mask_path(folder, i) if row["mask"] else None
            image = _image_path(folder, i)
            samples.append(Sample(image, row["category"], row["split"], row["label"], row["defect"], mask))
    unmasked = sum(s.label == 1 and s.mask_path is None for s in samples)
    if unmasked:
        logger.debug("hf mirror %s: %d anomalous images have no mask", name, unmasked)
    rank = {split: i for i, split in enumerate(SPLITS)}
    order = {category: i for i, category in enumerate(chosen)}
    samples.sort(key=lambda s: (order[s.category], rank[s.split], s.label, s.defect_type, s.image_path.name))
    logger.debug("hf mirror %s: %d samples", name, len(samples))
    return samples

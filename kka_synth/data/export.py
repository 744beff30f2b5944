"""Export a run's synthetic anomalies with the dataset's normal images as an MVTec AD folder.

The folder is what anomalib's ``MVTecAD`` and ``Folder`` datamodules read, and what
``load_samples("mvtec_ad", out_dir)`` reads back (layout of Bergmann et al., "MVTec AD — A Comprehensive
Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019)::

    OUT/<category>/train/good/*                       the run's normal training images (copied as they are)
    OUT/<category>/test/good/*                        real normal test images, or a held-out share of train
    OUT/<category>/test/<defect_type>/NNN.png         the synthetic anomalies
    OUT/<category>/ground_truth/<defect_type>/NNN_mask.png   their masks, 0/255
    OUT/README.txt, OUT/export.json                   what is where, and each file's candidate id

``include="curated"`` takes the run's curated set (KKA's ``add`` or ``rep`` mode, as the loop wrote it);
``include="all"`` takes every candidate of every iteration that passed the filters, hard or easy.
``test/good`` holds the dataset's real normal test images when it has them. Otherwise every 5th training
normal (sorted by name) moves to ``test/good`` and is left out of ``train/good``; README.txt and
export.json say which per category. A candidate without a mask, or with an empty one, is skipped and
counted: an all-zero mask would claim the defect is nowhere. Synthetic images keep the loop's image size,
the normals their own; anomalib resizes both.

Category and defect-type names become folder names, so each must be a single plain path component: an
empty name, ``.``/``..``, a leading dot, a path separator or a control character raises
:class:`ExportError`. The folder is built beside ``out_dir`` and renamed into place, and ``out_dir`` must be
new or empty, so nothing outside it is touched and a failed export leaves nothing behind. Image and mask
paths read from the run's files must stay inside the run directory, or the export stops with one line.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kka_synth.config import HF_PREFIX
from kka_synth.data.images import DataError, image_size, load_mask, save_mask
from kka_synth.data.samples import load_samples
from kka_synth.data.tree import NORMAL, split_normals
from kka_synth.runs import (
    RunDir,
    RunError,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    read_candidates,
    read_jsonl,
    run_file,
)
from kka_synth.types import Sample

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("mvtec",)
INCLUDE = ("curated", "all")
MANIFEST = "export.json"
TEST_SPLIT = "the dataset's test split"
HELD_OUT = "held out from train/good (every 5th image by name)"


class ExportError(ValueError):
    """The run cannot be exported as asked; the message is one line naming the problem."""


@dataclass
class ExportResult:
    """What :func:`export_run` wrote."""

    out_dir: Path
    counts: dict[str, dict[str, int]]
    """Per category: images in ``train/good``, ``test/good`` and each ``test/<defect_type>``."""
    test_good: dict[str, str]
    """Per category: where ``test/good`` came from (the test split, or held out from train)."""
    anomalies: int
    skipped: dict[str, int] = field(default_factory=dict)
    """Candidates left out: ``no_mask`` and ``empty_mask``."""


def safe_name(name: Any, what: str) -> str:
    """``name`` when it is usable as one folder name, else an :class:`ExportError` naming ``what``."""
    if not isinstance(name, str) or not name.strip():
        raise ExportError(f"{what} {name!r} is not a usable folder name")
    if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\") or ":" in name:
        raise ExportError(
            f"{what} {name!r} is not a usable folder name (path separators, ':', '..' or a dot)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ExportError(f"{what} {name!r} contains a control character")
    return name


def _inside(path: Path, root: Path) -> Path:
    """``path`` after checking that it resolves to a place under ``root``."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise ExportError(f"refusing to write {path}: outside the export folder")
    return path


def _run_file(folder: Path, value: Any, source: str) -> Path:
    """:func:`~kka_synth.runs.run_file` with its error as a one-line ExportError."""
    try:
        return run_file(folder, value, source)
    except RunError as error:
        raise ExportError(str(error)) from None


_PROVENANCE = ("id", "iteration", "source_id", "label", "hardness", "text")
"""Candidate fields export.json keeps for every synthetic file."""


def _curated_rows(run: RunDir) -> list[dict[str, Any]]:
    """The curated set's rows, as the loop's ``curate`` indexed them (all hard)."""
    index = run.curated_dir / "index.jsonl"
    if not index.is_file():
        raise ExportError(
            f"run {run.path.name} has no curated set ({index.name} missing); finish the run first"
        )
    return [
        {
            **{key: r.get(key) for key in _PROVENANCE},
            "label": "hard",
            "category": r["category"],
            "defect_type": r["defect_type"],
            "image_file": _run_file(run.curated_dir, r["image"], "curated/index.jsonl"),
            "mask_file": (
                None
                if r.get("mask") is None
                else _run_file(run.curated_dir, r["mask"], "curated/index.jsonl")
            ),
        }
        for r in read_jsonl(index)
    ]


def _kept_rows(run: RunDir) -> list[dict[str, Any]]:
    """Every rendered candidate of every iteration that the filters kept (hard, easy or not yet scored)."""
    rows = []
    for k in range(1, run.config.iterations + 1):
        folder = run.iteration_dir(k)
        source = f"iterations/{k}/candidates.parquet"
        if not (folder / "candidates.parquet").is_file():
            continue
        for r in read_candidates(folder):
            if r["label"] == "rejected" or r["image"] is None or r["spec"] is None:
                continue
            rows.append(
                {
                    **{key: r.get(key) for key in _PROVENANCE},
                    "category": r["category"],
                    "defect_type": r["spec"]["defect_type"],
                    "image_file": _run_file(folder, r["image"], source),
                    "mask_file": None if r["mask"] is None else _run_file(folder, r["mask"], source),
                }
            )
    if not rows:
        raise ExportError(f"run {run.path.name} has no rendered candidates that passed the filters")
    return rows


def _candidates(run: RunDir, include: str) -> list[dict[str, Any]]:
    """The candidates to export, ordered by category, defect type, iteration and id."""
    rows = _curated_rows(run) if include == "curated" else _kept_rows(run)
    return sorted(rows, key=lambda r: (r["category"], r["defect_type"], r["iteration"] or 0, str(r["id"])))


def _run_categories(run: RunDir, rows: list[dict[str, Any]]) -> list[str]:
    prepared = run.manifest.get("stages", {}).get("prepare", {}).get("categories")
    names = set(prepared or run.config.data.categories or ()) | {r["category"] for r in rows}
    return sorted(safe_name(name, "category") for name in names)


def _source_samples(run: RunDir, categories: list[str]) -> list[Sample]:
    data = run.config.data
    columns = data.hf_columns if data.dataset.startswith(HF_PREFIX) else None
    try:
        return load_samples(data.dataset, data.root, categories, columns)
    except DataError as error:
        raise ExportError(f"cannot read the run's dataset {data.dataset!r}: {error}") from None


def _copy_normals(samples: list[Sample], folder: Path, root: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        target = _inside(folder / safe_name(Path(sample.image_path).name, "image file name"), root)
        if target.exists():
            raise ExportError(f"two normal images are named {target.name} in {folder.relative_to(root)}")
        shutil.copyfile(sample.image_path, target)
    return len(samples)


def _write_normals(tmp: Path, category: str, samples: list[Sample]) -> tuple[dict[str, int], str]:
    train = sorted(
        (s for s in samples if s.split == "train" and s.label == 0), key=lambda s: s.image_path.name
    )
    test = sorted((s for s in samples if s.split == "test" and s.label == 0), key=lambda s: s.image_path.name)
    if not train:
        raise ExportError(f"category {category!r} has no normal training images in the run's dataset")
    source = TEST_SPLIT
    if not test:
        _, held = split_normals([s.image_path for s in train])
        if not held:
            raise ExportError(
                f"category {category!r} has {len(train)} normal images, too few to hold out a test share"
            )
        held_set = set(held)
        test = [s for s in train if s.image_path in held_set]
        train = [s for s in train if s.image_path not in held_set]
        source = HELD_OUT
    base = tmp / category
    counts = {
        "train/good": _copy_normals(train, base / "train" / NORMAL, tmp),
        "test/good": _copy_normals(test, base / "test" / NORMAL, tmp),
    }
    return counts, source


def _write_anomalies(
    tmp: Path, rows: list[dict[str, Any]], counts: dict[str, dict[str, int]]
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Copy each candidate with a non-empty mask to test/ and ground_truth/; returns the file list."""
    files: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    usable: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        key = (safe_name(r["category"], "category"), safe_name(r["defect_type"], "defect type"))
        if r["mask_file"] is None:
            skipped["no_mask"] += 1
            continue
        mask = load_mask(r["mask_file"])  # (H, W) bool
        width, height = image_size(r["image_file"])
        if mask.shape != (height, width):
            raise ExportError(
                f"mask {r['mask_file']} is {mask.shape[1]}x{mask.shape[0]}, its image {width}x{height}"
            )
        if not mask.any():
            skipped["empty_mask"] += 1
            continue
        usable.setdefault(key, []).append(r)
    for (category, defect), items in usable.items():
        width = max(3, len(str(len(items) - 1)))
        for number, r in enumerate(items):
            stem = f"{number:0{width}d}"
            image = _inside(tmp / category / "test" / defect / f"{stem}.png", tmp)
            mask_path = _inside(tmp / category / "ground_truth" / defect / f"{stem}_mask.png", tmp)
            image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(r["image_file"], image)
            save_mask(mask_path, load_mask(r["mask_file"]))  # re-read: masks are not all held in memory
            files.append(
                {
                    "image": image.relative_to(tmp).as_posix(),
                    "mask": mask_path.relative_to(tmp).as_posix(),
                    **{key: r[key] for key in _PROVENANCE},
                }
            )
        counts[category][f"test/{defect}"] = len(items)
    return files, skipped


def export_run(
    run_dir: str | Path, out_dir: str | Path, format: str = "mvtec", include: str = "curated"
) -> ExportResult:
    """Write a run's synthetic anomalies and its dataset's normal images as an MVTec AD folder.

    Args:
        run_dir: A run directory (``runs/<name>``).
        out_dir: The folder to create; it must not exist or be empty.
        format: ``"mvtec"`` (the only layout so far).
        include: ``"curated"`` (the run's curated set) or ``"all"`` (every kept candidate of every iteration).

    Returns:
        An :class:`ExportResult` with per-category counts and the skipped candidates.

    Raises:
        ExportError: an unknown format or include, a non-empty ``out_dir``, a run without what ``include``
            asks for, an unusable category or defect-type name, or an unreadable source dataset.
    """
    if format not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {format!r} (known: {', '.join(EXPORT_FORMATS)})")
    if include not in INCLUDE:
        raise ExportError(f"include must be one of {', '.join(INCLUDE)}, got {include!r}")
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export folder {out} already exists and is not empty")
    try:
        run = RunDir.load(run_dir)
    except ValueError as error:
        raise ExportError(str(error)) from None
    rows = _candidates(run, include)
    categories = _run_categories(run, rows)
    samples = _source_samples(run, categories)
    counts: dict[str, dict[str, int]] = {}
    test_good: dict[str, str] = {}
    with atomic_dir(out) as tmp:
        for category in categories:
            counts[category], test_good[category] = _write_normals(
                tmp, category, [s for s in samples if s.category == category]
            )
        files, skipped = _write_anomalies(tmp, rows, counts)
        manifest = {
            "format": format,
            "include": include,
            "run": run.path.name,
            "dataset": run.config.data.dataset,
            "categories": counts,
            "test_good": test_good,
            "skipped": dict(skipped),
            "files": files,
        }
        atomic_write_json(tmp / MANIFEST, manifest)
        atomic_write_text(tmp / "README.txt", _readme(manifest))
    if skipped:
        logger.warning(
            "export: skipped %s", ", ".join(f"{n} candidates with {k}" for k, n in skipped.items())
        )
    logger.info("exported %d synthetic anomalies of run %s to %s", len(files), run.path.name, out)
    return ExportResult(out, counts, test_good, len(files), dict(skipped))


def _readme(manifest: dict[str, Any]) -> str:
    lines = [
        f"Synthetic anomalies of kka-synth run {manifest['run']} ({manifest['include']} candidates)",
        f"with the normal images of dataset {manifest['dataset']}, in MVTec AD layout",
        "(anomalib's MVTecAD and Folder datamodules read it).",
        "",
        "<category>/train/good             normal training images, copied from the dataset",
        "<category>/test/good              normal test images (see below where they come from)",
        "<category>/test/<defect>          SYNTHETIC anomalies made by kka-synth, not real defects",
        "<category>/ground_truth/<defect>  their masks, <stem>_mask.png, 0/255",
        "",
        "Per category:",
    ]
    for category, counts in manifest["categories"].items():
        parts = ", ".join(f"{key} {n}" for key, n in counts.items())
        lines.append(f"  {category}: {parts}; test/good from {manifest['test_good'][category]}")
    skipped = manifest["skipped"]
    if skipped:
        parts = ", ".join(f"{n} with {k.replace('_', ' ')}" for k, n in skipped.items())
        lines += ["", f"Skipped candidates (an all-zero mask would say the defect is nowhere): {parts}"]
    lines += [
        "",
        f"{MANIFEST} maps every synthetic file to its candidate id, iteration, source image, hardness",
        "and text. The copied normal images keep the licence of the source dataset.",
    ]
    return "\n".join(lines) + "\n"

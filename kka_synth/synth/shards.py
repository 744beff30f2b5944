"""The files a render stage leaves behind: each candidate's image and mask, and the render shards of a
multi-process run.

Under ``accelerate launch --num_processes N`` every process renders a contiguous share of an iteration's jobs
(see :mod:`kka_synth.synth.stage`), saves each render's image and mask under the candidate's id with
:func:`keep_render`, and writes what its renders filled into their records to
``<iteration>/shards/render-<rank>.jsonl`` with :func:`write_shard`. The main process then folds the shards
back into the records with :func:`merge_shards`, which checks that every job came back exactly once: a job's
seeds do not depend on its process, so the merged records equal those of a one-process render. Once the
iteration's candidates are written, :func:`remove_shards` deletes the shards; a run killed before that leaves
them behind, and the next render stage, with any number of processes, rewrites or removes them.

Records are the candidate rows of ``candidates.parquet`` (plain dicts); a kept render is
``(source, image, mask)``: the source's index among the category's normals, the RGB uint8 (H, W, 3) image
and the bool (H, W) mask or None.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.data import load_mask, load_rgb, save_mask, save_rgb
from kka_synth.runs import RunError, inside, read_jsonl, write_jsonl
from kka_synth.synth.stage import RenderResult

logger = logging.getLogger(__name__)

RENDERED = ("source_id", "renderer", "render_info", "reason", "image", "mask")
"""The fields of a candidate's record that its render fills in (what a render shard carries)."""

SHARDS = "shards"
"""The folder, inside an iteration's folder, that holds the render shards."""

Kept = tuple[int, np.ndarray, np.ndarray | None]
"""A kept render: (source index among the category's normals, image (H, W, 3) uint8, mask (H, W) bool)."""


def shard_path(folder: Path, rank: int) -> Path:
    """The render shard of process ``rank`` in iteration folder ``folder``."""
    return folder / SHARDS / f"render-{rank}.jsonl"


def keep_render(
    folder: Path, record: dict[str, Any], result: RenderResult, fit_ids: Sequence[str]
) -> Kept | None:
    """Fill ``record`` from a render result and save its image and mask under ``folder``.

    Args:
        folder: the iteration's folder; images go to ``images/<id>.png``, masks to ``masks/<id>.png``.
        record: the candidate's record (with ``id``), updated in place: ``render_info`` always; ``reason``
            when every renderer failed; else ``source_id``, ``renderer``, ``image`` and ``mask`` (None when
            the renderer could not tell where the defect is).
        result: the render of the record's job.
        fit_ids: ids of the job's category's normals, indexed like the job's ``source``.

    Returns:
        ``(source, image, mask)`` of the render, or None when nothing was rendered.
    """
    job = result.job
    record["render_info"] = {"tried": job.tried, "errors": job.errors}
    if result.output is None:
        record["reason"] = result.reason
        return None
    output = result.output
    source = job.source if output.source is None else output.source
    record["source_id"] = fit_ids[source]
    record["renderer"] = result.renderer
    record["render_info"].update(output.info)
    record["image"] = f"images/{record['id']}.png"
    save_rgb(folder / record["image"], output.image)
    if output.mask is not None:
        record["mask"] = f"masks/{record['id']}.png"
        save_mask(folder / record["mask"], output.mask)
    return source, output.image, output.mask


def write_shard(
    folder: Path,
    rank: int,
    results: Sequence[RenderResult],
    out: Sequence[dict[str, Any]],
    kept: dict[int, Kept],
) -> None:
    """Write process ``rank``'s render shard: per result, its job's key, the source index of its kept render
    (None when nothing was rendered) and the :data:`RENDERED` fields of its record in ``out``."""
    shard = [
        {"key": r.job.key, "source": kept[r.job.key][0] if r.job.key in kept else None}
        | {field: out[r.job.key][field] for field in RENDERED}
        for r in results
    ]
    write_jsonl(shard_path(folder, rank), shard)


def merge_shards(k: int, folder: Path, out: list[dict[str, Any]], size: int) -> dict[int, Kept]:
    """Fold the render shards of processes ``0 .. size - 1`` into ``out``; returns the kept renders by key.

    Shards of ranks ``size`` and above (left by a killed run with more processes) are not read.

    Args:
        k: the iteration (for the error message).
        folder: the iteration's folder.
        out: every candidate's record, indexed by job key; a record with a spec is a job.
        size: the number of processes that rendered.

    Returns:
        ``{key: (source, image, mask)}`` of every job that rendered, images and masks read back from disk.

    Raises:
        RunError: one line, when a shard is missing or the shards do not hold every job exactly once.
    """
    entries = []
    for rank in range(size):
        path = shard_path(folder, rank)
        if not path.is_file():
            raise RunError(f"iteration {k}: the render shard {path} is missing")
        entries += read_jsonl(path)
    counts = Counter(entry["key"] for entry in entries)
    expected = {i for i, record in enumerate(out) if record["spec"] is not None}
    missing, twice = expected - counts.keys(), [key for key, n in counts.items() if n > 1]
    unknown = counts.keys() - expected
    if missing or twice or unknown:
        raise RunError(
            f"iteration {k}: the render shards in {folder / SHARDS} do not add up: {len(missing)} job(s) "
            f"missing, {len(twice)} rendered more than once, {len(unknown)} unknown"
        )
    kept: dict[int, Kept] = {}
    for entry in sorted(entries, key=lambda e: e["key"]):
        record = out[entry["key"]]
        record.update({field: entry[field] for field in RENDERED})
        if record["image"] is not None:
            # a shard is a file of the run: its paths may not lead out of the iteration folder
            mask = None if record["mask"] is None else load_mask(inside(folder, record["mask"]))
            kept[entry["key"]] = (entry["source"], load_rgb(inside(folder, record["image"])), mask)
    return kept


def remove_shards(folder: Path) -> None:
    """Delete the iteration's render shards, if any (those of this render, or stale ones of a killed run)."""
    shards = folder / SHARDS
    if shards.exists():
        logger.debug("removing the render shards in %s", shards)
        shutil.rmtree(shards)


__all__ = [
    "RENDERED",
    "SHARDS",
    "Kept",
    "keep_render",
    "merge_shards",
    "remove_shards",
    "shard_path",
    "write_shard",
]

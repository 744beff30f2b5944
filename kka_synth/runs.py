"""The run directory: manifest, stage status, atomic writes, resume.

Layout (DESIGN.md)::

    runs/<name>/
      manifest.json            config, package versions, seeds, each stage's status and timings
      iterations/<k>/          proposals.jsonl, candidates.parquet, images/, masks/, pairs.jsonl, stats.json
      adapters/<k>/            the proposer's LoRA adapter after round k
      curated/                 the curated set in MVTec AD layout

Every file is written to a temporary name in the same folder and renamed into place, so a killed run leaves
either the old file or the new one, never half of one. A stage is marked done in the manifest only after
its outputs are written; ``resume`` skips stages marked done, redoes the one that was cut off, and first
removes the temporary files and folders a killed process left behind. A write that fails because the disk
is full, the quota is spent or the folder is read-only or not writable raises a one-line :class:`RunError`
("cannot write <path>: no space left on device") and leaves the previous file as it was, so the run can be
resumed once there is room.

Names that come from data (categories, defect types, candidate ids) become path components only through
:func:`safe_component`, and paths built from them are checked with :func:`inside`, so nothing a dataset or a
model writes can place a file outside the run directory.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.config import RunConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}
)
"""errno values of a failed write that say something about the disk or the folder, not about the program:
they become a one-line :class:`RunError` naming the path."""
_TEMP_FILE_SUFFIX = ".tmp"
_TEMP_DIR_MARKERS = (".partial-", ".old-")
_VERSIONED = ("kka-synth", "torch", "transformers", "trl", "peft", "numpy", "opencv-python-headless")


class RunError(ValueError):
    """The run directory cannot be used as asked (exists without --resume, missing on resume, ...)."""


def write_error(path: str | Path, error: OSError) -> RunError:
    """The one-line :class:`RunError` for a write of ``path`` that failed with ``error``:
    "cannot write <path>: no space left on device". Callers raise it for :data:`WRITE_ERRNOS` only."""
    reason = os.strerror(error.errno).lower() if error.errno else str(error).strip() or type(error).__name__
    return RunError(f"cannot write {path}: {reason}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    On a full disk, a spent quota or a read-only folder it raises :class:`RunError` (see
    :func:`write_error`); ``path`` then still holds what it held before, and no temporary file is left.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_FILE_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as error:
        if error.errno in WRITE_ERRNOS:
            raise write_error(path, error) from None
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; when the block succeeds the folder takes ``path``'s place.

    An existing ``path`` is renamed aside first and removed after the swap, so a kill leaves the old folder,
    the new one, or (between the two renames) none, never a half-written one; callers mark their stage done
    only after the block, so a resumed run writes the folder again. A full disk or read-only folder, in the
    swap or in a write inside the block, raises :class:`RunError` naming ``path``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TEMP_DIR_MARKERS[0]}", dir=path.parent))
    except OSError as error:
        if error.errno in WRITE_ERRNOS:
            raise write_error(path, error) from None
        raise
    try:
        yield tmp
        aside = None
        if path.exists():
            aside = tmp.with_name(tmp.name.replace(_TEMP_DIR_MARKERS[0], _TEMP_DIR_MARKERS[1], 1))
            os.replace(path, aside)
        os.replace(tmp, path)
        if aside is not None:
            _remove(aside)
    except OSError as error:
        if error.errno in WRITE_ERRNOS:
            raise write_error(path, error) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temps(root: Path) -> int:
    """Delete the temporary files (``*.tmp``) and folders (``.<name>.partial-*``, ``.<name>.old-*``) that
    killed writers left under ``root``; returns how many were removed. Symbolic links are not followed.

    Only for a run directory no other process is writing to (``RunDir.open`` calls it on resume).
    """
    removed = 0
    for folder, dirnames, filenames in os.walk(root):
        for name in filenames:
            if name.endswith(_TEMP_FILE_SUFFIX):
                _remove(Path(folder) / name)
                removed += 1
        for name in list(dirnames):
            if name.startswith(".") and any(marker in name for marker in _TEMP_DIR_MARKERS):
                _remove(Path(folder) / name)
                dirnames.remove(name)
                removed += 1
    return removed


def safe_component(name: str) -> str:
    """``name`` when it can be one path component inside a folder, else a one-line :class:`RunError`.

    Refused: empty names, ``.`` and ``..``, path separators (``/`` and ``\\``), NUL and other control
    characters, names that are not valid UTF-8 and names longer than 255 bytes. Nothing is repaired: a
    refused name stays refused, so two different names never map to one file.
    """
    if not isinstance(name, str):
        raise RunError(f"path component must be a string, got {type(name).__name__}")
    if name in ("", ".", ".."):
        raise RunError(f"{name!r} cannot be a file or folder name")
    if "/" in name or "\\" in name:
        raise RunError(f"{name!r} cannot be a file or folder name: it holds a path separator")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        raise RunError(f"{name!r} cannot be a file or folder name: it holds a control character")
    if len(name.encode("utf-8")) > 255:
        raise RunError(f"{name[:40]!r}... cannot be a file or folder name: it is longer than 255 bytes")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` (relative paths are taken under ``root``) resolved, after checking it stays inside ``root``.

    Symbolic links are followed, so a link that points out of ``root`` is refused too. Raises a one-line
    :class:`RunError` otherwise.
    """
    base = Path(root).resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):
        raise RunError(f"refusing to use {path}: it lies outside {root}")
    return target


def run_file(folder: Path, value: Any, source: str) -> Path:
    """``folder / value`` for a path ``value`` that the run's file ``source`` holds relative to ``folder``.

    A value that leads out of ``folder`` (``..``, an absolute path, a symbolic link; the file was edited by
    hand or tampered with) raises a one-line :class:`RunError` that names ``source``. The check holds whether
    ``folder`` is given as a relative or an absolute path.
    """
    try:
        inside(folder, Path(str(value)))
    except RunError as error:
        raise RunError(f"{source}: {error}") from None
    return Path(folder) / str(value)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, default=_json_default) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (plain dicts of scalars, lists and strings) as a parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_candidates(folder: Path) -> list[dict[str, Any]]:
    """An iteration's candidate rows, with ``spec``, ``verdicts`` and ``render_info`` decoded from JSON.

    ``mask`` is None for a kept candidate whose renderer could not say where the defect is (text-to-image);
    runs written before ``render_info`` existed read it as an empty dict.
    """
    rows = read_parquet(folder / "candidates.parquet")
    for r in rows:
        r["spec"] = None if r["spec"] is None else json.loads(r["spec"])
        r["verdicts"] = json.loads(r["verdicts"])
        r["render_info"] = json.loads(r.get("render_info") or "{}")
    return rows


def write_candidates(folder: Path, rows: list[dict[str, Any]]) -> None:
    """Write an iteration's candidate rows; ``spec``, ``verdicts`` and ``render_info`` go in as JSON."""
    table = [
        {
            **r,
            "spec": None if r["spec"] is None else json.dumps(r["spec"]),
            "verdicts": json.dumps(r["verdicts"]),
            "render_info": json.dumps(r.get("render_info") or {}),
        }
        for r in rows
    ]
    write_parquet(folder / "candidates.parquet", table)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("stages"), dict):
        raise RunError(f"cannot read {path}: not a kka-synth manifest (no stages)")
    return manifest


class RunDir:
    """One run's folder and its manifest."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, config: RunConfig, resume: bool = False) -> RunDir:
        """Create the run folder for ``config``, or reopen it with ``resume``.

        On resume the stored config is used; only ``iterations`` may be raised, to continue a finished run.
        """
        path = config.run_dir
        manifest_path = path / MANIFEST
        if resume:
            if not manifest_path.is_file():
                raise RunError(f"nothing to resume: {manifest_path} does not exist")
            manifest = _read_manifest(manifest_path)
            removed = remove_stale_temps(path)
            if removed:
                logger.info("resume: removed %d temporary files left by the interrupted run", removed)
            stored = RunConfig.from_dict(manifest["config"])
            if config.iterations > stored.iterations:
                stored.iterations = config.iterations
                manifest["config"] = stored.to_dict()
            run = cls(path, manifest)
            run.manifest.setdefault("resumed", []).append(time.strftime("%Y-%m-%dT%H:%M:%S"))
            run.save_manifest()
            return run
        if manifest_path.exists():
            raise RunError(
                f"run directory {path} already exists; pass --resume to continue it or pick another --name"
            )
        manifest = {
            "config": config.to_dict(),
            "versions": package_versions(),
            "seeds": {"run": config.seed},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "stages": {},
        }
        run = cls(path, manifest)
        run.save_manifest()
        return run

    @classmethod
    def load(cls, path: str | Path) -> RunDir:
        """Open an existing run directory as it is, to read it or add to it (the evaluation, the report)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise RunError(f"{path} is not a run directory (no {MANIFEST})")
        return cls(path, _read_manifest(manifest_path))

    @property
    def config(self) -> RunConfig:
        return RunConfig.from_dict(self.manifest["config"])

    def save_manifest(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    # stages ------------------------------------------------------------------------------------------
    def stage_done(self, key: str) -> bool:
        return self.manifest["stages"].get(key, {}).get("status") == "done"

    def mark_done(self, key: str, seconds: float, **info: Any) -> None:
        self.manifest["stages"][key] = {"status": "done", "seconds": round(seconds, 3), **info}
        self.save_manifest()

    def stage_seconds(self, prefix: str) -> dict[str, float]:
        """Seconds of each finished stage whose key starts with ``prefix``, keyed by the rest of the key."""
        return {
            key[len(prefix) :]: entry["seconds"]
            for key, entry in self.manifest["stages"].items()
            if key.startswith(prefix) and entry.get("status") == "done"
        }

    # paths -------------------------------------------------------------------------------------------
    def iteration_dir(self, k: int) -> Path:
        return self.path / "iterations" / str(k)

    def adapter_dir(self, k: int) -> Path:
        return self.path / "adapters" / str(k)

    @property
    def curated_dir(self) -> Path:
        return self.path / "curated"

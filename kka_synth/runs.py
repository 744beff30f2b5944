"""The run directory: manifest, stage status, atomic writes, resume.

Layout (DESIGN.md)::

    runs/<name>/
      manifest.json            config, package versions, seeds, each stage's status and timings
      iterations/<k>/          proposals.jsonl, candidates.parquet, images/, masks/, pairs.jsonl, stats.json
      adapters/<k>/            the proposer's LoRA adapter after round k
      curated/                 the curated set in MVTec AD layout

Every file is written to a temporary name in the same folder and renamed into place, so a killed run leaves
either the old file or the new one, never half of one. A stage is marked done in the manifest only after
its outputs are written; ``resume`` skips stages marked done and redoes the one that was cut off.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kka_synth.config import RunConfig

MANIFEST = "manifest.json"
_VERSIONED = ("kka-synth", "torch", "transformers", "trl", "peft", "numpy", "opencv-python-headless")


class RunError(ValueError):
    """The run directory cannot be used as asked (exists without --resume, missing on resume, ...)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
            manifest = json.loads(manifest_path.read_text())
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
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise RunError(f"cannot read {manifest_path}: {str(error).splitlines()[0]}") from None
        return cls(path, manifest)

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

"""The Python API: what every `kka-synth` subcommand does, as functions and one :class:`Run` object.

The CLI is a thin layer over these; a script can do the same without a shell::

    import kka_synth

    run = kka_synth.run({"dataset": "demo", "iterations": 3})        # or a RunConfig, or a YAML path
    print([s["hard_share"] for s in run.stats()])
    hard = run.candidates(label="hard")                                # rows of candidates.parquet
    table = kka_synth.evaluate(run, detectors=["draem"], variants=["rule", "kka"])
    kka_synth.publish(run, "me/washer-defects", dry_run="publish-preview")

Heavy modules (torch, transformers, datasets) load only when a function needs them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kka_synth.config import ConfigError, RunConfig, profile_defaults
from kka_synth.runs import RunDir, read_candidates, read_jsonl, run_file

Progress = Callable[[str, int, int], None]
"""``progress(task, done, total)``, as the CLI's progress bars receive it."""

_DATA_KEYS = ("dataset", "root", "categories", "image_size", "holdout")


def make_config(config: RunConfig | dict[str, Any] | str | Path | None = None, **fields: Any) -> RunConfig:
    """A :class:`RunConfig` from a config object, a dict of fields, or a YAML file, then ``fields``.

    As on the command line, the profile's defaults come first, then the given fields. ``dataset``, ``root``
    and ``categories`` may be given at the top level as shortcuts for ``data.*``.
    """
    if isinstance(config, RunConfig):
        return RunConfig.from_dict(_merge(config.to_dict(), _shortcuts(fields)))
    if isinstance(config, (str, Path)):
        import yaml

        RunConfig.from_yaml(config)  # one-line errors for a bad file
        data = yaml.safe_load(Path(config).read_text()) or {}  # its own fields only
    elif config is None or isinstance(config, dict):
        data = dict(config or {})
    else:
        raise ConfigError(f"config must be a RunConfig, a dict or a YAML path, got {type(config).__name__}")
    data = _merge(_shortcuts(data), _shortcuts(fields))
    if "name" not in data and not isinstance(config, (str, Path)):
        # a plain folder name: "hf:org/name" becomes "hf-org-name"
        data["name"] = re.sub(r"[^\w.-]+", "-", str(data.get("data", {}).get("dataset", "demo"))).strip("-.")
    return RunConfig.from_dict(_merge(profile_defaults(data.get("profile", "offline")), data))


def _shortcuts(data: dict[str, Any]) -> dict[str, Any]:
    """``dataset=``, ``root=``, ... moved under ``data``."""
    data = dict(data)
    moved = {key: data.pop(key) for key in _DATA_KEYS if key in data}
    if moved:
        data["data"] = {**data.get("data", {}), **moved}
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class Run:
    """A run directory: its config, per-iteration stats, candidates, curated set and report."""

    def __init__(self, path: str | Path) -> None:
        self._dir = RunDir.load(path)

    @property
    def path(self) -> Path:
        return self._dir.path

    @property
    def config(self) -> RunConfig:
        return self._dir.config

    @property
    def manifest(self) -> dict[str, Any]:
        return self._dir.manifest

    def iterations(self) -> list[int]:
        """The iterations whose stats are written, in order."""
        found = [int(p.parent.name) for p in (self.path / "iterations").glob("*/stats.json")]
        return sorted(found)

    def stats(self) -> list[dict[str, Any]]:
        """Each finished iteration's ``stats.json``: counts, hard share, diversity, DPO margin, seconds."""
        import json

        return [
            json.loads((self._dir.iteration_dir(k) / "stats.json").read_text()) for k in self.iterations()
        ]

    def candidates(self, iteration: int | None = None, label: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``candidates.parquet`` (every iteration, or one), optionally only one label.

        ``image`` and ``mask`` become the paths of the files (None when absent); ``label`` is hard, easy or
        rejected. A path that leads out of the run directory (a tampered file) raises a one-line
        :class:`~kka_synth.runs.RunError`.
        """
        rows = []
        for k in [iteration] if iteration is not None else self.iterations():
            folder = self._dir.iteration_dir(k)
            for row in read_candidates(folder):
                if label is not None and row["label"] != label:
                    continue
                rows.append(_with_paths(row, folder, f"iterations/{k}/candidates.parquet"))
        return rows

    def curated(self) -> list[dict[str, Any]]:
        """The curated hard set's index (``curated/index.jsonl``) with the paths of its images and masks.

        As in :meth:`candidates`, a path that leads out of the run directory raises a one-line RunError.
        """
        index = self._dir.curated_dir / "index.jsonl"
        if not index.is_file():
            return []
        curated = self._dir.curated_dir
        return [_with_paths(row, curated, "curated/index.jsonl") for row in read_jsonl(index)]

    def report(self) -> Path:
        """Write (or rewrite) ``report.html`` and return its path."""
        from kka_synth.eval.report import write_report

        return write_report(self.path)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.stats())

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, iterations={self.iterations()})"


def _with_paths(row: dict[str, Any], folder: Path, source: str) -> dict[str, Any]:
    """``row`` with its ``image`` and ``mask`` (relative to ``folder`` in the run file ``source``) as paths,
    each checked by :func:`~kka_synth.runs.run_file` to stay inside ``folder``."""
    for key in ("image", "mask"):
        value = row.get(key)
        row[key] = None if value is None else str(run_file(folder, value, source))
    return row


def run(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
    **fields: Any,
) -> Run:
    """Run (or with ``resume`` continue) the KKA loop and curate; returns the :class:`Run`.

    ``config`` and ``fields`` are read as :func:`make_config` reads them.
    """
    from kka_synth.loop import run_loop

    settings = make_config(config, **fields)
    run_loop(settings, resume=resume, progress=progress)
    return Run(settings.run_dir)


def open_run(path: str | Path) -> Run:
    """An existing run directory as a :class:`Run`."""
    return Run(path)


def _run_path(run: Run | str | Path) -> Path:
    return run.path if isinstance(run, Run) else Path(run)


def evaluate(
    run: Run | str | Path,
    *,
    detectors: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: int | None = None,
    image_size: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train detectors on each synthetic-set variant of ``run`` and test them on the real test split.

    Returns the summary also written to ``metrics.json`` (metrics per category, detector and variant, as mean
    and std over seeds). Arguments left None keep the run's ``eval`` settings.

    ``options`` has the shape of the config's ``eval.options``: detector name -> fields of that detector's
    config, e.g. ``{"draem": {"steps": 400}}``. Each detector's fields are laid over the run's own
    ``eval.options`` for it, and checked before anything is trained: an unknown detector or field, or a bad
    value, raises a one-line ConfigError naming ``eval.options.<detector>``. A result trained with other
    options is not reused.
    """
    from kka_synth.eval.protocol import evaluate_run

    overrides = {
        key: value
        for key, value in (
            ("detectors", detectors),
            ("variants", variants),
            ("seeds", seeds),
            ("image_size", image_size),
        )
        if value is not None
    }
    return evaluate_run(_run_path(run), overrides, progress=progress, options=options)


def publish(run: Run | str | Path, repo_id: str | None = None, **options: Any) -> Any:
    """Publish ``run`` as a Hugging Face dataset (see :func:`kka_synth.hub.publish` for the options)."""
    from kka_synth.hub import publish as publish_run

    return publish_run(_run_path(run), repo_id, **options)


def export(run: Run | str | Path, out_dir: str | Path, *, format: str = "mvtec", **options: Any) -> Any:
    """Write ``run`` in a layout other tools read (see :func:`kka_synth.data.export.export_run`)."""
    from kka_synth.data.export import export_run

    return export_run(_run_path(run), out_dir, format=format, **options)


__all__ = ["Progress", "Run", "evaluate", "export", "make_config", "open_run", "publish", "run"]

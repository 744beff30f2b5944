"""What the loop reads back from its own run files on resume.

A multi-process run killed mid-render leaves ``iterations/<k>/shards/``; resumed with one process, the render
stage must still remove it, and render exactly what a run that never had shards renders. Image and mask paths
read from ``candidates.parquet`` may not lead out of the iteration folder (a tampered file).

The run is driven through :class:`KKALoop` directly, with hand-written proposals marked done (no proposer to
pretrain) and the match band off (no calibration), so it takes a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_run import tiny_settings

from kka_synth.config import RunConfig
from kka_synth.loop import KKALoop, read_candidates
from kka_synth.runs import RunDir, RunError, write_candidates, write_jsonl
from kka_synth.synth.perlin import random_spec
from kka_synth.types import Proposal

TINY = tiny_settings(
    iterations=1,
    data={"categories": ["brick"]},
    filters={"match_band": False},
    alignment={"enabled": False},
)


def _proposed(tmp_path: Path, name: str) -> RunConfig:
    """A run directory with prepare and propose done: eight proposals, one that failed to parse."""
    config = RunConfig.from_dict({**TINY, "name": name, "out": str(tmp_path / "runs")})
    run = RunDir.open(config)
    loop = KKALoop(run)
    loop._load_categories()
    types = list(loop.categories["brick"].knowledge.defect_types)
    rng = np.random.default_rng(5)
    proposals = [
        Proposal(prompt="p", text=f"spec {i}", spec=random_spec("brick", types, rng)) for i in range(7)
    ]
    proposals.insert(3, Proposal(prompt="p", text="not a spec", error="not_json"))
    folder = run.iteration_dir(1)
    write_jsonl(folder / "proposals.jsonl", [{"category": "brick", **p.to_dict()} for p in proposals])
    run.mark_done("prepare", 0.0, categories=["brick"])
    run.mark_done("1/propose", 0.0, proposals=len(proposals))
    return config


def _render_resumed(config: RunConfig) -> Path:
    """Reopen the run with ``--resume`` in this one process and run its render stage; returns iteration 1."""
    loop = KKALoop(RunDir.open(config, resume=True))
    loop._load_categories()
    folder = loop.run.iteration_dir(1)
    info = loop._render(1, folder)
    assert info["rendered"] >= 2
    return folder


def test_single_process_resume_removes_stale_shards(tmp_path: Path):
    reference = _render_resumed(_proposed(tmp_path, "clean"))
    assert not (reference / "shards").exists()

    config = _proposed(tmp_path, "killed")
    folder = config.run_dir / "iterations" / "1"
    # what a killed two-process render leaves: both shards (one counting a job twice) and a first image
    write_jsonl(folder / "shards" / "render-0.jsonl", [{"key": 0, "stale": True}, {"key": 0, "stale": True}])
    write_jsonl(folder / "shards" / "render-1.jsonl", [{"key": 5, "stale": True}])
    first = sorted((reference / "images").iterdir())[0]
    (folder / "images").mkdir()
    (folder / "images" / first.name).write_bytes(b"half a png")

    resumed = _render_resumed(config)
    assert not (resumed / "shards").exists()
    # the same candidates and files as the run that never had shards, byte for byte
    assert read_candidates(resumed) == read_candidates(reference)
    assert (resumed / "candidates.parquet").read_bytes() == (reference / "candidates.parquet").read_bytes()
    files = sorted(p.relative_to(reference) for p in reference.rglob("*.png"))
    assert files and files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.png"))
    assert all((resumed / f).read_bytes() == (reference / f).read_bytes() for f in files)
    rows = read_candidates(resumed)
    assert [r["reason"] for r in rows].count("parse:not_json") == 1 and len(rows) == 8
    assert json.loads((config.run_dir / "manifest.json").read_text())["resumed"]


@pytest.mark.parametrize("field", ["image", "mask"])
def test_paths_leading_out_of_the_iteration_are_refused(tmp_path: Path, field: str):
    config = _proposed(tmp_path, "tampered")
    folder = _render_resumed(config)
    rows = read_candidates(folder)
    row = next(r for r in rows if r["image"] is not None and r["mask"] is not None)
    outside = tmp_path / "outside.png"
    outside.write_bytes((folder / row[field]).read_bytes())  # a readable file, so only the check can stop it
    row[field] = "../../../../outside.png"
    assert (folder / row[field]).resolve() == outside.resolve()
    row["label"] = "hard"
    write_candidates(folder, rows)

    loop = KKALoop(RunDir.open(config, resume=True))
    loop._load_categories()
    for stage in (lambda: loop._evaluate(1, folder), loop.curate):
        with pytest.raises(RunError, match="lies outside") as error:
            stage()
        assert "\n" not in str(error.value)
    assert not (config.run_dir / "curated").exists()  # nothing half-written

"""The Python API mirrors the CLI: run, Run.stats/candidates/curated, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kka_synth
from kka_synth.config import ConfigError

TINY = {
    "dataset": "demo",
    "iterations": 1,
    "proposals_per_iteration": 12,
    "data": {"image_size": 64},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
}


def test_make_config_follows_the_cli_order(tmp_path: Path) -> None:
    config = kka_synth.make_config({"profile": "hub", "proposer": {"model": "x"}}, iterations=2, root="data")
    assert config.proposer.backend == "transformers" and config.proposer.model == "x"  # profile, then dict
    assert config.iterations == 2 and config.data.root == "data" and config.name == "demo"
    path = tmp_path / "run.yaml"
    path.write_text("name: mine\ndata: {dataset: demo}\n")
    from_file = kka_synth.make_config(path, seed=3)
    assert from_file.name == "mine" and from_file.seed == 3 and from_file.proposer.backend == "compact"
    assert kka_synth.make_config(from_file, iterations=5).iterations == 5
    with pytest.raises(ConfigError, match="unknown config field"):
        kka_synth.make_config({"iteration": 2})
    with pytest.raises(ConfigError, match="config must be a RunConfig"):
        kka_synth.make_config(42)


def test_run_then_read_it_back(tmp_path: Path) -> None:
    run = kka_synth.run({**TINY, "out": str(tmp_path), "name": "api"})
    assert run.path == tmp_path / "api" and run.iterations() == [1]
    stats = run.stats()
    assert stats[0]["proposals"] == 24
    assert stats[0] == json.loads((tmp_path / "api" / "iterations" / "1" / "stats.json").read_text())
    rows = run.candidates()
    hard = run.candidates(label="hard")
    assert len(rows) == 24 and {r["label"] for r in hard} <= {"hard"} and len(hard) == stats[0]["hard"]
    assert all(Path(r["image"]).is_file() for r in hard)
    curated = run.curated()
    assert len(curated) == len(hard) and all(Path(r["image"]).is_file() for r in curated)
    assert run.report().is_file()
    assert kka_synth.open_run(run.path).iterations() == [1]
    again = kka_synth.run(run.config, resume=True)  # a finished run resumes to itself
    assert again.stats() == stats

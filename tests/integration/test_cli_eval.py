"""`kka-synth eval` end to end: a tiny demo run, then DRAEM on every variant, the tables and the report.

The DeepPCB test runs the same path on real PCB scans through the folder loader; it skips when the shared
data folder is not next to the project.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kka_synth.cli import main

TINY_RUN = {
    "iterations": 1,
    "proposals_per_iteration": 16,
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
    "eval": {
        "overlays": 2,
        "options": {"draem": {"recon_width": 4, "disc_width": 4, "steps": 6, "batch_size": 4}},
    },
}
DEEPPCB = Path(__file__).resolve().parents[3] / "shared" / "data" / "deeppcb"


def _finished_run(tmp_path: Path, name: str, data: dict) -> Path:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({**TINY_RUN, "name": name, "out": str(tmp_path / "runs"), "data": data}))
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    return tmp_path / "runs" / name


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _finished_run(tmp_path_factory.mktemp("eval"), "demo", {"dataset": "demo", "image_size": 64})


def test_eval_writes_metrics_tables_and_report(demo_run: Path, capsys: pytest.CaptureFixture):
    assert main(["eval", str(demo_run), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "brick: real test split" in printed and "two-stage" in printed
    summary = json.loads((demo_run / "metrics.json").read_text())
    assert summary["variants"] == ["none", "rule", "kka", "two-stage", "reverse"]
    assert summary["image_size"] == 64 and summary["seeds"] == [0]
    for category in ("brick", "washer"):
        variants = summary["categories"][category]["draem"]
        curated = (demo_run / "curated" / category).is_dir()
        expected = {"none", "rule"} | ({"kka", "two-stage", "reverse"} if curated else set())
        assert set(variants) == expected
        for entry in variants.values():
            for metric in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"):
                assert 0.0 <= entry["mean"][metric] <= 1.0
            assert entry["mean"]["spro"] is None and entry["n"] == 1
        model = demo_run / "eval" / category / "draem" / "rule" / "seed0" / "model"
        assert (model / "model.safetensors").is_file()
    assert "## brick" in (demo_run / "metrics.md").read_text()
    report = (demo_run / "report.html").read_text()
    assert "image AUROC" in report and "no evaluation yet" not in report


def test_eval_again_reuses_results_and_takes_flags(demo_run: Path):
    result = demo_run / "eval" / "brick" / "draem" / "rule" / "seed0" / "result.json"
    before = result.stat().st_mtime_ns
    assert main(["eval", str(demo_run), "--variants", "rule", "--seeds", "2", "--no-progress"]) == 0
    assert result.stat().st_mtime_ns == before
    summary = json.loads((demo_run / "metrics.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["variants"] == ["rule"]
    assert summary["categories"]["brick"]["draem"]["rule"]["n"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "best"], "unknown eval variant 'best'"),
        (["--detectors", "nope"], "unknown detector 'nope'"),
        (["--seeds", "0"], "eval.seeds must be in [1, 100]"),
    ],
)
def test_eval_bad_flags_are_one_line_errors(demo_run: Path, argv, message, capsys):
    assert main(["eval", str(demo_run), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_eval_of_a_missing_run_is_a_one_line_error(tmp_path: Path, capsys):
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not DEEPPCB.is_dir(), reason="the shared DeepPCB folder is not next to the project")
def test_eval_on_deeppcb_through_the_folder_loader(tmp_path: Path):
    run = _finished_run(tmp_path, "pcb", {"dataset": "folder", "root": str(DEEPPCB), "image_size": 64})
    assert main(["eval", str(run), "--variants", "none,rule,two-stage", "--no-progress"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    (category,) = summary["categories"]
    assert category == "deeppcb"
    result = json.loads((run / "eval" / category / "draem" / "rule" / "seed0" / "result.json").read_text())
    assert result["test_images"] == {"normal": 60, "anomalous": 60}
    assert 0.0 <= result["metrics"]["image_auroc"] <= 1.0
    assert 0.0 <= result["metrics"]["aupro"] <= 1.0

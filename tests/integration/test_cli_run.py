"""The CLI end to end on the built-in demo, with tiny settings so it runs in well under a minute."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tiny_run import tiny_settings

from kka_synth.cli import main
from kka_synth.loop import KKALoop, read_candidates

TINY = tiny_settings()


def _config(tmp_path: Path, name: str, **overrides) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name, "out": str(tmp_path / "runs"), **overrides}))
    return path


def _run(config: Path, *flags: str) -> int:
    return main(["run", "--config", str(config), "--no-progress", *flags])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("cli")
    assert _run(_config(tmp_path, "full")) == 0
    return tmp_path / "runs" / "full"


def test_run_leaves_a_complete_run_directory(finished_run: Path):
    manifest = json.loads((finished_run / "manifest.json").read_text())
    assert manifest["config"]["iterations"] == 2
    for k in (1, 2):
        folder = finished_run / "iterations" / str(k)
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["proposals"] == 12 * 2  # two demo categories
        assert 0 < stats["kept"] <= stats["proposals"]
        assert stats["hard"] + sum(stats["rejections"].values()) <= stats["proposals"]
        assert 0.0 <= stats["distinct_2"] <= 1.0 and stats["field_entropy"]["shape"] >= 0.0
        assert stats["median_hardness"] is not None and stats["seconds"]["evaluate"] > 0
        rows = read_candidates(folder)
        kept = [r for r in rows if r["label"] in ("hard", "easy")]
        assert kept and all(r["hardness"] is not None for r in kept)
        for r in kept[:5]:
            mask = np.asarray(Image.open(folder / r["mask"])) > 0
            image = np.asarray(Image.open(folder / r["image"]))
            assert mask.any() and image.shape[:2] == mask.shape and image.dtype == np.uint8
        assert all(r["reason"] for r in rows if r["label"] == "rejected")
        assert (finished_run / "adapters" / str(k) / "adapter_config.json").is_file()
    assert (finished_run / "curated" / "index.jsonl").is_file()


def test_adapters_name_the_compact_model_not_a_folder_of_this_machine(finished_run: Path):
    """PEFT records the base model's folder; the run keeps the compact model's stable name instead, so the
    run directory can move (the resume test below loads these adapters again)."""
    out, cache = str(finished_run.parent.parent), os.environ["KKA_SYNTH_CACHE"]
    for k in (1, 2):
        adapter = finished_run / "adapters" / str(k)
        settings = json.loads((adapter / "adapter_config.json").read_text())
        assert settings["base_model_name_or_path"].startswith("kka-synth/compact-proposer@")
        for name in ("adapter_config.json", "README.md"):
            text = (adapter / name).read_text()
            assert out not in text and cache not in text, name


def test_resume_after_a_kill_loses_nothing(
    tmp_path: Path, finished_run: Path, monkeypatch: pytest.MonkeyPatch
):
    config = _config(tmp_path, "killed")
    original = KKALoop._render
    calls = {"n": 0}

    def render_then_die(self, k, folder):
        calls["n"] += 1
        if k == 2:
            raise KeyboardInterrupt  # a kill in the middle of iteration 2
        return original(self, k, folder)

    monkeypatch.setattr(KKALoop, "_render", render_then_die)
    assert _run(config) == 130
    run = tmp_path / "runs" / "killed"
    first = (run / "iterations" / "1" / "candidates.parquet").read_bytes()
    monkeypatch.setattr(KKALoop, "_render", original)
    assert _run(config, "--resume") == 0
    assert (run / "iterations" / "1" / "candidates.parquet").read_bytes() == first
    for k in (1, 2):
        resumed = read_candidates(run / "iterations" / str(k))
        straight = read_candidates(finished_run / "iterations" / str(k))
        assert [r["text"] for r in resumed] == [r["text"] for r in straight]
        assert [r["label"] for r in resumed] == [r["label"] for r in straight]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path):
    cmd = [
        sys.executable,
        "-m",
        "kka_synth.cli",
        "run",
        "--dataset",
        "mvtec_ad",
        "--data-root",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("iterations: 0\n")
    assert main(["run", "--config", str(bad), "--no-progress"]) == 2


def test_help_teaches():
    result = subprocess.run(
        [sys.executable, "-m", "kka_synth.cli", "run", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "--resume" in result.stdout and "examples:" in result.stdout


@pytest.mark.parametrize("mode", ["add", "rep"])
def test_curation_modes(tmp_path: Path, finished_run: Path, mode: str):
    """add keeps every iteration's hard set, rep only the last one; the curated set is in MVTec AD layout."""
    import shutil

    from kka_synth.runs import RunDir, read_jsonl

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["config"]["mode"] = mode
    KKALoop(RunDir(run_dir, manifest)).curate()
    index = read_jsonl(run_dir / "curated" / "index.jsonl")
    hard = {
        k: [r["id"] for r in read_candidates(run_dir / "iterations" / str(k)) if r["label"] == "hard"]
        for k in (1, 2)
    }
    expected = hard[1] + hard[2] if mode == "add" else hard[2]
    assert sorted(row["id"] for row in index) == sorted(expected)
    for row in index:
        image = run_dir / "curated" / row["image"]
        assert image.parent.parent.name == "test" and image.is_file()
        assert (run_dir / "curated" / row["mask"]).is_file()


def test_category_flag_takes_several(tmp_path: Path):
    from kka_synth.cli import build_parser, config_from_args

    args = build_parser().parse_args(["run", "--category", "brick", "washer", "--out", str(tmp_path)])
    assert config_from_args(args).data.categories == ["brick", "washer"]


def test_a_saved_prompt_set_changes_the_specs(tmp_path: Path, finished_run: Path):
    """`run --prompts FILE`: the compact proposer obeys the set's constraints, and the run keeps a copy."""
    from collections import Counter

    from kka_synth.agents import Constraints, PromptSet
    from kka_synth.runs import read_jsonl

    before = read_jsonl(finished_run / "iterations" / "1" / "proposals.jsonl")
    common = Counter(r["spec"]["defect_type"] for r in before if r["spec"]).most_common(1)[0][0]
    assert common  # the unconstrained run proposes this type most often
    prompts = PromptSet(
        constraints={"*": Constraints(exclude_types=[common], size_max=0.02, notes=["keep them faint"])}
    ).save(tmp_path / "prompts.yaml")
    config = _config(tmp_path, "constrained", iterations=1)
    assert _run(config, "--prompts", str(prompts), "--no-dpo") == 0
    run = tmp_path / "runs" / "constrained"
    after = read_jsonl(run / "iterations" / "1" / "proposals.jsonl")
    specs = [r["spec"] for r in after if r["spec"]]
    assert specs and all(s["defect_type"] != common and s["size"] <= 0.02 for s in specs)
    assert PromptSet.load(run / "prompts.yaml") == PromptSet.load(prompts)
    assert json.loads((run / "manifest.json").read_text())["config"]["prompts"] == str(prompts)


def test_dpo_in_accelerate_workers(tmp_path: Path, finished_run: Path):
    """alignment.processes runs each DPO round under `accelerate launch` (one CPU worker here); the
    workers rebuild the model from the run directory and their adapters drive the next iteration."""
    config = _config(tmp_path, "launched", alignment={**TINY["alignment"], "processes": 1})
    assert _run(config) == 0
    run = tmp_path / "runs" / "launched"
    manifest = json.loads((run / "manifest.json").read_text())
    for k in (1, 2):
        align = manifest["stages"][f"{k}/align"]
        assert align["processes"] == 1 and align["steps"] >= 1
        assert align["margin_after"] > align["margin_before"]
        assert (run / "adapters" / str(k) / "adapter_model.safetensors").is_file()
    # same seeds and pairs as the in-process run: the first round trains on identical pairs
    inline = json.loads((finished_run / "manifest.json").read_text())["stages"]["1/align"]
    assert manifest["stages"]["1/align"]["pairs"] == inline["pairs"]
    assert manifest["stages"]["1/align"]["margin_before"] == pytest.approx(inline["margin_before"], abs=1e-3)

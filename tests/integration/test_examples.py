"""The scripts in examples/ run as a user runs them (a subprocess, tiny settings through
``KKA_SYNTH_EXAMPLE_TINY=1``), so they never fall behind the API. The hub example needs weights: its
``build_config`` is imported and checked instead."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kka_synth.agents import PromptSet

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/<name>`` in ``cwd`` with tiny settings and return its stdout; fail on a bad exit."""
    env = {
        **os.environ,  # KKA_SYNTH_CACHE: the test session's private cache
        "KKA_SYNTH_EXAMPLE_TINY": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(cwd / "hf-datasets"),
    }
    command = [sys.executable, str(EXAMPLES / name), *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


def test_demo_api_prints_the_curve_and_the_hardest_defects(tmp_path: Path) -> None:
    out = run_example("demo_api.py", cwd=tmp_path)
    curve = re.findall(r"^\s+(\d+)\s+[#.]{20}\s+(\d\.\d\d)\s+\|\s+[#.]{20}\s+(\d\.\d\d)$", out, re.MULTILINE)
    assert [int(k) for k, _, _ in curve] == [1, 2]  # two iterations in tiny mode
    stats = json.loads((tmp_path / "runs" / "demo-api" / "iterations" / "2" / "stats.json").read_text())
    assert curve[1][1:] == (f"{stats['hard_share']:.2f}", f"{stats['hard_share_judge']:.2f}")
    hardest = re.findall(r"^\s+([+-]\d\.\d{3})\s+washer/\w+\s+(\S+\.png)$", out, re.MULTILINE)
    assert [float(h) for h, _ in hardest] == sorted((float(h) for h, _ in hardest), reverse=True)
    assert hardest and all((tmp_path / path).is_file() for _, path in hardest)
    report = re.search(r"^report: (\S+)$", out, re.MULTILINE)
    assert report is not None and (tmp_path / report.group(1)).is_file()


def test_chat_session_saves_a_prompt_set_that_the_run_obeys(tmp_path: Path) -> None:
    out = run_example("chat_session.py", "--run", cwd=tmp_path)
    assert "washer: exclude_types += rust" in out and "washer: size_max += 0.02" in out
    previews = [line.strip() for line in out.splitlines() if line.strip().endswith("-overlay.png")]
    assert previews and all((tmp_path / path).is_file() for path in previews)
    prompts = tmp_path / "chat-example" / "prompts.yaml"
    assert f"kka-synth run --dataset demo --prompts {prompts.relative_to(tmp_path)}" in out
    saved = PromptSet.load(prompts).for_category("washer")
    assert saved.exclude_types == ["rust"] and saved.size_max == 0.02
    parsed = re.search(
        r"^(\d+) specs parsed: types (.*) \(no rust\), largest size ([\d.]+)%", out, re.MULTILINE
    )
    assert parsed is not None and int(parsed.group(1)) > 0
    assert "rust" not in parsed.group(2).split(", ") and float(parsed.group(3)) <= 2.0


def test_own_folder_runs_on_a_new_product(tmp_path: Path) -> None:
    out = run_example("own_folder.py", cwd=tmp_path)
    assert len(list((tmp_path / "runs" / "stand-in" / "gasket" / "train" / "good").glob("*.png"))) > 10
    assert "gasket:" in (tmp_path / "runs" / "gasket-knowledge.yaml").read_text()
    types = re.search(r"^\d+ specs parsed for gasket; defect types: (.+)$", out, re.MULTILINE)
    assert types is not None and set(types.group(1).split(", ")) <= {"tear", "bulge", "contamination"}
    manifest = json.loads((tmp_path / "runs" / "gasket" / "manifest.json").read_text())
    assert manifest["config"]["data"]["dataset"] == "folder"
    assert manifest["config"]["data"]["knowledge"].endswith("gasket-knowledge.yaml")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """evaluate_detectors.py without a run: it makes a tiny demo run first (shared with the publish test)."""
    cwd = tmp_path_factory.mktemp("evaluate")
    return cwd / "runs" / "demo-eval", run_example("evaluate_detectors.py", cwd=cwd)


def test_evaluate_detectors_prints_the_metrics_table(evaluated: tuple[Path, str]) -> None:
    run_dir, out = evaluated
    assert re.search(r"^category\s+detector\s+variant\s+image AUROC\s+pixel AUROC\s+AUPRO", out, re.MULTILINE)
    rows = re.findall(r"^washer\s+(\w+)\s+([\w-]+)((?:\s+(?:\d\.\d{3}|-)){5})$", out, re.MULTILINE)
    summary = json.loads((run_dir / "metrics.json").read_text())
    expected = {
        (detector, variant)
        for detector, variants in summary["categories"]["washer"].items()
        for variant in variants
    }
    assert {(d, v) for d, v, _ in rows} == expected and {d for d, _ in expected} == {"draem", "vfm", "aecsad"}
    for detector, variant, cells in rows:
        auroc = float(cells.split()[0])
        assert auroc == pytest.approx(
            summary["categories"]["washer"][detector][variant]["mean"]["image_auroc"], abs=5e-4
        )


def test_publish_run_dry_run_loads_back(evaluated: tuple[Path, str], tmp_path: Path) -> None:
    run_dir, _ = evaluated
    out = run_example("publish_run.py", str(run_dir), cwd=tmp_path)
    curated = [json.loads(line) for line in (run_dir / "curated" / "index.jsonl").read_text().splitlines()]
    assert f"rows per split: {{'washer': {len(curated)}}}" in out
    assert "loaded back: splits ['washer']" in out
    assert (tmp_path / "publish-preview" / "README.md").is_file()
    row_id = re.search(r"^\s+id\s+(\S+)$", out, re.MULTILINE)
    assert row_id is not None and row_id.group(1) in {entry["id"] for entry in curated}


def test_mvtec_hub_builds_a_valid_hub_config(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("mvtec_hub_example", EXAMPLES / "mvtec_hub.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.build_config(tmp_path / "mvtec", "bottle")
    assert config.profile == "hub" and config.name == "mvtec-bottle"
    assert (config.data.dataset, config.data.root, config.data.categories) == (
        "mvtec_ad",
        str(tmp_path / "mvtec"),
        ["bottle"],
    )
    assert config.proposer.backend == "transformers" and config.proposer.model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert config.render.renderers[0] == "inpaint"
    assert config.render.inpaint.model == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert (config.filters.matcher, config.filters.matcher_model) == (
        "lightglue",
        "ETH-CVG/lightglue_superpoint",
    )
    assert (config.evaluator.name, config.evaluator.model) == ("deepsad-dinov2", "facebook/dinov2-small")
    assert "q_proj" in config.alignment.lora["target_modules"]  # the hub profile's LoRA targets came through

"""`kka-synth publish` and `export` end to end: a tiny demo run published as a dry run and read back with
`load`, and exported to MVTec layout and read back by the project's own loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_run import tiny_settings

from kka_synth.cli import main
from kka_synth.data import load_rgb
from kka_synth.hub import load
from kka_synth.loop import read_candidates
from kka_synth.runs import read_jsonl

# publishing does not care how the proposer was steered: no DPO settings, alignment off
TINY = {**tiny_settings(), "alignment": {"enabled": False}}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("publish")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "name": "tiny", "out": str(tmp_path / "runs")}))
    assert main(["run", "--config", str(config), "--no-progress"]) == 0
    return tmp_path / "runs" / "tiny"


def test_publish_dry_run_of_the_curated_set(run_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_clisecret0123456789")
    out = tmp_path / "dry"
    code = main(
        ["publish", str(run_dir), "--repo-id", "someone/tiny", "--dry-run", str(out), "--license", "cc0-1.0"]
    )
    assert code == 0
    assert (out / "README.md").is_file() and (out / "assets" / "hard_share.png").is_file()
    assert sorted(p.name.split("-")[0] for p in (out / "data").glob("*.parquet")) == ["brick", "washer"]
    for path in [*out.rglob("*"), *run_dir.rglob("*")]:
        if path.is_file():
            assert b"hf_clisecret0123456789" not in path.read_bytes(), path
    index = read_jsonl(run_dir / "curated" / "index.jsonl")
    loaded = load(out, cache_dir=tmp_path / "cache")
    assert {name: ds.num_rows for name, ds in loaded.items()} == {
        name: sum(r["category"] == name for r in index) for name in ("brick", "washer")
    }
    first = loaded["brick"][0]
    entry = next(r for r in index if r["id"] == first["id"])
    assert np.array_equal(
        np.asarray(first["image"].convert("RGB")), load_rgb(run_dir / "curated" / entry["image"])
    )
    assert first["hard"] and first["label"] == 1


def test_publish_all_by_iteration(run_dir: Path, tmp_path: Path):
    out = tmp_path / "dry"
    flags = ["--dry-run", str(out), "--include", "all", "--split-by", "iteration"]
    assert main(["publish", str(run_dir), *flags]) == 0
    loaded = load(out, cache_dir=tmp_path / "cache")
    assert sorted(loaded) == ["iteration_1", "iteration_2"]
    for k in (1, 2):
        labels = {r["id"]: r["label"] for r in read_candidates(run_dir / "iterations" / str(k))}
        split = loaded[f"iteration_{k}"]
        assert sorted(split["id"]) == sorted(i for i, label in labels.items() if label in ("hard", "easy"))
        assert split["hard"] == [labels[i] == "hard" for i in split["id"]]  # easy renders are in too


def test_publish_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["publish", str(tmp_path / "missing"), "--dry-run", str(tmp_path / "dry")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("kka-synth: error:") and "not a run directory" in error and "\n" not in error


def test_export_to_mvtec_layout_reads_back(run_dir: Path, tmp_path: Path, capsys):
    from kka_synth.data import load_samples

    out = tmp_path / "mvtec"
    assert main(["export", str(run_dir), str(out)]) == 0
    assert "synthetic defects written to" in capsys.readouterr().out
    curated = read_jsonl(run_dir / "curated" / "index.jsonl")
    samples = load_samples("mvtec_ad", out)
    defects = [s for s in samples if s.split == "test" and s.label == 1]
    assert len(defects) == sum(r["mask"] is not None for r in curated) > 0
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in defects)
    assert {s.category for s in samples if s.split == "train"} == {"brick", "washer"}
    assert main(["export", str(run_dir), str(out)]) == 2  # not empty any more: one line, no overwrite
    assert capsys.readouterr().err.strip().startswith("kka-synth: error:")

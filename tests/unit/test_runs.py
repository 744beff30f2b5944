import json

import pytest

from kka_synth.config import RunConfig
from kka_synth.runs import RunDir, RunError, atomic_dir, atomic_write_json, read_parquet, write_parquet


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_json(tmp_path / "a" / "x.json", {"v": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 1}


def test_atomic_dir_keeps_old_folder_when_interrupted(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "old").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new").write_text("new")
        raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_parquet_round_trip(tmp_path):
    rows = [{"id": "a", "hardness": 0.5, "label": "hard"}, {"id": "b", "hardness": None, "label": "rejected"}]
    write_parquet(tmp_path / "c.parquet", rows)
    assert read_parquet(tmp_path / "c.parquet") == rows


def test_run_dir_refuses_to_overwrite_and_resumes(tmp_path):
    config = RunConfig(out=str(tmp_path), name="r", iterations=2)
    run = RunDir.open(config)
    run.mark_done("1/propose", 1.25, proposals=4)
    assert (tmp_path / "r" / "manifest.json").is_file()
    with pytest.raises(RunError, match="--resume"):
        RunDir.open(config)
    again = RunDir.open(RunConfig(out=str(tmp_path), name="r", iterations=3, seed=9), resume=True)
    assert again.stage_done("1/propose") and not again.stage_done("1/render")
    assert again.config.iterations == 3 and again.config.seed == 0
    assert "torch" in again.manifest["versions"]


def test_resume_without_a_run_is_an_error(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        RunDir.open(RunConfig(out=str(tmp_path), name="missing"), resume=True)

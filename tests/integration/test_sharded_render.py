"""`accelerate launch` of `kka-synth run` with two CPU processes (gloo): the render stage is split between
them, the main process merges the shards, and the run equals a one-process run with the same seeds."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_run import tiny_settings

from kka_synth.cli import main
from kka_synth.loop import read_candidates
from kka_synth.runs import RunError, write_jsonl
from kka_synth.synth.shards import merge_shards

# the tiny settings of test_cli_run.py (one category, so each run stays short), with DPO on: it trains in
# both processes, after the iteration's candidates are final
TINY = tiny_settings(iterations=1, proposals_per_iteration=16, data={"categories": ["brick"]})


def _config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**TINY, "name": name, "out": str(tmp_path / "runs")}))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
    """Two CPU processes on this machine: accelerate's multi-process launcher (torchrun) with no GPU
    visible, so every process joins the group over gloo. (``--cpu`` alone starts a single process.)"""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _run_two(config: Path, *flags: str) -> subprocess.CompletedProcess:
    return _launch("-m", "kka_synth.cli", "run", "--config", str(config), "--no-progress", *flags)


def _assert_same_iteration(run: Path, reference: Path, k: int = 1) -> None:
    """Same candidate rows (ids, specs, sources, renderers, verdicts, hardness, labels) and same files."""
    folder, expected = run / "iterations" / str(k), reference / "iterations" / str(k)
    rows = read_candidates(folder)
    assert rows == read_candidates(expected)
    assert len({r["id"] for r in rows}) == len(rows)
    assert sum(r["image"] is not None for r in rows) >= 2  # both shards had something to render
    files = sorted(p.relative_to(folder) for p in folder.rglob("*.png"))
    assert files == sorted(p.relative_to(expected) for p in expected.rglob("*.png"))
    assert files and all((folder / f).read_bytes() == (expected / f).read_bytes() for f in files)
    assert not (folder / "shards").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(one-process run, two-process run) of the same config."""
    tmp_path = tmp_path_factory.mktemp("sharded")
    assert main(["run", "--config", str(_config(tmp_path, "single")), "--no-progress"]) == 0
    _run_two(_config(tmp_path, "sharded"))
    return tmp_path / "runs" / "single", tmp_path / "runs" / "sharded"


def test_two_processes_render_what_one_does(runs: tuple[Path, Path]):
    single, sharded = runs
    _assert_same_iteration(sharded, single)
    stages = json.loads((sharded / "manifest.json").read_text())["stages"]
    assert all(stages[key]["status"] == "done" for key in ("prepare", "1/render", "1/stats", "curate"))
    assert (
        stages["1/render"]["rendered"]
        == json.loads((single / "manifest.json").read_text())["stages"]["1/render"]["rendered"]
    )
    # DPO ran in both processes: TRL split each batch, so a round takes fewer steps than alone
    align = stages["1/align"]
    assert align["processes"] == 2 and align["steps"] >= 1
    assert align["steps"] < json.loads((single / "manifest.json").read_text())["stages"]["1/align"]["steps"]
    assert (sharded / "adapters" / "1" / "adapter_model.safetensors").is_file()
    assert not [p for p in (sharded / "adapters").iterdir() if p.name.startswith(".")]  # no stray temp dirs
    assert (sharded / "curated" / "index.jsonl").is_file()


def test_resume_after_a_kill_mid_render(tmp_path: Path, runs: tuple[Path, Path]):
    """A two-process run killed while rendering: some images written, stale shard files (one from a run
    with more processes), nothing after propose marked done. Resumed with two processes it loses nothing."""
    single, sharded = runs
    run = tmp_path / "runs" / "sharded"
    shutil.copytree(sharded, run)
    folder = run / "iterations" / "1"
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in ("prepare", "1/propose")}
    manifest["config"]["alignment"]["enabled"] = False  # DPO in two processes is checked above; keep it short
    (run / "manifest.json").write_text(json.dumps(manifest))
    for name in ("candidates.parquet", "pairs.jsonl", "stats.json"):
        (folder / name).unlink()
    shutil.rmtree(run / "adapters")
    shutil.rmtree(run / "curated")
    for image in sorted((folder / "images").iterdir())[::2]:
        image.unlink()
    write_jsonl(folder / "shards" / "render-0.jsonl", [{"key": 0, "stale": True}, {"key": 0, "stale": True}])
    write_jsonl(folder / "shards" / "render-3.jsonl", [{"key": 1, "stale": True}])
    _run_two(_config(tmp_path, "sharded"), "--resume")
    _assert_same_iteration(run, single)
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert stages["1/render"]["status"] == "done" and stages["curate"]["status"] == "done"
    assert (folder / "pairs.jsonl").is_file() and not (run / "adapters").exists()


def test_shards_that_do_not_add_up_are_one_line_error(tmp_path: Path, runs: tuple[Path, Path]):
    single, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(single, run)
    folder = run / "iterations" / "1"
    out = read_candidates(folder)
    jobs = [i for i, r in enumerate(out) if r["spec"] is not None]
    assert len(jobs) >= 3
    entry = {"source": 0, "source_id": "x", "renderer": "", "render_info": {}, "reason": "render:none"}
    entry |= {"image": None, "mask": None}
    write_jsonl(folder / "shards" / "render-0.jsonl", [{"key": key, **entry} for key in jobs[:2]])
    write_jsonl(folder / "shards" / "render-1.jsonl", [{"key": key, **entry} for key in jobs[1:-1]])
    with pytest.raises(RunError, match="1 job\\(s\\) missing, 1 rendered more than once") as error:
        merge_shards(1, folder, out, 2)
    assert "\n" not in str(error.value)


# each process writes its own report file: two processes printing to one pipe can interleave their lines
SCRIPT = """
import json
import sys
from pathlib import Path
from kka_synth.utils import dist

world = dist.world()
report = {"rank": world.rank, "size": world.size, "main": world.is_main}
report["part"] = dist.shard(list(range(7)))
report["broadcast"] = dist.broadcast(f"from {world.rank}")
report["on_main"] = dist.on_main(lambda: world.rank)
try:
    with dist.together():
        if world.rank == 1:
            raise ValueError("boom in one process")
except Exception as error:
    report["error"] = [type(error).__name__, str(error)]
Path(sys.argv[1], f"report-{world.rank}.json").write_text(json.dumps(report))
"""


def test_helpers_under_two_processes(tmp_path: Path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    _launch(str(script), str(tmp_path))
    files = sorted(tmp_path.glob("report-*.json"))
    reports = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    assert [(r["rank"], r["size"], r["main"]) for r in reports] == [(0, 2, True), (1, 2, False)]
    assert [r["part"] for r in reports] == [[0, 1, 2, 3], [4, 5, 6]]  # in order, each item once
    assert [r["broadcast"] for r in reports] == ["from 0", "from 0"]
    assert [r["on_main"] for r in reports] == [0, None]
    # the failing process raises its own error; the other one learns of it instead of waiting forever
    assert reports[1]["error"] == ["ValueError", "boom in one process"]
    assert reports[0]["error"] == ["RunError", "stopped because process 1 failed: boom in one process"]


def test_alone_no_process_group_and_no_accelerate_import():
    code = (
        "import sys\n"
        "from kka_synth.utils import dist\n"
        "assert dist.world() == (0, 1, True) and not dist.launched()\n"
        "assert dist.shard(['c', 'a', 'b']) == ['c', 'a', 'b'] and dist.broadcast(5) == 5\n"
        "assert dist.on_main(lambda x: x + 1, 1) == 2\n"
        "with dist.together():\n"
        "    pass\n"
        "dist.barrier()\n"
        "print('accelerate' in sys.modules, 'torch.distributed' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]

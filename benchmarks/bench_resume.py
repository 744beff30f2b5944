"""Seconds from `kka-synth run --resume` to the first new work item, and where they go.

The demo runs with tiny settings in a fresh process and is SIGKILLed at a chosen stage (by watching the
manifest). Then `--resume` is started again several times on copies of that run directory. Each resumed
process runs the CLI under a small wrapper that timestamps the loop's steps and exits the moment the first
stage method that does new work is called, so the figure is pure restart cost:

    start        interpreter start, from the parent's spawn to the wrapper's first line
    imports      kka_synth.cli and kka_synth.loop with torch, transformers, trl and the rest
    open         the CLI's argument and config handling, RunDir.open (manifest, stale temporaries)
    normals      reloading and resizing the normal images
    proposer     building the proposer (from its cache) and re-applying finished adapters
    judges       reloading the fixed judges
    renderers    building the renderers
    prepare      the rest of prepare (prompt set, calibration reload, manifest)
    to work      from the end of prepare to the first new stage method

    python benchmarks/bench_resume.py                      # kill after iteration 1's evaluate, 3 resumes
    python benchmarks/bench_resume.py --kill-after 1/render --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY = {
    "iterations": 2,
    "proposals_per_iteration": 12,
    "data": {"dataset": "demo", "image_size": 64},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {
        "pairs_per_prompt": 4,
        "max_pairs": 16,
        "dpo": {"num_train_epochs": 1, "per_device_train_batch_size": 4},
    },
}
WORK = ("_propose", "_render", "_evaluate", "_align", "_write_stats", "curate")
"""Loop methods that do new work; the first one called ends the measurement."""
TIMED = ("prepare", "_load_categories", "_prepare_judges", "_renderers")
STEPS = ("start", "imports", "open", "normals", "proposer", "judges", "renderers", "prepare", "to work")


# ------------------------------------------------------------------------------------------------ child
def child(marks_path: str, argv: list[str]) -> None:
    """Run the CLI with timestamps; called in the resumed process through ``--child``."""
    marks: dict[str, float] = {"child": time.time()}
    import kka_synth.cli as cli
    import kka_synth.loop as loop

    marks["imports"] = time.time()
    spent: dict[str, float] = {}

    def timed(owner: object, name: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            started = time.time()
            marks.setdefault(f"{name}:start", started)
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.time() - started
                marks[f"{name}:end"] = time.time()

        setattr(owner, name, wrapper)

    def stop_at_work(name: str) -> None:
        original = getattr(loop.KKALoop, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            marks["work"] = time.time()
            Path(marks_path).write_text(json.dumps({"marks": marks, "spent": spent, "work": name}))
            os._exit(0)

        setattr(loop.KKALoop, name, wrapper)

    for name in TIMED:
        timed(loop.KKALoop, name)
    timed(loop, "build_proposer")
    original_apply = None

    def build_then_time_adapters(*args, **kwargs):
        proposer = built(*args, **kwargs)
        nonlocal original_apply
        original_apply = proposer.apply_adapter

        def apply_adapter(path):
            started = time.time()
            try:
                return original_apply(path)
            finally:
                spent["apply_adapter"] = spent.get("apply_adapter", 0.0) + time.time() - started

        proposer.apply_adapter = apply_adapter
        return proposer

    built = loop.build_proposer
    loop.build_proposer = build_then_time_adapters
    for name in WORK:
        stop_at_work(name)
    cli.main(argv)
    Path(marks_path).write_text(json.dumps({"marks": marks, "spent": spent, "work": None}))


# ----------------------------------------------------------------------------------------------- parent
def stages(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}


def run_and_kill(config: Path, run: Path, stage: str) -> float:
    """Run the demo fresh and SIGKILL it as soon as ``stage`` is marked done; returns the seconds it ran."""
    command = [sys.executable, "-m", "kka_synth.cli", "run", "--config", str(config), "--no-progress"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        if stage in stages(run):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return time.perf_counter() - started
        time.sleep(0.005)
    raise SystemExit(f"the run ended before {stage} was done:\n{process.stderr.read().decode()[-2000:]}")


def resume_once(config: Path, marks_path: Path) -> dict[str, float]:
    argv = ["run", "--config", str(config), "--no-progress", "--resume"]
    spawned = time.time()
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(marks_path), "--", *argv],
        env=env(),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not marks_path.is_file():
        raise SystemExit(f"resume failed ({result.returncode}):\n{result.stderr[-3000:]}")
    data = json.loads(marks_path.read_text())
    marks, spent = data["marks"], data["spent"]
    if data["work"] is None:
        raise SystemExit("the resumed run found no new work (was it already finished?)")
    prepare = spent.get("prepare", 0.0)
    proposer = spent.get("build_proposer", 0.0) + spent.get("apply_adapter", 0.0)
    parts = {
        "start": marks["child"] - spawned,
        "imports": marks["imports"] - marks["child"],
        "open": marks["prepare:start"] - marks["imports"],
        "normals": spent.get("_load_categories", 0.0),
        "proposer": proposer,
        "judges": spent.get("_prepare_judges", 0.0),
        "renderers": spent.get("_renderers", 0.0),
    }
    parts["prepare"] = prepare - sum(parts[k] for k in ("normals", "proposer", "judges", "renderers"))
    parts["to work"] = marks["work"] - marks["prepare:end"]
    parts["total"] = marks["work"] - spawned
    parts["first work"] = data["work"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kill-after", default="1/evaluate", help="Stage whose done mark triggers the kill.")
    parser.add_argument("--repeats", type=int, default=3, help="Resumed processes to time.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder.")
    args = parser.parse_args()
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="bench-resume-"))
    try:
        config_data = {**TINY, "name": "killed", "out": str(tmp / "runs")}
        config = tmp / "tiny.yaml"
        config.write_text(yaml.safe_dump(config_data))
        run = tmp / "runs" / "killed"
        ran = run_and_kill(config, run, args.kill_after)
        print(f"fresh run killed after {args.kill_after} was marked done, {ran:.1f} s in")
        pristine = tmp / "pristine"
        shutil.copytree(run, pristine)
        rows = []
        for i in range(args.repeats):
            shutil.rmtree(run)
            shutil.copytree(pristine, run)
            rows.append(resume_once(config, tmp / f"marks-{i}.json"))
        print(f"first new work item on resume: {rows[0]['first work']} ({args.repeats} resumes)")
        print(f"{'step':<12}" + "".join(f"{f'run {i + 1}':>9}" for i in range(len(rows))) + f"{'median':>9}")
        for step in (*STEPS, "total"):
            values = [row[step] for row in rows]
            cells = "".join(f"{v:9.2f}" for v in values)
            print(f"{step:<12}{cells}{statistics.median(values):9.2f}")
        threads = env()["OMP_NUM_THREADS"]
        print(f"OMP_NUM_THREADS={threads}, python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[sys.argv.index("--") + 1 :])
    else:
        main()

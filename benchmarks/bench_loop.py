"""The offline loop's targets: `kka-synth run --dataset demo --iterations 3` on this machine.

For each seed it runs the CLI in a fresh process (so the proposer's first-use pretraining and the demo build
count when the cache is cold) and prints wall time, peak resident memory, and per iteration the hard share
under the refit evaluator and under the fixed judge, distinct-2, distinct specs and field entropy. With
--control it also runs the no-DPO control for each seed, to show what DPO adds.

An iteration's hard share rests on about 100 kept candidates, so it moves by several points with sampling
alone. --judge-samples N therefore also measures each proposer state of a run (the base model, then after
each adapter) on N fresh proposals per category, rendered, filtered and scored by the run's fixed judge.

    python benchmarks/bench_loop.py --seeds 0 1 2 --control
    python benchmarks/bench_loop.py --cold --seeds 0     # first use: demo build and proposer pretraining
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(seed: int, out: Path, extra: list[str]) -> dict:
    name = f"seed{seed}" + ("-nodpo" if "--no-dpo" in extra else "")
    argv = [
        "run",
        "--dataset",
        "demo",
        "--iterations",
        "3",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--name",
        name,
        "--no-progress",
        *extra,
    ]
    rss_file = out / f"{name}.rss"
    # The child reports its own peak RSS, so each run's figure is its own (RUSAGE_CHILDREN keeps a maximum).
    code = (
        "import resource, sys; from kka_synth.cli import main; code = main(sys.argv[1:]); "
        f"open({str(rss_file)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)); "
        "sys.exit(code)"
    )
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    stats = [json.loads((out / name / "iterations" / str(k) / "stats.json").read_text()) for k in (1, 2, 3)]
    return {"name": name, "wall_s": wall, "peak_rss_mb": int(rss_file.read_text()) / 1024, "stats": stats}


def judge_curve(run_dir: Path, samples: int, seed: int = 12345) -> list[float]:
    """Hard share under the fixed judge of ``samples`` fresh proposals per category, per proposer state."""
    import numpy as np

    from kka_synth.agents import ProposalContext, build_proposer
    from kka_synth.loop import KKALoop
    from kka_synth.runs import RunDir
    from kka_synth.synth import RENDERERS, RenderError, apply_filters, build_filters
    from kka_synth.types import Candidate

    loop = KKALoop(RunDir(run_dir, json.loads((run_dir / "manifest.json").read_text())))
    loop.prepare()
    config = loop.config
    # the base model, before any adapter
    proposer = build_proposer(config.proposer, seed=config.seed, knowledge_file=config.data.knowledge)
    renderer = RENDERERS[config.render.renderers[0]]()
    shares = []
    for k in range(config.iterations + 1):
        if k > 0 and (loop.run.adapter_dir(k) / "adapter_config.json").is_file():
            proposer.apply_adapter(loop.run.adapter_dir(k))
        hard = kept = 0
        for index, (name, data) in enumerate(loop.categories.items()):
            rng = np.random.default_rng([seed, index])
            context = ProposalContext(category=name, knowledge=data.knowledge)
            filters = build_filters(config.filters, band=data.band)
            images = []
            for i, proposal in enumerate(proposer.propose(context, samples, seed=seed + index)):
                if proposal.spec is None:
                    continue
                source = data.fit[int(rng.integers(len(data.fit)))]
                try:
                    image, mask = renderer.render(source, proposal.spec, rng)
                except RenderError:
                    continue
                candidate = Candidate(str(i), k, proposal, "", image, mask, renderer.name)
                if all(v.ok for v in apply_filters(filters, source, candidate).values()):
                    images.append(image)
            if images:
                result = data.judge.hardness(images)
                hard += int(np.sum(result.hard))
                kept += len(images)
        shares.append(hard / kept if kept else float("nan"))
    return shares


def show(result: dict) -> None:
    print(f"\n{result['name']}: wall {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    print(
        "  iter  kept  hard_share  judge_share  mean_hard  distinct2  specs  H(shape) H(tone) H(sev)  seconds"
    )
    for s in result["stats"]:
        e = s["field_entropy"]
        print(
            f"  {s['iteration']:>4}  {s['kept']:>4}  {s['hard_share']:>10.3f}  {s['hard_share_judge']:>11.3f}"
            f"  {s['mean_hardness']:>9.3f}  {s['distinct_2']:>9.3f}  {s['distinct_specs']:>5}"
            f"  {e['shape']:>8.2f} {e['tone']:>7.2f} {e['severity']:>6.2f}"
            f"  {sum(s['seconds'].values()):>7.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--control", action="store_true", help="Also run the no-DPO control per seed.")
    parser.add_argument("--control-only", action="store_true", help="Run only the no-DPO control per seed.")
    parser.add_argument("--cold", action="store_true", help="Use an empty cache (count first-use builds).")
    parser.add_argument(
        "--judge-samples",
        type=int,
        default=0,
        metavar="N",
        help="Also measure every proposer state on N fresh proposals per category.",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs"
        if args.cold:
            os.environ["KKA_SYNTH_CACHE"] = str(Path(tmp) / "cache")
        print(f"cores: {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        results = []
        for seed in args.seeds:
            if not args.control_only:
                results.append(one(seed, out, []))
                show(results[-1])
                if args.judge_samples:
                    curve = judge_curve(out / results[-1]["name"], args.judge_samples)
                    results[-1]["curve"] = curve
                    print(
                        "  fixed judge on fresh proposals, base model then after each adapter: "
                        + " -> ".join(f"{v:.3f}" for v in curve)
                    )
            if args.control or args.control_only:
                results.append(one(seed, out, ["--no-dpo"]))
                show(results[-1])
        print("\nsummary (hard share iteration 1 -> 3, refit evaluator | fixed judge):")
        for r in results:
            s = r["stats"]
            print(
                f"  {r['name']:<12} {s[0]['hard_share']:.3f} -> {s[2]['hard_share']:.3f} | "
                f"{s[0]['hard_share_judge']:.3f} -> {s[2]['hard_share_judge']:.3f}   wall {r['wall_s']:.0f} s"
            )


if __name__ == "__main__":
    main()

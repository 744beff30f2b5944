"""Detector quality per synthetic-set variant on a real dataset, with training time and the seeds' spread.

Runs the KKA loop on a dataset (unless ``--run-dir`` names a finished run), then the evaluation protocol
(``kka-synth eval``) for the chosen variants and seeds, and prints image and pixel AUROC, AUPRO and training
seconds per variant as mean ± std over seeds, plus each seed's values and whether two-stage beats rule-only.

On the DeepPCB subset in MVTec AD layout::

    OMP_NUM_THREADS=2 python benchmarks/bench_eval.py --dataset folder --data-root PATH/TO/deeppcb \\
        --image-size 256 --seeds 3 --variants rule,two-stage
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import torch

from kka_synth.config import RunConfig
from kka_synth.eval.protocol import evaluate_run
from kka_synth.loop import run_loop

KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, help="A finished run to evaluate (skips the loop).")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--data-root")
    parser.add_argument("--image-size", type=int, default=128, help="Loop and detector image side.")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs-bench"))
    parser.add_argument("--name", default=None)
    parser.add_argument("--variants", default="rule,two-stage")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="Override the detector's training steps.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    run_dir = args.run_dir
    if run_dir is None:
        name = args.name or f"bench-{args.dataset}-{args.image_size}"
        config = RunConfig.from_dict(
            {
                "name": name,
                "out": str(args.out),
                "iterations": args.iterations,
                "data": {"dataset": args.dataset, "root": args.data_root, "image_size": args.image_size},
            }
        )
        run_dir = config.run_dir
        if not (run_dir / "curated" / "index.jsonl").is_file():
            started = time.perf_counter()
            run_loop(config, resume=(run_dir / "manifest.json").is_file())
            print(f"loop: {time.perf_counter() - started:.0f} s")

    overrides: dict = {"variants": args.variants.split(","), "seeds": args.seeds}
    if args.steps:
        overrides["options"] = {"draem": {"steps": args.steps}}
    started = time.perf_counter()
    summary = evaluate_run(run_dir, overrides)
    print(f"evaluation: {time.perf_counter() - started:.0f} s, torch threads {torch.get_num_threads()}")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

    for category, detectors in summary["categories"].items():
        for detector, variants in detectors.items():
            print(f"\n{category} / {detector} ({len(summary['seeds'])} seeds, {summary['image_size']} px)")
            print(f"{'variant':<10}" + "".join(f"{k:>22}" for k in (*KEYS, "train_s")))
            per_seed = {}
            for variant, entry in variants.items():
                cells = [
                    "-" if entry["mean"][k] is None else f"{entry['mean'][k]:.3f} ± {entry['std'][k]:.3f}"
                    for k in KEYS
                ]
                print(
                    f"{variant:<10}" + "".join(f"{c:>22}" for c in cells) + f"{entry['train_seconds']:>22.0f}"
                )
                per_seed[variant] = [
                    json.loads(
                        (
                            run_dir / "eval" / category / detector / variant / f"seed{s}" / "result.json"
                        ).read_text()
                    )["metrics"]
                    for s in summary["seeds"]
                ]
            for variant, results in per_seed.items():
                values = ", ".join(
                    f"{r['image_auroc']:.3f}/{r['pixel_auroc'] or float('nan'):.3f}" for r in results
                )
                print(f"  {variant} per seed (image/pixel AUROC): {values}")
            if {"rule", "two-stage"} <= set(per_seed):
                diffs = np.array(
                    [
                        b["image_auroc"] - a["image_auroc"]
                        for a, b in zip(per_seed["rule"], per_seed["two-stage"], strict=True)
                    ]
                )
                print(
                    f"  two-stage - rule, image AUROC per seed: {np.round(diffs, 3).tolist()} "
                    f"(mean {diffs.mean():+.3f}; two-stage ahead in {(diffs > 0).sum()}/{len(diffs)} seeds)"
                )


if __name__ == "__main__":
    main()

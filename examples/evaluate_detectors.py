"""Evaluate a run's curated set: train DRAEM, VFM and AeCSAD on normal images plus each synthetic-set variant
and score them on the dataset's real test split (what ``kka-synth eval`` does), then print the metrics.

The variants follow arXiv 2512.23227: none, rule (Perlin anomalies), kka (the run's curated set), two-stage
(rule, then kka) and reverse. Pass a finished run directory; without one the script first makes a short demo
run (one iteration). Detector settings come from the run's config (``eval.options``) and profile. Offline,
every detector trains on CPU without downloads: per category and variant about half a minute for DRAEM and
VFM and two minutes for AeCSAD on one CPU thread (the detectors' own figures), so all of them on the demo's
two categories take about half an hour. On the hub profile VFM loads facebook/dinov2-base and AeCSAD an
ImageNet WRN-50-2, and both want a GPU.

    python examples/evaluate_detectors.py runs/demo                # an existing run
    python examples/evaluate_detectors.py --detectors draem        # a short demo run, then DRAEM only

``KKA_SYNTH_EXAMPLE_TINY=1`` makes the demo run with tiny detectors so the script checks itself in about a
minute (CI).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import kka_synth
from kka_synth.cli import quiet_libraries

COLUMNS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
           "image_f1_max": "image F1", "pixel_f1_max": "pixel F1"}  # fmt: skip
"""Metric keys of ``metrics.json`` and the column titles printed for them."""

TINY = {
    "proposals_per_iteration": 16,
    "data": {"image_size": 64, "categories": ["washer"]},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
    "eval": {
        "overlays": 1,
        "options": {
            "draem": {"recon_width": 4, "disc_width": 4, "steps": 6, "batch_size": 4},
            "vfm": {"image_size": 64, "head_widths": [16], "steps": 4, "batch_size": 4},
            "aecsad": {"image_size": 64, "wrn_base": 4, "wrn_blocks": [1, 1, 1, 1], "label_images": 8,
                       "colour_clusters": 3, "max_components": 4, "hdbscan_min_cluster_size": 3,
                       "crop_variants": 2, "seg_channels": 8, "seg_epochs": 3, "unlabeled_start": 1,
                       "seg_batch_size": 4, "feature_dim": 8, "local_width": 4, "global_width": 8,
                       "lgst_steps": 8, "lgst_batch_size": 2, "calibration_draws": 1},
        },
    },
}  # fmt: skip
"""Overrides for a smoke test (``KKA_SYNTH_EXAMPLE_TINY=1``); real use leaves them out."""


def print_table(summary: dict[str, Any]) -> None:
    """One row per category, detector and variant: the mean of each metric over seeds ("-": not defined)."""
    titles = "".join(f"{title:>13}" for title in COLUMNS.values())
    header = f"{'category':<10} {'detector':<8} {'variant':<10}{titles}"
    print(header)
    print("-" * len(header))
    for category, detectors in summary["categories"].items():
        for detector, variants in detectors.items():
            for variant, entry in variants.items():
                means = [entry["mean"][metric] for metric in COLUMNS]
                cells = "".join("-".rjust(13) if v is None else f"{v:>13.3f}" for v in means)
                print(f"{category:<10} {detector:<8} {variant:<10}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a finished run (default: make a demo run)")
    parser.add_argument("--detectors", default="draem,vfm,aecsad", help="comma-separated (draem,vfm,aecsad)")
    parser.add_argument("--out", default="runs", help="where the demo run goes without RUN_DIR (runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the progress bars and notices the CLI also keeps out
    tiny = TINY if os.environ.get("KKA_SYNTH_EXAMPLE_TINY") == "1" else {}

    if args.run_dir is not None:
        run = kka_synth.open_run(args.run_dir)
    else:
        run = kka_synth.run(
            {"dataset": "demo", "iterations": 1, "out": args.out, "name": "demo-eval"}, **tiny
        )
    print(f"run: {run.path} ({len(run.curated())} curated defects)")

    summary = kka_synth.evaluate(run, detectors=args.detectors.split(","))
    print(f"\nreal test split of {summary['dataset']}, {summary['image_size']} px, seeds {summary['seeds']}:")
    print_table(summary)
    print(f"\nmetrics: {run.path / 'metrics.json'}\nreport: {run.report()}")


if __name__ == "__main__":
    main()

"""The offline demo through the Python API: run the KKA loop, then read the hard-share curve and the hardest
curated defects back from the run.

Runs anywhere: CPU only, no downloads. Three iterations on the built-in demo take about four minutes on a
two-core laptop; the first use also builds the demo dataset and pretrains the compact proposer (about a
minute more, cached under ``~/.cache/kka-synth`` or ``$KKA_SYNTH_CACHE``).

    python examples/demo_api.py                    # three iterations into runs/demo-api
    python examples/demo_api.py --iterations 2 --out my-runs

``KKA_SYNTH_EXAMPLE_TINY=1`` shrinks every stage (one category, tiny models) so the script checks itself in
about half a minute; CI runs it that way.
"""

from __future__ import annotations

import argparse
import logging
import os

import kka_synth
from kka_synth.cli import quiet_libraries

TINY = {
    "iterations": 2,
    "proposals_per_iteration": 12,
    "data": {"image_size": 64, "categories": ["washer"]},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {
        "pairs_per_prompt": 4,
        "max_pairs": 16,
        "dpo": {"num_train_epochs": 1, "per_device_train_batch_size": 4},
    },
}
"""Overrides for a smoke test (``KKA_SYNTH_EXAMPLE_TINY=1``); real use leaves them out."""


def bar(share: float | None, width: int = 20) -> str:
    """``share`` (0 to 1) as a text bar with its value, e.g. ``#########...........  0.45``."""
    if share is None:
        return "(nothing kept)".ljust(width + 6)
    filled = round(share * width)
    return "#" * filled + "." * (width - filled) + f"  {share:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="KKA iterations (default 3)")
    parser.add_argument("--out", default="runs", help="folder that holds the run directory (default runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the progress bars and notices the CLI also keeps out
    tiny = TINY if os.environ.get("KKA_SYNTH_EXAMPLE_TINY") == "1" else {}

    run = kka_synth.run(
        {"dataset": "demo", "iterations": args.iterations, "out": args.out, "name": "demo-api"}, **tiny
    )

    # the hard share per iteration: the refit evaluator decides the labels, the fixed judge never changes
    print("\nhard share per iteration (refit evaluator | fixed judge)")
    for stats in run.stats():
        print(f"  {stats['iteration']:>2}  {bar(stats['hard_share'])}  |  {bar(stats['hard_share_judge'])}")

    curated = sorted(run.curated(), key=lambda row: row["hardness"], reverse=True)
    print(f"\nhardest curated defects ({len(curated)} in the curated set):")
    for row in curated[:5]:
        print(f"  {row['hardness']:+.3f}  {row['category']}/{row['defect_type']}  {row['image']}")

    print(f"\nreport: {run.report()}")


if __name__ == "__main__":
    main()

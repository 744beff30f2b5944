"""Publish a run as a Hugging Face dataset, then load it back with ``kka_synth.hub.load``.

By default this is a dry run: the exact files a push would upload (parquet shards, the dataset card with its
provenance and hard-share plot) are written to ``--dry-run DIR`` (``publish-preview``; it must be empty or
missing) and nothing leaves the machine. ``--repo-id USER/NAME`` pushes for real; the token comes from
``$HF_TOKEN`` (or ``huggingface-cli login``) and is never written anywhere. Pass a finished run directory;
without one the script first makes a short demo run (one iteration, about a minute and a half on a laptop CPU,
no downloads). Publishing itself takes seconds.

    python examples/publish_run.py runs/demo                          # dry run into publish-preview/
    python examples/publish_run.py runs/demo --repo-id me/washer-defects --include all

``KKA_SYNTH_EXAMPLE_TINY=1`` makes the demo run tiny so the script checks itself in seconds (CI).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import kka_synth
from kka_synth.cli import quiet_libraries
from kka_synth.hub import load

TINY = {
    "proposals_per_iteration": 12,
    "data": {"image_size": 64, "categories": ["washer"]},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
}
"""Overrides for a smoke test (``KKA_SYNTH_EXAMPLE_TINY=1``); real use leaves them out."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, help="a finished run (default: make a demo run)")
    parser.add_argument("--repo-id", help="USER/NAME on the Hub: push for real instead of a dry run")
    parser.add_argument("--dry-run", default="publish-preview", help="folder for a dry run (publish-preview)")
    parser.add_argument(
        "--include", choices=["curated", "all"], default="curated", help="hard set or all kept"
    )
    parser.add_argument("--out", default="runs", help="where the demo run goes without RUN_DIR (runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the progress bars and notices the CLI also keeps out
    tiny = TINY if os.environ.get("KKA_SYNTH_EXAMPLE_TINY") == "1" else {}

    if args.run_dir is not None:
        run = kka_synth.open_run(args.run_dir)
    else:
        run = kka_synth.run(
            {"dataset": "demo", "iterations": 1, "out": args.out, "name": "demo-publish"}, **tiny
        )

    dry_run = None if args.repo_id else args.dry_run
    result = kka_synth.publish(run, args.repo_id, dry_run=dry_run, include=args.include)
    print(f"\nrows per split: {result.rows}")
    print(f"wrote {len(result.files)} files to {result.dry_run_dir}" if dry_run else f"pushed: {result.url}")

    dataset = load(dry_run or args.repo_id)  # a datasets.DatasetDict, one split per category
    print(f"\nloaded back: splits {sorted(dataset)}")
    split = sorted(dataset)[0]
    row = dataset[split][0]
    print(f"first row of {split} ({dataset[split].num_rows} rows):")
    for key, value in row.items():
        shown = f"{value.mode} image {value.size[0]}x{value.size[1]}" if hasattr(value, "size") else value
        print(f"  {key:<13} {shown}")


if __name__ == "__main__":
    main()

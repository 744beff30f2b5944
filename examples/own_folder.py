"""Your own product: a folder of normal images plus a knowledge entry that says what its defects look like.

The knowledge file has the format of ``kka_synth/prompts/knowledge/*.yaml``; ``data.knowledge`` points the
run at it, and the proposer learns its defect types (the compact proposer is pretrained on it once, cached
per file content). Your folder is ``<data-root>/<product>/`` with ``good/`` and optional ``<defect>/``
folders (or ``train/good`` and ``test/...`` as in MVTec AD). Without ``--data-root`` the script builds a
stand-in from the demo's washer images, so it runs anywhere. CPU only, no downloads: about four minutes on
a two-core laptop for three iterations, plus a minute to pretrain the proposer on the new knowledge.

    python examples/own_folder.py --data-root /data/parts --product gasket
    python examples/own_folder.py                   # stand-in images in runs/stand-in/gasket

``KKA_SYNTH_EXAMPLE_TINY=1`` uses tiny settings so the script checks itself in under a minute (CI).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

import kka_synth
from kka_synth.cli import quiet_libraries
from kka_synth.data import load_samples

KNOWLEDGE = """\
dataset: my_products
negative_prompt: blurry, cartoon, text
categories:
  {product}:
    kind: object
    components: [ring, lip, inner_edge, outer_edge]
    defect_types:
      tear:
        regions: [top, bottom, left, right]
        shapes: [crack, missing]
        tones: [darker]
        size: [0.002, 0.03]
        phrases: [small tear in the rubber ring, split running from the inner edge]
      bulge:
        regions: [top-left, top-right, bottom-left, bottom-right]
        shapes: [blob]
        tones: [brighter]
        size: [0.005, 0.05]
        phrases: [swollen spot on the lip, raised bump on the ring]
      contamination:
        regions: [anywhere]
        shapes: [spot, stain]
        tones: [darker, colour]
        size: [0.001, 0.02]
        phrases: [dirt particle on the surface, oil smear on the ring]
"""
"""Your product's defect knowledge (regions, shapes and tones come from ``kka_synth.types``)."""

TINY = {
    "iterations": 1,
    "proposals_per_iteration": 12,
    "data": {"image_size": 64},
    "proposer": {"pretrain_steps": 150},
    "evaluator": {"pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
    "alignment": {"enabled": False},
}
"""Overrides for a smoke test (``KKA_SYNTH_EXAMPLE_TINY=1``); real use leaves them out."""


def stand_in_folder(root: Path, product: str) -> Path:
    """``root/<product>/train/good`` filled with the demo washer's normal training images."""
    good = root / product / "train" / "good"
    good.mkdir(parents=True, exist_ok=True)
    for sample in load_samples("demo", None, ["washer"]):
        if sample.split == "train" and sample.label == 0:
            shutil.copyfile(sample.image_path, good / Path(sample.image_path).name)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, help="folder holding <product>/good (default: a stand-in)")
    parser.add_argument("--product", default="gasket", help="category folder and knowledge name (gasket)")
    parser.add_argument("--iterations", type=int, default=3, help="KKA iterations (default 3)")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder for runs (default runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()  # the progress bars and notices the CLI also keeps out
    tiny = TINY if os.environ.get("KKA_SYNTH_EXAMPLE_TINY") == "1" else {}

    data_root = args.data_root or stand_in_folder(args.out / "stand-in", args.product)
    knowledge = args.out / f"{args.product}-knowledge.yaml"
    knowledge.parent.mkdir(parents=True, exist_ok=True)
    knowledge.write_text(KNOWLEDGE.format(product=args.product))

    settings = {
        "name": args.product,
        "out": str(args.out),
        "iterations": args.iterations,
        "data": {
            "dataset": "folder",
            "root": str(data_root),
            "categories": [args.product],
            "knowledge": str(knowledge),
        },
    }
    run = kka_synth.run(settings, **tiny)

    specs = [row["spec"] for row in run.candidates() if row["spec"] is not None]
    types = sorted({spec["defect_type"] for spec in specs})
    print(f"\n{len(specs)} specs parsed for {args.product}; defect types: {', '.join(types)}")
    for stats in run.stats():
        share = stats["hard_share"] or 0.0
        print(f"iteration {stats['iteration']}: {stats['kept']} kept, hard share {share:.2f}")
    print(f"curated hard set: {len(run.curated())} images in {run.path / 'curated'}")
    print(f"report: {run.report()}")


if __name__ == "__main__":
    main()

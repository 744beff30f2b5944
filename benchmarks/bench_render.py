"""Throughput of the offline renderers and filters: renders per second and filter seconds per pair.

Renders N random specs (all shapes, tones, named regions, log-uniform sizes, uniform severities) per
renderer on held-out normal images, then runs both filters on every render, with the match band calibrated
on other normals of the same category. Prints timings and the filters' verdict counts.

    python benchmarks/bench_render.py                      # scikit-image textures, 200 specs, 128x128
    python benchmarks/bench_render.py --data DIR --side 256   # a folder of normal images (one category)
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from kka_synth.synth import RENDERERS, RenderError
from kka_synth.synth.filters import EditLocality, MatchCountBand
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, TONES, Candidate, DefectSpec, Proposal


def texture_categories(side: int) -> dict[str, list[np.ndarray]]:
    """Nine crops per bundled texture, resized to ``side``."""
    categories = {}
    for name in ("brick", "grass", "gravel"):
        sheet = getattr(data, name)()
        crops = [sheet[y : y + 160, x : x + 160] for y in (0, 176, 352) for x in (0, 176, 352)]
        categories[name] = [
            cv2.cvtColor(cv2.resize(c, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB)
            for c in crops
        ]
    return categories


def folder_category(folder: Path, side: int, limit: int = 24) -> dict[str, list[np.ndarray]]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))[
        :limit
    ]
    if len(paths) < 4:
        raise SystemExit(f"{folder} holds fewer than 4 images")
    images = []
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        images.append(
            cv2.cvtColor(cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        )
    return {folder.name: images}


def random_spec(category: str, rng: np.random.Generator) -> DefectSpec:
    low, high = np.log(SIZE_RANGE[0] * 4), np.log(0.15)
    return DefectSpec(
        category=category,
        defect_type="defect",
        description=str(rng.choice(["", "thin", "wide", "several", "long", "rust"])),
        region=REGIONS[str(rng.choice(list(REGIONS)))],
        size=float(np.exp(rng.uniform(low, high))),
        shape=str(rng.choice(SHAPES)),
        tone=str(rng.choice(TONES)),
        severity=float(rng.uniform(0.05, 1.0)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="specs rendered per renderer")
    parser.add_argument("--side", type=int, default=128, help="image side in pixels")
    parser.add_argument("--data", type=Path, default=None, help="folder of normal images (one category)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    categories = folder_category(args.data, args.side) if args.data else texture_categories(args.side)
    rng = np.random.default_rng(args.seed)
    bands, held_out = {}, {}
    start = time.perf_counter()
    for name, images in categories.items():
        split = max(2, len(images) * 2 // 3)
        bands[name] = MatchCountBand().calibrate(images[:split], rng)
        held_out[name] = images[split:]
        print(f"band {name}: ({bands[name].low:.3f}, {bands[name].high:.3f}) from {split} normals")
    print(f"calibration: {time.perf_counter() - start:.2f} s for {len(categories)} categories")

    locality = EditLocality()
    for renderer_name, renderer_class in RENDERERS.items():
        renderer = renderer_class()
        jobs = []
        for index in range(args.n):
            name = list(categories)[index % len(categories)]
            source = held_out[name][int(rng.integers(len(held_out[name])))]
            jobs.append(
                (name, source, random_spec(name, rng), np.random.default_rng(args.seed * 100003 + index))
            )
        for _, source, _, _ in jobs:  # warm the foreground cache so timings show rendering only
            renderer.foreground(source)
        renders, failures = [], Counter()
        start = time.perf_counter()
        for name, source, spec, job_rng in jobs:
            try:
                image, mask = renderer.render(source, spec, job_rng)
            except RenderError as error:
                failures[error.reason] += 1
                continue
            renders.append(
                (name, source, Candidate("b", 0, Proposal("", ""), "s", image, mask, renderer_name))
            )
        render_time = time.perf_counter() - start

        verdicts = {"locality": Counter(), "match_band": Counter()}
        timings = {"locality": 0.0, "match_band": 0.0}
        accepted = 0
        for name, source, candidate in renders:
            ok = True
            for key, judge in (("locality", locality), ("match_band", bands[name])):
                start = time.perf_counter()
                verdict = judge(source, candidate)
                timings[key] += time.perf_counter() - start
                verdicts[key][verdict.reason or "ok"] += 1
                ok = ok and verdict.ok
            accepted += ok
        count = max(len(renders), 1)
        print(
            f"\n{renderer_name}: {len(renders)} renders at {args.side}x{args.side}, "
            f"{len(renders) / render_time:.1f} renders/s, failures {dict(failures)}"
        )
        for key in timings:
            print(f"  {key}: {timings[key] / count * 1000:.2f} ms/pair, verdicts {dict(verdicts[key])}")
        print(f"  kept by both filters: {accepted}/{len(renders)}")


if __name__ == "__main__":
    main()

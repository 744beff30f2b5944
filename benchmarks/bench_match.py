"""Seconds per (source, render) pair of the two match bands: SIFT (OpenCV) against LightGlue (transformers).

LightGlue runs with random weights in two sizes, built here (no download):

- tiny: the test matcher of ``tests/unit/synth/tiny_lightglue.py`` (SuperPoint widths 16-32, 64-d
  descriptors, 2 LightGlue layers);
- real: the published architecture (SuperPoint 64-128 with 256-d descriptors, 9 LightGlue layers, 4 heads),
  at most ``--max-keypoints`` keypoints per image, as LightGlue is usually run.

Both get the tiny matcher's variance-preserving SuperPoint weights, so keypoint counts are realistic (with
the library's initialisation every pixel becomes a keypoint). Sources are crops of scikit-image's textures
and renders the same crops with a painted disc over 3% of the area; every pair has its own source, so the
SIFT band's source cache never hits. Each setting is run once to warm up, then timed.

    OMP_NUM_THREADS=1 python benchmarks/bench_match.py                    # CPU, 256 and 512, batch 1 and 16
    python benchmarks/bench_match.py --device cuda --pairs 64
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from kka_synth.synth.filters import MatchCountBand
from kka_synth.synth.lightglue import LightGlueBand

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "synth"))
from tiny_lightglue import build_lightglue, tiny_config  # noqa: E402


def real_config(max_keypoints: int):
    """The published SuperPoint + LightGlue architecture (transformers' defaults), keypoints capped."""
    from transformers import LightGlueConfig, SuperPointConfig

    return LightGlueConfig(keypoint_detector_config=SuperPointConfig(max_keypoints=max_keypoints).to_dict())


def save_model(config, folder: Path) -> str:
    from transformers import LightGlueImageProcessorPil

    build_lightglue(config).save_pretrained(str(folder))
    LightGlueImageProcessorPil(do_resize=False).save_pretrained(str(folder))
    return str(folder)


def make_pairs(side: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (source, render) pairs at ``side`` pixels: texture crops and a 3% painted disc on each."""
    sheets = [data.brick(), data.grass(), data.gravel(), data.camera()]
    rng = np.random.default_rng(0)
    pairs = []
    radius = round(np.sqrt(0.03 * side * side / np.pi))
    for index in range(count):
        sheet = sheets[index % len(sheets)]
        crop = min(sheet.shape[:2]) // 2
        y, x = rng.integers(0, sheet.shape[0] - crop), rng.integers(0, sheet.shape[1] - crop)
        gray = cv2.resize(sheet[y : y + crop, x : x + crop], (side, side), interpolation=cv2.INTER_AREA)
        source = np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
        render = source.copy()
        centre = (int(rng.integers(radius, side - radius)), int(rng.integers(radius, side - radius)))
        cv2.circle(render, centre, radius, (40, 40, 40), -1)
        pairs.append((source, render))
    return pairs


def time_band(band, pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(seconds per pair, mean source keypoints) of a timed ``match_ratios``, warmed up on other pairs."""
    band.match_ratios([(np.ascontiguousarray(s[::-1]), np.ascontiguousarray(r[::-1])) for s, r in pairs[:2]])
    started = time.perf_counter()
    results = band.match_ratios(pairs)
    seconds = (time.perf_counter() - started) / len(pairs)
    return seconds, float(np.mean([count for _, count in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N for LightGlue")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--pairs", type=int, default=16, help="timed pairs per setting")
    parser.add_argument("--max-keypoints", type=int, default=2048)
    parser.add_argument("--models", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, LightGlue on {args.device}")
    print(f"{'matcher':<16}{'side':>6}{'batch':>7}{'s/pair':>10}{'keypoints':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        if "tiny" in args.models:
            folders["lightglue-tiny"] = save_model(tiny_config(), Path(tmp) / "tiny")
        if "real" in args.models:
            folders["lightglue-real"] = save_model(real_config(args.max_keypoints), Path(tmp) / "real")
        for side in args.sizes:
            pairs = make_pairs(side, args.pairs)
            seconds, keypoints = time_band(MatchCountBand(), pairs)
            print(f"{'sift':<16}{side:>6}{'-':>7}{seconds:>10.4f}{keypoints:>11.0f}", flush=True)
            for name, folder in folders.items():
                for batch in args.batches:
                    band = LightGlueBand(model=folder, device=args.device, batch_size=batch)
                    seconds, keypoints = time_band(band, pairs)
                    print(f"{name:<16}{side:>6}{batch:>7}{seconds:>10.4f}{keypoints:>11.0f}", flush=True)


if __name__ == "__main__":
    main()

"""Time the anomaly metrics at MVTec scale: AUPRO, pixel AUROC and F1-max, sPRO and image AUROC.

Data: ``--images`` anomaly maps of ``--size`` x ``--size`` float32 (default 1,725 x 256 x 256, 113M pixels,
the size of the MVTec AD test set at 256 px). About 40% of the images hold 1-3 elliptic blobs covering about
2% of their pixels; maps are Gaussian noise plus a blurred signal on the blobs. Each measurement runs in a
forked child process, so its peak RSS (``resource.getrusage``) is the data it starts with (the parent's
resident memory, printed first) plus what the metric itself allocated.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from kka_synth.eval.metrics import PixelScores, aupro, image_auroc, pixel_auroc, pixel_f1_max, spro


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _current_mib() -> float:
    """Resident memory now (Linux /proc), the baseline a forked child starts from."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def make_data(images: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks (N, S, S) bool, maps (N, S, S) float32): blobs on ~40% of the images, noise + signal."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, size, size), dtype=bool)
    maps = rng.standard_normal((images, size, size), dtype=np.float32)
    target = 0.02 * size * size
    for i in np.flatnonzero(rng.random(images) < 0.4):
        blob = np.zeros((size, size), dtype=np.uint8)
        count = int(rng.integers(1, 4))
        for _ in range(count):
            area = target / count * rng.uniform(0.5, 1.5)
            ratio = rng.uniform(0.3, 1.0)
            axes = (max(1, int(np.sqrt(area / (np.pi * ratio)))), max(1, int(np.sqrt(area * ratio / np.pi))))
            centre = tuple(int(v) for v in rng.integers(size // 8, size - size // 8, size=2))
            cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        masks[i] = blob > 0
        signal = cv2.GaussianBlur(blob.astype(np.float32), (0, 0), sigmaX=size / 64)
        maps[i] += np.float32(rng.uniform(0.5, 3.0)) * signal
    return masks, maps


def _run_child(work: Callable[[], Any], queue: multiprocessing.Queue) -> None:
    start = time.perf_counter()
    result = work()
    queue.put((time.perf_counter() - start, result, _peak_mib()))


def measure(name: str, work: Callable[[], Any], baseline: float) -> Any:
    """Run ``work`` in a forked child and print its time, result and peak RSS."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_run_child, args=(work, queue))
    child.start()
    seconds, result, peak = queue.get()
    child.join()
    shown = ", ".join(f"{v:.4f}" for v in result) if isinstance(result, tuple) else f"{result:.4f}"
    print(f"{name:<44} {seconds:7.2f} s   peak RSS {peak:7.0f} MiB (+{peak - baseline:5.0f})   {shown}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1725, help="number of anomaly maps")
    parser.add_argument("--size", type=int, default=256, help="map height and width in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    masks, maps = make_data(args.images, args.size, args.seed)
    labels = masks.any(axis=(1, 2)).astype(np.int64)
    scores = maps.max(axis=(1, 2))
    # sPRO: each anomalous image's mask as one region, saturated at half its area
    regions = [
        [(mask, 0.5 * float(mask.sum()))] if label else [] for label, mask in zip(labels, masks, strict=True)
    ]
    baseline = _current_mib()
    print(
        f"data: {args.images} x {args.size} x {args.size} float32 ({maps.size / 1e6:.1f}M pixels, "
        f"{maps.nbytes / 2**20:.0f} MiB), {labels.sum()} anomalous images, {masks.mean():.2%} anomalous "
        f"pixels; made in {time.perf_counter() - start:.1f} s; RSS {baseline:.0f} MiB"
    )

    measure("aupro(fpr_limit=0.3)", lambda: aupro(masks, maps), baseline)
    measure("aupro(fpr_limit=1.0)", lambda: aupro(masks, maps, fpr_limit=1.0), baseline)
    measure("pixel_auroc", lambda: pixel_auroc(masks, maps), baseline)
    measure("pixel_f1_max", lambda: pixel_f1_max(masks, maps), baseline)
    measure("spro(fpr_limit=0.05), one region per image", lambda: spro(regions, maps), baseline)
    measure("image_auroc", lambda: image_auroc(labels, scores), baseline)

    def shared() -> tuple[float, ...]:
        pixels = PixelScores(masks, maps)
        return pixels.aupro(), pixels.auroc(), pixels.f1_max(), float(pixels.roc_points()[0].size)

    measure("PixelScores: aupro, auroc, f1_max, roc_points", shared, baseline)

    def prepare() -> float:
        return float(PixelScores(masks, maps).components)

    measure("PixelScores preparation only (components)", prepare, baseline)


if __name__ == "__main__":
    main()

"""Time the DRAEM detector on CPU: inference throughput and peak memory per profile, and training steps.

- Inference: ``predict`` on random 256 x 256 images in batches of 16 for the offline and the hub widths
  (untrained weights: speed does not depend on them). Each profile runs in a fresh process so that its
  peak RSS is its own.
- Training: seconds per optimisation step at the offline defaults, on 128 x 128 brick crops with
  on-the-fly Perlin anomalies (the demo's image size).
- ``--demo``: one offline ``fit`` per demo category (train/good plus Perlin anomalies), then image and
  pixel AUROC on the demo's test split (needs scikit-learn).

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_draem.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time

import numpy as np
import skimage.data
import torch

from kka_synth.detectors.draem import DraemConfig, DraemDetector, DraemModel
from kka_synth.synth.perlin import PerlinAnomalies
from kka_synth.types import SyntheticStage


def _inference(profile: str, size: int, batch: int, batches: int) -> tuple[float, float, int]:
    """(images per second, peak RSS in MiB, parameters) of ``predict`` for one profile's widths."""
    config = DraemConfig(**{**DraemDetector.profiles[profile], "image_size": size, "eval_batch_size": batch})
    detector = DraemDetector(config)
    detector.model = DraemModel(config.recon_width, config.disc_width).eval()
    detector.size, detector.mode = (size, size), "draem"
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    detector.predict(images[:1])  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        detector.predict(images)
    rate = batches * batch / (time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rate, peak, sum(p.numel() for p in detector.model.parameters())


def bench_inference(profiles: list[str], size: int, batch: int, batches: int) -> None:
    context = multiprocessing.get_context("spawn")
    for profile in profiles:
        with context.Pool(1) as pool:
            rate, peak, params = pool.apply(_inference, (profile, size, batch, batches))
        print(
            f"predict {profile:7s} ({params / 1e6:.2f} M params) at {size}x{size}, batch {batch}: "
            f"{rate:.2f} images/s, peak RSS {peak:.0f} MiB"
        )


def _brick_crops(count: int, side: int, rng: np.random.Generator) -> list[np.ndarray]:
    sheet = np.stack([skimage.data.brick()] * 3, axis=-1)
    out = []
    for _ in range(count):
        y, x = (int(v) for v in rng.integers(0, sheet.shape[0] - side, size=2))
        out.append(np.ascontiguousarray(sheet[y : y + side, x : x + side]))
    return out


def bench_training(steps: int, side: int) -> None:
    normals = _brick_crops(64, side, np.random.default_rng(0))
    config = DraemConfig(**{**DraemDetector.profiles["offline"], "steps": steps})
    stamps: list[float] = []
    detector = DraemDetector(config, progress=lambda done, total: stamps.append(time.perf_counter()))
    start = time.perf_counter()
    detector.fit(normals, [SyntheticStage("rule", draw=PerlinAnomalies("brick"))])
    elapsed = time.perf_counter() - start
    skip = min(3, steps - 1)  # the first steps pay one-off allocation costs
    per_step = (stamps[-1] - stamps[skip - 1]) / (steps - skip) if skip > 0 else elapsed / steps
    default_steps = DraemDetector.profiles["offline"]["steps"]
    print(
        f"fit offline ({side}x{side} normals, working size {detector.size}, crop {config.crop}, "
        f"batch {config.batch_size}, Perlin draws): {per_step:.3f} s/step (steady, {steps} steps, "
        f"{elapsed:.1f} s in all); {default_steps} steps (the default) take about "
        f"{per_step * default_steps:.0f} s"
    )


def bench_demo(categories: list[str]) -> None:
    from sklearn.metrics import roc_auc_score

    from kka_synth.data import load_rgb, load_sample, load_samples

    config = DraemConfig(**DraemDetector.profiles["offline"])
    for category in categories:
        samples = load_samples("demo", None, [category])
        normals = [load_rgb(s.image_path) for s in samples if s.split == "train" and s.label == 0]
        test = [s for s in samples if s.split == "test"]
        loaded = [load_sample(s) for s in test]
        images = [image for image, _ in loaded]
        masks = [np.zeros(image.shape[:2], bool) if mask is None else mask for image, mask in loaded]
        detector = DraemDetector(config)
        start = time.perf_counter()
        detector.fit(normals, [SyntheticStage("rule", draw=PerlinAnomalies(category))])
        elapsed = time.perf_counter() - start
        out = detector.predict(images)
        image_auroc = roc_auc_score([s.label for s in test], out.pred_score)
        pixel_auroc = roc_auc_score(np.stack(masks).ravel(), out.anomaly_map.ravel())
        print(
            f"demo {category}: fit {elapsed:.1f} s ({len(normals)} normals, {config.steps} steps), "
            f"image AUROC {image_auroc:.3f}, pixel AUROC {pixel_auroc:.3f} ({len(test)} test images)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="inference image side (a multiple of 32)")
    parser.add_argument("--batch", type=int, default=16, help="inference batch size")
    parser.add_argument("--batches", type=int, default=1, help="timed inference batches per profile")
    parser.add_argument(
        "--profile", nargs="+", default=["offline", "hub"], choices=sorted(DraemDetector.profiles)
    )
    parser.add_argument("--train-steps", type=int, default=20, help="training steps to time (0 skips)")
    parser.add_argument("--train-size", type=int, default=128, help="side of the training images")
    parser.add_argument(
        "--demo", nargs="*", default=None, help="also fit and score these demo categories (none: all)"
    )
    args = parser.parse_args()
    if args.size % 32:
        sys.exit(f"--size must be a multiple of 32, got {args.size}")
    print(f"torch threads: {torch.get_num_threads()}")
    bench_inference(args.profile, args.size, args.batch, args.batches)
    if args.train_steps > 0:
        bench_training(args.train_steps, args.train_size)
    if args.demo is not None:
        from kka_synth.data import DEMO_CATEGORIES

        bench_demo(args.demo or list(DEMO_CATEGORIES))


if __name__ == "__main__":
    main()

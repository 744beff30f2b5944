"""Time the AeCSAD detector: CPU inference and peak memory, training on DeepPCB, and GPU throughput.

- Inference (CPU): ``predict`` on random 256 x 256 images with the full-size WRN-50-2 teacher (random
  weights; speed does not depend on them), for the offline and the hub student widths. Each profile runs in
  a fresh process so that its peak RSS is its own.
- Training (CPU): one offline ``fit`` on the DeepPCB subset's train/good (``--data``, MVTec AD layout),
  with seconds per stage and per epoch (a segmentation epoch is one pass over D_L; an LGST epoch is as many
  student steps as it takes to see every training image once), then image and pixel AUROC on its test split.
- ``--gpu``: images per second at batch 8 and 16 (hub widths, 256 px), timed between
  ``torch.cuda.synchronize()`` calls after warm-up.

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_aecsad.py --data ../shared/data/deeppcb``.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kka_synth.detectors.aecsad import AecsadConfig, AecsadDetector
from kka_synth.detectors.aecsad.fusion import TrimmedZ
from kka_synth.detectors.aecsad.histogram import PatchHistogram

NUM_CLASSES = 6
"""Component classes of the untrained detector that inference is timed on (background included)."""


def _untrained(profile: str, size: int, device: str) -> AecsadDetector:
    """A detector with every module built (random weights) and dummy fitted statistics, ready to predict."""
    options = {
        **AecsadDetector.profiles[profile],
        "image_size": size,
        "teacher_weights": None,
        "device": device,
    }
    detector = AecsadDetector(AecsadConfig(**options))
    detector.wrn = detector._build_teacher()
    detector._build_students(NUM_CLASSES)
    for module in detector._modules().values():
        module.eval()
    rng = np.random.default_rng(0)
    maps = rng.integers(0, NUM_CLASSES, (8, size, size)).astype(np.uint8)
    detector.histogram = PatchHistogram(NUM_CLASSES, detector.config.hist_grid, 0.1).fit(maps)
    detector.zscore = TrimmedZ(0.2).fit(rng.normal(size=(8, 3)))
    detector.map_quantiles = np.array([[0.0, 1.0]] * 3)
    return detector


def _cpu_inference(profile: str, size: int, images: int) -> tuple[float, float, float]:
    """(seconds per image, peak RSS in MiB, student parameters in millions) for one profile's widths."""
    detector = _untrained(profile, size, "cpu")
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    detector.predict(batch[:1])  # warm-up
    start = time.perf_counter()
    detector.predict(batch)
    per_image = (time.perf_counter() - start) / images
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    params = sum(p.numel() for m in detector._modules().values() for p in m.parameters()) / 1e6
    return per_image, peak, params


def bench_cpu_inference(profiles: list[str], size: int, images: int) -> None:
    context = multiprocessing.get_context("spawn")
    for profile in profiles:
        with context.Pool(1) as pool:
            per_image, peak, params = pool.apply(_cpu_inference, (profile, size, images))
        print(
            f"predict {profile:7s} (WRN-50-2 68.9 M + {params:.2f} M trained params) at {size}x{size}, "
            f"{images} images: {per_image:.3f} s/image ({1 / per_image:.2f} images/s), "
            f"peak RSS {peak:.0f} MiB"
        )


def bench_training(data: Path) -> None:
    from kka_synth.data import load_sample, load_samples
    from kka_synth.eval.metrics import image_auroc, pixel_auroc

    samples = load_samples("mvtec_ad", data.parent, [data.name])
    config = AecsadConfig(**AecsadDetector.profiles["offline"])
    normals = [load_sample(s)[0] for s in samples if s.split == "train"]
    detector = AecsadDetector(config)
    start = time.perf_counter()
    detector.fit(normals)
    elapsed = time.perf_counter() - start
    timings = detector.timings
    labeled = int(detector.pseudo_labels.reliable.sum())
    trained = len(detector.pseudo_labels.reliable)
    seg_epoch = timings["segmentation"] / config.seg_epochs
    lgst_epoch = timings["lgst"] / config.lgst_steps * math.ceil(trained / config.lgst_batch_size)
    print(
        f"fit offline on {data.name} ({len(normals)} normals: {trained} trained, "
        f"{len(normals) - trained} held out; {config.image_size} px): {elapsed:.1f} s in all; "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items())
    )
    print(
        f"  per epoch: segmentation {seg_epoch:.1f} s ({labeled} D_L images), "
        f"LGST {lgst_epoch:.1f} s ({trained} images, batch {config.lgst_batch_size})"
    )
    test = [s for s in samples if s.split == "test"]
    loaded = [load_sample(s) for s in test]
    start = time.perf_counter()
    out = detector.predict([image for image, _ in loaded])
    seconds = time.perf_counter() - start
    labels = np.array([s.label for s in test])
    masks = np.stack([np.zeros(image.shape[:2], bool) if mask is None else mask for image, mask in loaded])
    print(
        f"  test split ({len(test)} images at {loaded[0][0].shape[1]} px): "
        f"predict {seconds / len(test):.3f} s/image, "
        f"image AUROC {image_auroc(labels, out.pred_score):.3f}, pixel AUROC "
        f"{pixel_auroc(masks, out.anomaly_map):.3f}"
    )


def bench_gpu(size: int, batches: list[int], repeats: int) -> None:
    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; none is visible")
    detector = _untrained("hub", size, "cuda")
    print(f"GPU: {torch.cuda.get_device_name()}, hub widths, {size}x{size}")
    for batch in batches:
        x = torch.rand(batch, 3, size, size, device="cuda")
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                _forward_tensors(detector, x)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(repeats):
                _forward_tensors(detector, x)
            torch.cuda.synchronize()
        rate = batch * repeats / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(
            f"  batch {batch:2d}: {rate:.1f} images/s (model forward, no host transfers), peak {peak:.0f} MiB"
        )


def _forward_tensors(detector: AecsadDetector, x: torch.Tensor) -> None:
    """The networks of ``predict`` on a device batch: teacher layers 1-3, decoder, projection, students."""
    side = x.shape[-1]
    features = detector.wrn.features(x, ("layer1", "layer2", "layer3"))
    detector.head(features, (side, side)).argmax(dim=1)
    teacher = detector.teacher(features, (side // 4, side // 4))
    local, fuse = detector.local(x)
    global_ = detector.global_(x)
    (
        ((teacher - local) ** 2).mean(dim=1)
        + ((teacher - global_) ** 2).mean(dim=1)
        + ((global_ - fuse) ** 2).mean(dim=1)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="inference image side (a multiple of 32)")
    parser.add_argument("--images", type=int, default=8, help="images per timed CPU predict")
    parser.add_argument(
        "--profile", nargs="+", default=["offline", "hub"], choices=sorted(AecsadDetector.profiles)
    )
    parser.add_argument(
        "--data", type=Path, default=None, help="the DeepPCB folder (MVTec AD layout) to train on"
    )
    parser.add_argument("--gpu", action="store_true", help="only time GPU throughput at batch 8 and 16")
    parser.add_argument("--repeats", type=int, default=20, help="timed batches per size on the GPU")
    args = parser.parse_args()
    if args.size % 32:
        sys.exit(f"--size must be a multiple of 32, got {args.size}")
    if args.gpu:
        bench_gpu(args.size, [8, 16], args.repeats)
        return
    print(f"torch threads: {torch.get_num_threads()}")
    bench_cpu_inference(args.profile, args.size, args.images)
    if args.data is not None:
        if not (args.data / "train" / "good").is_dir():
            print(f"no DeepPCB data at {args.data} (needs train/good, MVTec AD layout)", file=sys.stderr)
            sys.exit(2)
        bench_training(args.data)


if __name__ == "__main__":
    main()

"""Time the VFM detector: fit and predict time and peak memory on CPU, throughput and fit time on a GPU.

No weights are downloaded: every backbone is a randomly initialised DINOv2 of the real size (``small`` =
dinov2-small, ``base`` = dinov2-base), so the speeds and memory are those of the real models while the
scores mean nothing.

- CPU (default): for each ``--arch``, in a fresh process so that its peak RSS is its own, ``fit`` on
  ``--normals`` train/good images of DeepPCB (``--data``, MVTec AD layout) at 224 px with ``--steps``
  training steps on the built-in anomalies, then ``predict`` on ``--test`` test images. Prints the seconds per
  training step, the statistics pass, the whole fit, predict images/s and peak RSS.
- ``--gpu``: the base-sized model on CUDA under bfloat16 autocast, training batch 8 and predict batch 32:
  fit time for ``--steps`` steps and predict throughput in images/s. It uses DeepPCB when ``--data`` exists
  and random images otherwise (speed does not depend on the pixels).

Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_vfm.py --data PATH/TO/deeppcb``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kka_synth.detectors.vfm import VfmConfig, VfmDetector


def _images(data: Path | None, split: str, count: int, side: int, seed: int) -> list[np.ndarray]:
    """``count`` RGB images of ``split`` ("train" = train/good, "test" = all of test/) at side x side."""
    if data is None:
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count)]
    from kka_synth.data import load_rgb

    folder = data / "train" / "good" if split == "train" else data / "test"
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    picked = [paths[i] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).round().astype(int)]
    return [load_rgb(path, side) for path in picked]


def _config(arch: str, size: int, steps: int, device: str, bf16: bool, eval_batch: int) -> VfmConfig:
    hub = VfmDetector.profiles["hub"]
    return VfmConfig(
        **{
            **hub,
            "model": None,
            "random_arch": arch,
            "image_size": size,
            "steps": steps,
            "device": device,
            "bf16": bf16,
            "eval_batch_size": eval_batch,
        }
    )


def _run(
    arch: str, data: Path | None, size: int, steps: int, normals: int, tests: int, device: str, bf16: bool,
    eval_batch: int,
) -> dict[str, float]:  # fmt: skip
    """Fit and predict once; timings in seconds and peak memory in MiB."""
    torch.manual_seed(0)
    train = _images(data, "train", normals, size, 0)
    test = _images(data, "test", tests, size, 1)
    stamps: list[float] = []
    detector = VfmDetector(
        _config(arch, size, steps, device, bf16, eval_batch),
        progress=lambda d, t: stamps.append(time.perf_counter()),
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    detector.fit(train, None)
    end = time.perf_counter()
    skip = min(2, steps - 1)  # the first steps pay one-off costs
    per_step = (stamps[-1] - stamps[skip - 1]) / (steps - skip)
    detector.predict(test[: min(2, len(test))])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    predict_start = time.perf_counter()
    detector.predict(test)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    predict = time.perf_counter() - predict_start
    assert detector.backbone is not None
    return {
        "params": sum(p.numel() for p in detector.backbone.parameters()) / 1e6,
        "fit": end - start,
        "per_step": per_step,
        "after_training": end - stamps[-1],
        "rate": len(test) / predict,
        "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0,
    }


def bench_cpu(args: argparse.Namespace) -> None:
    context = multiprocessing.get_context("spawn")
    for arch in args.arch:
        with context.Pool(1) as pool:
            r = pool.apply(
                _run, (arch, args.data, args.size, args.steps, args.normals, args.test, "cpu", False, 16)
            )
        hub_steps = VfmDetector.profiles["hub"]["steps"]
        print(
            f"cpu {arch} (random weights, {r['params']:.1f} M params) at {args.size} px: "
            f"fit {r['fit']:.1f} s "
            f"({args.normals} normals, {args.steps} steps at {r['per_step']:.2f} s/step, statistics and "
            f"calibration {r['after_training']:.1f} s; the hub profile's {hub_steps} steps would take about "
            f"{r['per_step'] * hub_steps / 60:.0f} min); predict {r['rate']:.2f} images/s; "
            f"peak RSS {r['rss']:.0f} MiB"
        )


def bench_gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device")
    r = _run("base", args.data, args.size, args.steps, args.normals, args.test, "cuda", True, 32)
    print(
        f"gpu {torch.cuda.get_device_name()} base (random weights of dinov2-base's size, {r['params']:.1f} M "
        f"params), bf16, {args.size} px: fit {r['fit']:.1f} s ({args.normals} normals, {args.steps} steps of "
        f"8 at {r['per_step'] * 1000:.0f} ms/step); predict batch 32: {r['rate']:.1f} images/s; "
        f"peak GPU memory {r['gpu']:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/deeppcb"), help="DeepPCB folder")
    parser.add_argument(
        "--arch", nargs="+", default=["small", "base"], choices=["tiny", "small", "base", "large"]
    )
    parser.add_argument("--size", type=int, default=224, help="working side (a multiple of the patch)")
    parser.add_argument("--steps", type=int, default=10, help="training steps to time")
    parser.add_argument("--normals", type=int, default=64, help="train/good images to fit on")
    parser.add_argument("--test", type=int, default=64, help="test images to predict")
    parser.add_argument(
        "--gpu", action="store_true", help="time the base-sized model on CUDA (bf16, batch 32)"
    )
    args = parser.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2")
    if not (args.data / "train" / "good").is_dir():
        if not args.gpu:
            print(
                f"no DeepPCB data at {args.data} (needs train/good and test/); pass --data", file=sys.stderr
            )
            sys.exit(2)
        print(f"no DeepPCB data at {args.data}: timing on random images")
        args.data = None
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}")
    if args.gpu:
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()

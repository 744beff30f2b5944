"""Publishing a large run: `publish(dry_run=...)` on a synthetic run of N candidates at 256x256.

The run directory is synthesised once (random RGB PNGs and small masks, one iteration, every candidate
hard and curated; the curated files are hard links to the iteration's) and reused with --keep. The dry run
builds the Arrow dataset and writes the parquet shards, README and plot exactly as a push would upload
them. It prints images/s, the peak resident memory of the process (``ru_maxrss``, before and after
publishing, which counts memory-mapped file pages too), the peak anonymous resident memory while publishing
(sampled), the peak Python heap (tracemalloc, a second pass) and, for comparison, the bytes of all N
images: a streaming publish stays far below them.

    python benchmarks/bench_publish.py                  # N = 10,000
    python benchmarks/bench_publish.py -n 2000 --keep   # keep the synthesised run for the next call
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from kka_synth.config import DataConfig, RunConfig
from kka_synth.hub import publish
from kka_synth.runs import RunDir, atomic_write_json, write_candidates, write_jsonl

SIDE = 256
CATEGORIES = ("brick", "washer")
MARKER = "bench.done"


def synthesise(root: Path, n: int, seed: int = 0) -> Path:
    """A run directory of ``n`` hard, curated candidates with random PNGs; reused when already complete."""
    run_dir = root / "bench"
    if (root / MARKER).is_file():
        return run_dir
    shutil.rmtree(root, ignore_errors=True)
    config = RunConfig(out=str(root), name="bench", iterations=1, data=DataConfig(image_size=SIDE))
    run = RunDir.open(config)
    folder = run.iteration_dir(1)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rng = np.random.default_rng(seed)
    rows, index = [], []
    started = time.perf_counter()
    for i in range(n):
        category = CATEGORIES[i % 2]
        cid = f"1-{category}-{i:05d}"
        pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{cid}.png", compress_level=1)
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        y, x = rng.integers(0, SIDE - 32, 2)
        mask[y : y + 32, x : x + 32] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{cid}.png")
        spec = {"category": category, "defect_type": "stain", "description": f"stain {i}", "region": "center"}
        rows.append(
            {
                "id": cid,
                "iteration": 1,
                "category": category,
                "prompt": f"category: {category}",
                "text": "{}",
                "spec": spec,
                "source_id": f"{category}/train/good/{i % 80:03d}",
                "renderer": "procedural",
                "image": f"images/{cid}.png",
                "mask": f"masks/{cid}.png",
                "verdicts": {},
                "hardness": float(rng.random()),
                "hardness_judge": 0.0,
                "label": "hard",
                "label_judge": "hard",
                "reason": "",
                "render_info": {},
            }
        )
        image = Path(category) / "test" / "stain" / f"{cid}.png"
        mask_path = Path(category) / "ground_truth" / "stain" / f"{cid}_mask.png"
        for source, target in ((folder / rows[-1]["image"], image), (folder / rows[-1]["mask"], mask_path)):
            (run.curated_dir / target).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, run.curated_dir / target)
        index.append(
            {"id": cid, "iteration": 1, "source_id": rows[-1]["source_id"], "category": category}
            | {
                "defect_type": "stain",
                "image": str(image),
                "mask": str(mask_path),
                "hardness": 0.5,
                "text": "",
            }
        )
    write_candidates(folder, rows)
    write_jsonl(run.curated_dir / "index.jsonl", index)
    per = {name: {"kept": n // 2, "hard_share": 1.0, "hard_share_judge": 1.0} for name in CATEGORIES}
    stats = {"iteration": 1, "kept": n, "hard": n, "hard_share": 1.0, "hard_share_judge": 1.0}
    atomic_write_json(folder / "stats.json", stats | {"per_category": per})
    (root / MARKER).write_text(str(n))
    print(f"synthesised {n} candidates at {SIDE}x{SIDE} in {time.perf_counter() - started:.1f} s")
    return run_dir


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonymousPeak:
    """Samples the process's anonymous resident memory (Linux ``RssAnon``) in a thread, keeping the peak.

    ``ru_maxrss`` also counts the pages of memory-mapped files, and the Arrow cache and the parquet shards
    are read through memory maps; those pages are the page cache, which the kernel drops under pressure.
    Anonymous memory is what the process itself holds.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read_mb() -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.read_mb() or 0.0)
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _publish(run_dir: Path, include: str, heap: bool) -> tuple[float, dict[str, int], int, float | None]:
    """One dry run: seconds, rows per split, bytes written, and the peak Python heap in MiB when ``heap``."""
    out = Path(tempfile.mkdtemp(prefix="kka-bench-dry-"))
    try:
        if heap:
            tracemalloc.start()
        started = time.perf_counter()
        result = publish(run_dir, None, dry_run=out / "dry", include=include)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if heap else None
        tracemalloc.stop()
        written = sum(p.stat().st_size for p in (out / "dry").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return seconds, result.rows, written, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="Candidates in the synthetic run.")
    parser.add_argument("--dir", type=Path, help="Where the synthetic run goes (default: a temp folder).")
    parser.add_argument("--keep", action="store_true", help="Keep the synthetic run for the next call.")
    parser.add_argument("--include", choices=("curated", "all"), default="curated")
    parser.add_argument(
        "--no-heap", action="store_true", help="Skip the second, slower pass under tracemalloc."
    )
    args = parser.parse_args()
    root = args.dir or Path(tempfile.gettempdir()) / f"kka-bench-publish-{args.n}"
    import datasets  # imported before the clock starts, as a long-running process has it
    import huggingface_hub  # noqa: F401
    import matplotlib  # noqa: F401

    datasets.disable_progress_bars()

    try:
        run_dir = synthesise(root, args.n)
        png_bytes = sum(p.stat().st_size for p in (run_dir / "iterations" / "1" / "images").iterdir())
        rss_before, anon_before = _rss_mb(), AnonymousPeak.read_mb()
        with AnonymousPeak() as anon:
            seconds, rows, written, _ = _publish(run_dir, args.include, heap=False)
        rss_after = _rss_mb()
        heap = None if args.no_heap else _publish(run_dir, args.include, heap=True)[3]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    total = sum(rows.values())
    raw = total * SIDE * SIDE * 3 / 2**20
    print(f"rows: {total} in {len(rows)} splits; {written / 2**20:.0f} MiB written")
    print(f"publish (dry run): {seconds:.1f} s, {total / seconds:.0f} images/s")
    print(f"peak RSS: {rss_before:.0f} MiB before publishing, {rss_after:.0f} MiB after (with mapped files)")
    if anon_before is not None:
        print(f"anonymous resident memory: {anon_before:.0f} MiB before, peak {anon.peak_mb:.0f} MiB during")
    if heap is not None:
        print(f"peak Python heap during publish (tracemalloc, second pass): {heap:.0f} MiB")
    print(f"all images: {png_bytes / 2**20:.0f} MiB as PNG, {raw:.0f} MiB decoded")


if __name__ == "__main__":
    main()

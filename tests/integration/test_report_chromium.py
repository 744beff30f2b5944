"""The HTML report in a real browser: headless Chromium loads every embedded image and renders a page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kka_synth.config import RunConfig
from kka_synth.data import save_mask, save_rgb
from kka_synth.eval.report import write_report
from kka_synth.runs import write_parquet

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
TIMEOUT = 60


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser installed (looked for {', '.join(BROWSERS)} on PATH)")


def _candidate(k: int, i: int, hardness: float) -> dict[str, object]:
    spec = {
        "category": "brick",
        "defect_type": "crack",
        "description": "thin crack",
        "region": [0.0, 0.0, 1.0, 1.0],
        "size": 0.05,
        "shape": "line",
        "tone": "darker",
        "severity": 0.5,
    }
    cid = f"{k}-brick-{i:04d}"
    return {
        "id": cid,
        "iteration": k,
        "category": "brick",
        "prompt": "category: brick\n",
        "text": json.dumps(spec),
        "spec": json.dumps(spec),
        "source_id": "brick/000",
        "renderer": "procedural",
        "image": f"images/{cid}.png",
        "mask": f"masks/{cid}.png",
        "verdicts": json.dumps({}),
        "hardness": hardness,
        "hardness_judge": hardness,
        "label": "hard" if hardness > 0 else "easy",
        "label_judge": "hard" if hardness > 0 else "easy",
        "reason": "",
    }


def _fixture_run(root: Path) -> Path:
    """One finished iteration with four kept candidates, and one evaluated detector and variant."""
    rng = np.random.default_rng(0)
    config = RunConfig(name="browser", out=str(root), iterations=1)
    run = config.run_dir
    run.mkdir(parents=True)
    manifest = {"config": config.to_dict(), "versions": {}, "created": "2026-01-01T00:00:00", "stages": {}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    folder = run / "iterations" / "1"
    rows = [_candidate(1, i, h) for i, h in enumerate((2.0, 0.5, -1.0, -3.0))]
    for row in rows:
        mask = np.zeros((48, 48), bool)
        mask[10:30, 20:24] = True
        save_rgb(folder / row["image"], rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        save_mask(folder / row["mask"], mask)
    write_parquet(folder / "candidates.parquet", rows)
    stats = {
        "iteration": 1,
        "proposals": 5,
        "parse_failures": 1,
        "rejections": {"parse:not_json": 1},
        "kept": 4,
        "hard_share": 0.5,
        "hard_share_judge": 0.5,
        "per_category": {"brick": {"kept": 4, "hard_share": 0.5, "hard_share_judge": 0.5}},
    }
    (folder / "stats.json").write_text(json.dumps(stats))
    result_dir = run / "eval" / "brick" / "draem" / "kka" / "seed0"
    save_rgb(result_dir / "overlays" / "000.png", rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    result = {
        "metrics": {"image_auroc": 0.9},
        "curves": {"image_roc": {"fpr": [0.0, 0.1, 1.0], "tpr": [0.0, 0.9, 1.0]}, "pixel_roc": None},
        "overlays": [{"file": "overlays/000.png", "image": "test/crack/000.png", "label": 1, "score": 0.7}],
    }
    (result_dir / "result.json").write_text(json.dumps(result))
    entry = {"mean": {"image_auroc": 0.9}, "std": {"image_auroc": 0.0}, "n": 1, "train_seconds": 1.0}
    metrics = {"dataset": "demo", "seeds": [0], "categories": {"brick": {"draem": {"kka": entry}}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _chromium(browser: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        *flags,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_chromium_loads_every_image_and_renders_the_report(tmp_path: Path):
    browser = _browser()
    report = write_report(_fixture_run(tmp_path))
    count = report.read_text().count("<img ")
    url = report.resolve().as_uri()

    dumped = _chromium(browser, tmp_path, "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dumped.stdout)
    assert body is not None, dumped.stdout[:500]
    attributes = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert count > 0
    assert attributes.get("data-images-loaded") == str(count)
    assert attributes.get("data-images-broken") == "0"

    shot = tmp_path / "report.png"
    taken = _chromium(browser, tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", url)
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size[0] == 1200
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 16  # None: more distinct colours than maxcolors

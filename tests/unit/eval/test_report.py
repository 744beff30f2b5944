"""The HTML report on a fixture run directory built by hand: self-contained, formatted, robust to gaps."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kka_synth.config import RunConfig
from kka_synth.data import save_mask, save_rgb
from kka_synth.eval.html import OUTLINE, THUMB, outlined
from kka_synth.eval.report import _symlog_bins, write_report
from kka_synth.runs import RunError, read_parquet, write_parquet

CATEGORIES = ("brick", "washer")
LABELS = ("hard", "easy", "easy", "rejected")
"""Per category and iteration: three kept candidates (hardness 1.5, -0.5, -2.5) and one parse failure."""
HARDNESS = (1.5, -0.5, -2.5, None)
IMG_SRC = re.compile(r'<img [^>]*src="([^"]*)"')
NUM_IMAGES = 1 + 2 + 1 + 12 + 2 + 8
"""hard-share plot, 2 histograms, rejections plot, 2 categories x 3 samples x 2 pictures, 2 ROC figures
(one per detector), 4 results x 3 overlays each (budget 12 // 4) capped by the 2 each result holds."""


def _spec(category: str, index: int) -> dict[str, Any]:
    return {
        "category": category,
        "defect_type": ("crack", "stain", "hole")[index % 3],
        "description": f"a faint mark number {index}",
        "region": [0.25, 0.25, 0.75, 0.75],
        "size": 0.02,
        "shape": "blob",
        "tone": "darker",
        "severity": 0.4,
    }


def _candidates(folder: Path, k: int, rng: np.random.Generator) -> None:
    rows = []
    for category in CATEGORIES:
        for i, (label, hardness) in enumerate(zip(LABELS, HARDNESS, strict=True)):
            cid = f"{k}-{category}-{i:04d}"
            kept = label != "rejected"
            if kept:
                mask = np.zeros((32, 32), bool)
                mask[8:20, 10:22] = True
                save_rgb(folder / "images" / f"{cid}.png", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                save_mask(folder / "masks" / f"{cid}.png", mask)
            rows.append(
                {
                    "id": cid,
                    "iteration": k,
                    "category": category,
                    "prompt": f"category: {category}\n",
                    "text": "{}",
                    "spec": json.dumps(_spec(category, i)) if kept else None,
                    "source_id": f"{category}/000",
                    "renderer": "procedural" if kept else "",
                    "image": f"images/{cid}.png" if kept else None,
                    "mask": f"masks/{cid}.png" if kept else None,
                    "verdicts": json.dumps(
                        {"locality": {"ok": True, "score": 1.0, "reason": ""}} if kept else {}
                    ),
                    "hardness": hardness,
                    "hardness_judge": None if hardness is None else hardness - 0.25,
                    "label": label,
                    "label_judge": label if kept else None,
                    "reason": "" if kept else "parse:unknown_type",
                }
            )
    write_parquet(folder / "candidates.parquet", rows)


def _stats(k: int) -> dict[str, Any]:
    return {
        "iteration": k,
        "proposals": 8,
        "parse_failures": 2,
        "render_failures": 0,
        "filtered": 0,
        "rejections": {"parse:unknown_type": 2},
        "kept": 6,
        "hard": 2,
        "hard_share": 1 / 3,
        "hard_share_judge": 0.25 * k,
        "median_hardness": -0.5,
        "distinct_specs": 3 + k,
        "per_category": {c: {"kept": 3, "hard_share": 1 / 3, "hard_share_judge": 0.5} for c in CATEGORIES},
        "dpo": {"pairs": 4, "steps": 1, "margin_before": -0.5, "margin_after": 0.25, "loss": 1.0},
        "seconds": {"propose": 0.5, "render": 1.0, "evaluate": 2.0, "align": 0.8},
    }


METRICS = {
    "draem": {
        "none": {"image_auroc": (0.5, 0.0), "pixel_auroc": (0.6, 0.01), "aupro": (None, None)},
        "kka": {"image_auroc": (0.91234, 0.0123), "pixel_auroc": (0.95, None), "aupro": (0.7, 0.05)},
    },
    "vfm": {
        "none": {"image_auroc": (0.8, 0.1), "pixel_auroc": (0.9, 0.02), "aupro": (0.75, 0.0)},
        "kka": {"image_auroc": (0.85, 0.02), "pixel_auroc": (0.93, 0.01), "aupro": (0.72, 0.01)},
    },
}


def _evaluation(run: Path, rng: np.random.Generator) -> None:
    keys = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "spro")
    categories: dict[str, Any] = {"brick": {}}
    for detector, variants in METRICS.items():
        categories["brick"][detector] = {}
        for variant, values in variants.items():
            mean = {key: values.get(key, (None, None))[0] for key in keys}
            std = {key: values.get(key, (None, None))[1] for key in keys}
            categories["brick"][detector][variant] = {"mean": mean, "std": std, "n": 2, "train_seconds": 12.5}
            folder = run / "eval" / "brick" / detector / variant / "seed0"
            overlays = []
            for i in range(2):
                save_rgb(
                    folder / "overlays" / f"{i:03d}.png", rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
                )
                overlays.append(
                    {
                        "file": f"overlays/{i:03d}.png",
                        "image": f"test/crack/{i:03d}.png",
                        "label": i,
                        "score": 0.5,
                    }
                )
            result = {
                "category": "brick",
                "detector": detector,
                "variant": variant,
                "seed": 0,
                "metrics": mean,
                "train_seconds": 12.5,
                "predict_seconds": 1.0,
                "synthetic": {"kka": 4},
                "curves": {
                    "image_roc": {"fpr": [0.0, 0.2, 1.0], "tpr": [0.0, 0.8, 1.0]},
                    "pixel_roc": None if detector == "vfm" else {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]},
                },
                "overlays": overlays,
            }
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "result.json").write_text(json.dumps(result))
    metrics = {
        "dataset": "demo",
        "image_size": 32,
        "detectors": list(METRICS),
        "variants": ["none", "kka"],
        "seeds": [0, 1],
        "categories": categories,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))


def build_run(root: Path, evaluation: bool = True, iterations: int = 2) -> Path:
    """A run directory as the loop and the evaluation leave it, with tiny made-up contents."""
    rng = np.random.default_rng(0)
    config = RunConfig(name="fixture", out=str(root), iterations=iterations)
    run = config.run_dir
    run.mkdir(parents=True)
    manifest = {
        "config": config.to_dict(),
        "versions": {"python": "3.11.7", "kka-synth": "0.1.0"},
        "created": "2026-01-02T03:04:05",
        "stages": {"prepare": {"status": "done", "seconds": 1.0, "categories": list(CATEGORIES)}},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    for k in (1, 2):
        folder = run / "iterations" / str(k)
        _candidates(folder, k, rng)
        (folder / "stats.json").write_text(json.dumps(_stats(k)))
    if evaluation:
        _evaluation(run, rng)
    return run


def _images(page: str) -> list[Image.Image]:
    out = []
    for src in IMG_SRC.findall(page):
        assert src.startswith("data:image/png;base64,"), src[:40]
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert image.format == "PNG"
        image.load()
        out.append(image)
    return out


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The report of a finished, evaluated fixture run (read-only for the tests that share it)."""
    return write_report(build_run(tmp_path_factory.mktemp("report"))).read_text()


def test_report_is_one_self_contained_file(tmp_path: Path):
    run = build_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for bad in ('src="http', "href=", "<link", "url(", "@import"):
        assert bad not in page
    assert page.count("<img ") == len(IMG_SRC.findall(page)) == NUM_IMAGES
    images = _images(page)
    assert len(images) == NUM_IMAGES
    thumbs = re.findall(r'<img class="thumb" [^>]*src="([^"]*)"', page)
    assert len(thumbs) == 12 + 8
    for src in thumbs:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert max(image.size) <= THUMB
    assert any(
        max(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size) == THUMB for s in thumbs
    )
    assert "data-images-loaded" not in page  # set by the script at load time, not in the file
    assert "document.body.dataset.imagesLoaded" in page and "imagesBroken" in page
    assert list(run.glob(".report.html.*")) == []


def test_header_and_iteration_table(full_report: str):
    page = full_report
    assert "brick, washer" in page and "2026-01-02T03:04:05" in page and "kka-synth 0.1.0" in page
    assert "none yet" in page  # no curated set in the manifest
    rows = re.findall(r"<tr><td class=l>(\d)</td>(.*?)</tr>", page)
    cells = {k: re.findall(r"<td>(.*?)</td>", rest) for k, rest in rows}
    # proposals, parse, retries (none recorded), render, filtered, kept, hard share, judge share, median,
    # distinct, margin, seconds
    assert cells["1"] == ["8", "2", "–", "0", "0", "6", "0.33", "0.25", "-0.50", "4", "-0.50 → 0.25", "4.3"]
    assert cells["2"][7] == "0.50" and cells["2"][9] == "5"


def test_samples_show_hardest_and_easiest_with_spec(full_report: str):
    page = full_report
    assert "brick (iteration 2, 3 kept)" in page and "washer (iteration 2, 3 kept)" in page
    hardest = page.index("<b>hardest</b>")
    assert page.index("2-brick-0000", hardest) < page.index("2-brick-0001", hardest)
    assert page.index("<b>easiest</b>", hardest) < page.index("2-brick-0002", hardest)
    assert "crack · blob · darker · size 0.02 · severity 0.4" in page
    assert "hardness <b>1.50</b> (hard), judge 1.25" in page
    assert "1-brick-0000" not in page  # samples come from the last iteration only


def test_metrics_table_formatting(full_report: str):
    page = full_report
    table = page[page.index("<th class=l>detector</th>") :]
    table = table[: table.index("</table>")]
    rows = {
        tuple(re.findall(r"<td class=l>(.*?)</td>", row)): re.findall(r"<td>(.*?)</td>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", table)
    }
    # columns: image AUROC, pixel AUROC, AUPRO, image F1-max, pixel F1-max, sPRO, seeds, train s
    assert rows[("draem", "kka")][:3] == ["<b>0.912 ± 0.012</b>", "<b>0.950</b>", "0.700 ± 0.050"]
    assert rows[("draem", "none")][:4] == ["0.500 ± 0.000", "0.600 ± 0.010", "–", "–"]
    assert rows[("vfm", "none")][2] == "<b>0.750 ± 0.000</b>"
    assert rows[("vfm", "kka")][6:] == ["2", "12.5"]
    assert table.count("<b>") == 3


def test_evaluation_plots_and_overlay_captions(full_report: str):
    page = full_report
    assert 'alt="brick draem ROC curves"' in page and 'alt="brick vfm ROC curves"' in page
    assert "draem / kka: test/crack/001.png (anomalous), score 0.500" in page
    assert "vfm / none: test/crack/000.png (good), score 0.500" in page


def test_run_without_metrics_gets_the_eval_note(tmp_path: Path):
    run = build_run(tmp_path, evaluation=False)
    page = write_report(run).read_text()
    assert "run `kka-synth eval" in page
    assert 'ROC curves"' not in page and len(_images(page)) == NUM_IMAGES - 10


def test_cut_off_run_and_corrupt_image_still_report(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    run = build_run(tmp_path, evaluation=False, iterations=3)
    (run / "iterations" / "2" / "stats.json").unlink()
    (run / "iterations" / "2" / "images" / "2-washer-0001.png").write_bytes(b"not a png")
    (run / "iterations" / "1" / "candidates.parquet").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="kka_synth.eval"):
        page = write_report(run).read_text()
    assert "iteration 2: no readable stats.json" in page
    assert "iteration 3 has not run (no folder)" in page
    assert "iteration 1: no readable candidates.parquet" in page
    assert "2-washer-0001: image unreadable" in page and "(image unreadable)" in page
    assert "1 of 3" in page  # header: one iteration of three has stats
    assert any("2-washer-0001" in r.getMessage() for r in caplog.records)
    # hard-share plot, 1 histogram (iteration 2), rejections, 2 x 3 samples x 2 pictures but the corrupt card
    assert len(_images(page)) == 1 + 1 + 1 + 10


def test_image_path_leading_out_of_the_run_is_noted_not_shown(tmp_path: Path):
    run = build_run(tmp_path, evaluation=False)
    table = run / "iterations" / "2" / "candidates.parquet"
    rows = read_parquet(table)
    victim = next(r for r in rows if r["id"] == "2-washer-0001")
    outside = tmp_path / "outside.png"
    save_rgb(outside, np.full((32, 32, 3), 7, np.uint8))
    victim["image"] = "../" * 3 + "outside.png"  # from iterations/2 up past the run directory
    assert (table.parent / victim["image"]).resolve() == outside.resolve()
    write_parquet(table, rows)
    page = write_report(run).read_text()
    assert "2-washer-0001: image unreadable" in page and "lies outside" in page
    # the sample cards lose exactly that one card's two pictures
    assert len(_images(page)) == 1 + 2 + 1 + 10


def test_manifest_only_run_has_notes_and_no_images(tmp_path: Path):
    run = build_run(tmp_path, evaluation=False)
    for k in (1, 2):
        for path in sorted((run / "iterations" / str(k)).rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
    page = write_report(run).read_text()
    assert "no iteration has finished yet" in page and "no kept candidates to show yet" in page
    assert _images(page) == []


def test_nan_hardness_is_left_out_of_plots_and_samples(tmp_path: Path):
    run = build_run(tmp_path, evaluation=False)
    folder = run / "iterations" / "2"
    rows = read_parquet(folder / "candidates.parquet")
    rows[0]["hardness"] = math.nan
    write_parquet(folder / "candidates.parquet", rows)
    page = write_report(run).read_text()
    assert "brick (iteration 2, 2 kept)" in page and "2-brick-0000" not in page


def test_missing_run_dir_or_manifest_raises(tmp_path: Path):
    with pytest.raises(RunError, match="not a run directory"):
        write_report(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match=r"not a run directory \(no manifest.json\)"):
        write_report(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match="cannot read"):
        write_report(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{}")
    with pytest.raises(RunError, match="not a kka-synth manifest"):
        write_report(tmp_path / "empty")


def test_outline_marks_the_mask_border_only(tmp_path: Path):
    mask = np.zeros((32, 32), bool)
    mask[10:20, 10:20] = True
    save_mask(tmp_path / "mask.png", mask)
    image = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    pixels = np.asarray(outlined(image, tmp_path / "mask.png"))
    coloured = np.all(pixels == OUTLINE, axis=2)
    assert coloured[10, 10] and coloured[19, 15] and coloured[9, 15] and coloured[20, 12]  # edge, one out
    assert not coloured[14:16, 14:16].any() and not coloured[:8].any() and not coloured[:, 22:].any()
    assert not coloured[9, 9]  # the diagonal corner outside is not grown into


def test_broken_evaluation_pieces_are_noted(tmp_path: Path):
    run = build_run(tmp_path)
    (run / "eval" / "brick" / "vfm" / "kka" / "seed0" / "result.json").unlink()
    draem = run / "eval" / "brick" / "draem" / "kka" / "seed0"
    result = json.loads((draem / "result.json").read_text())
    result["curves"]["image_roc"]["tpr"] = [0.0, 1.0]  # one shorter than fpr
    (draem / "result.json").write_text(json.dumps(result))
    (draem / "overlays" / "001.png").write_bytes(b"")
    page = write_report(run).read_text()
    assert "cannot read eval/brick/vfm/kka/seed0/result.json: file missing" in page
    assert "eval/brick/draem/kka/seed0: image_roc needs fpr and tpr lists of one length" in page
    assert "eval/brick/draem/kka/seed0: overlay unreadable (not an image)" in page
    assert str(tmp_path) not in page
    # the tables stay; 3 results x 2 overlays (4 per result now) minus the unreadable one
    assert "<b>0.912 ± 0.012</b>" in page and len(_images(page)) == NUM_IMAGES - 8 + 5
    (run / "metrics.json").write_text("[1, 2")
    page = write_report(run).read_text()
    assert "cannot read metrics.json" in page and 'ROC curves"' not in page


def test_symlog_bins_split_at_zero_and_cover_the_values():
    values = np.array([-300.0, -2.0, 0.5, 3.0])
    edges = _symlog_bins(values)
    assert 0.0 in edges and np.all(np.diff(edges) > 0)
    assert math.isclose(edges[0], -300.0) and math.isclose(edges[-1], 3.0)
    assert 0 < 3 * np.count_nonzero(edges > 0) < np.count_nonzero(edges < 0)  # the long easy tail gets more


def test_malformed_pieces_cost_only_their_section(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    run = build_run(tmp_path)
    (run / "iterations" / "1" / "stats.json").write_text("[1, 2]")
    stats = _stats(2)
    stats["per_category"] = ["brick"]  # a list where a mapping belongs
    (run / "iterations" / "2" / "stats.json").write_text(json.dumps(stats))
    folder = run / "eval" / "brick" / "vfm" / "none" / "seed0"
    result = json.loads((folder / "result.json").read_text())
    result["curves"]["image_roc"] = {"fpr": ["a", "b"], "tpr": [0.0, 1.0]}
    (folder / "result.json").write_text(json.dumps(result))
    with caplog.at_level(logging.WARNING, logger="kka_synth.eval"):
        page = write_report(run).read_text()
    assert any(
        "iteration 1: no readable stats.json (not a JSON object)" in r.getMessage() for r in caplog.records
    )
    assert "<td class=l>iterations</td><td class=l>1 of 2</td>" in page
    hard_share = page[page.index("<h2>Hard share</h2>") : page.index("<h2>Hardness</h2>")]
    assert "this section could not be drawn (AttributeError" in hard_share
    assert "eval/brick/vfm/none/seed0: image_roc holds values that are no rates in [0, 1]" in page
    assert "brick (iteration 2, 3 kept)" in page and "<b>0.912 ± 0.012</b>" in page
    assert any("Hard share section failed" in r.getMessage() for r in caplog.records)


def test_one_seed_shows_the_mean_without_a_spread():
    from kka_synth.eval.report_eval import _metrics_table

    one = {"mean": {"image_auroc": 0.8}, "std": {"image_auroc": 0.0}, "n": 1, "train_seconds": 3.0}
    three = {"mean": {"image_auroc": 0.7}, "std": {"image_auroc": 0.05}, "n": 3, "train_seconds": 3.0}
    table = _metrics_table({"draem": {"rule": one, "kka": three}})
    assert "<b>0.800</b>" in table and "0.800 ±" not in table and "0.700 ± 0.050" in table

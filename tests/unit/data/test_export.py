"""Export of a run to MVTec AD layout: read back by the project's loaders, masks 0/255, nothing outside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kka_synth.config import DataConfig, RunConfig
from kka_synth.data import ExportError, export_run, load_mask, load_rgb, load_samples, save_mask, save_rgb
from kka_synth.data.export import HELD_OUT, TEST_SPLIT, safe_name
from kka_synth.runs import RunDir, write_candidates

SIZE = 16


def _noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _dataset(root: Path, with_test: bool) -> Path:
    """Category "bottle": 10 train normals; with_test adds 2 test normals and one real defect."""
    rng = np.random.default_rng(1)
    base = root / "bottle"
    for i in range(10):
        save_rgb(base / "train" / "good" / f"{i:03d}.png", _noise(rng))
    if with_test:
        for i in range(2):
            save_rgb(base / "test" / "good" / f"{i:03d}.png", _noise(rng))
        save_rgb(base / "test" / "broken" / "000.png", _noise(rng))
        save_mask(base / "ground_truth" / "broken" / "000_mask.png", np.ones((SIZE, SIZE), dtype=bool))
    return root


def _box(y: int) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[y : y + 3, 2:7] = True
    return mask


# (iteration, label, defect type, mask): 3 usable hard ones, 1 without mask, 1 empty, 1 easy, 1 rejected
CANDIDATES = [
    (1, "hard", "crack", _box(1)),
    (1, "hard", "crack", _box(5)),
    (1, "hard", "stain", None),
    (1, "easy", "crack", _box(9)),
    (1, "rejected", "crack", _box(2)),
    (2, "hard", "scratch", _box(3)),
    (2, "hard", "crack", np.zeros((SIZE, SIZE), dtype=bool)),
]


def _run(tmp: Path, dataset: str, root: Path, defect_override: str | None = None) -> tuple[Path, dict]:
    """A run directory with two iterations of candidates (as the loop writes them); returns it and the
    candidates' images by id."""
    config = RunConfig(
        out=str(tmp / "runs"), name="r", iterations=2, data=DataConfig(dataset=dataset, root=str(root))
    )
    run = RunDir.open(config)
    rng = np.random.default_rng(2)
    images: dict[str, np.ndarray] = {}
    for k in (1, 2):
        folder = run.iteration_dir(k)
        rows = []
        for i, (iteration, label, defect, mask) in enumerate(CANDIDATES):
            if iteration != k:
                continue
            cid = f"{k}-bottle-{i:04d}"
            images[cid] = _noise(rng)
            save_rgb(folder / "images" / f"{cid}.png", images[cid])
            if mask is not None:
                save_mask(folder / "masks" / f"{cid}.png", mask)
            rows.append(
                {
                    "id": cid,
                    "iteration": k,
                    "category": "bottle",
                    "prompt": "p",
                    "text": f"text {cid}",
                    "spec": {"category": "bottle", "defect_type": defect_override or defect},
                    "source_id": "bottle/000",
                    "renderer": "procedural",
                    "image": f"images/{cid}.png",
                    "mask": None if mask is None else f"masks/{cid}.png",
                    "verdicts": {},
                    "hardness": float(i),
                    "hardness_judge": None,
                    "label": label,
                    "label_judge": None,
                    "reason": "",
                    "render_info": {},
                }
            )
        write_candidates(folder, rows)
    return run.path, images


def _curate(run_path: Path) -> None:
    from kka_synth.loop import KKALoop

    KKALoop(RunDir.load(run_path)).curate()


def test_curated_export_reads_back_as_mvtec_ad(tmp_path: Path) -> None:
    source = _dataset(tmp_path / "data", with_test=True)
    run_path, images = _run(tmp_path, "mvtec_ad", source)
    _curate(run_path)
    out = tmp_path / "export"
    result = export_run(run_path, out)

    assert result.skipped == {"no_mask": 1, "empty_mask": 1} and result.anomalies == 3
    assert result.counts == {"bottle": {"train/good": 10, "test/good": 2, "test/crack": 2, "test/scratch": 1}}
    assert result.test_good == {"bottle": TEST_SPLIT}
    samples = load_samples("mvtec_ad", out)
    assert load_samples("folder", out) == samples
    assert sorted({s.defect_type for s in samples}) == ["crack", "good", "scratch"]  # no real "broken"
    train = [s for s in samples if s.split == "train"]
    assert [s.image_path.name for s in train] == [f"{i:03d}.png" for i in range(10)]
    for s in train:
        assert (
            s.image_path.read_bytes()
            == (source / "bottle" / "train" / "good" / s.image_path.name).read_bytes()
        )

    manifest = json.loads((out / "export.json").read_text())
    by_file = {f["image"]: f for f in manifest["files"]}
    assert sorted(by_file) == [
        "bottle/test/crack/000.png",
        "bottle/test/crack/001.png",
        "bottle/test/scratch/000.png",
    ]
    expected_masks = {"1-bottle-0000": _box(1), "1-bottle-0001": _box(5), "2-bottle-0005": _box(3)}
    for s in (s for s in samples if s.label == 1):
        entry = by_file[s.image_path.relative_to(out).as_posix()]
        assert s.mask_path.name == s.image_path.stem + "_mask.png"
        assert np.array_equal(load_rgb(s.image_path), images[entry["id"]])
        raw = np.asarray(Image.open(s.mask_path))
        assert raw.dtype == np.uint8 and set(np.unique(raw).tolist()) == {0, 255}
        assert np.array_equal(load_mask(s.mask_path), expected_masks[entry["id"]])
    assert "SYNTHETIC" in (out / "README.txt").read_text()


def test_all_candidates_and_held_out_normals(tmp_path: Path) -> None:
    source = _dataset(tmp_path / "data", with_test=False)
    run_path, _ = _run(tmp_path, "folder", source)
    out = tmp_path / "export"
    result = export_run(run_path, out, include="all")

    assert result.test_good == {"bottle": HELD_OUT}
    assert result.counts["bottle"] == {"train/good": 8, "test/good": 2, "test/crack": 3, "test/scratch": 1}
    samples = load_samples("mvtec_ad", out)
    train = {s.image_path.name for s in samples if s.split == "train"}
    test_good = {s.image_path.name for s in samples if s.split == "test" and s.label == 0}
    assert test_good == {"004.png", "009.png"} and not train & test_good
    assert train | test_good == {f"{i:03d}.png" for i in range(10)}
    labels = sorted(f["label"] for f in json.loads((out / "export.json").read_text())["files"])
    assert labels == ["easy", "hard", "hard", "hard"]
    assert "held out" in (out / "README.txt").read_text()


def test_refusals(tmp_path: Path) -> None:
    source = _dataset(tmp_path / "data", with_test=True)
    run_path, _ = _run(tmp_path, "mvtec_ad", source, defect_override="../evil")
    out = tmp_path / "x" / "export"
    with pytest.raises(ExportError, match="no curated set"):
        export_run(run_path, out)
    with pytest.raises(ExportError, match="defect type '../evil'"):
        export_run(run_path, out, include="all")
    assert not (tmp_path / "x").exists() or list((tmp_path / "x").iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "x" / "evil").exists()
    with pytest.raises(ExportError, match="unknown export format"):
        export_run(run_path, out, format="coco")
    with pytest.raises(ExportError, match="include must be"):
        export_run(run_path, out, include="hard")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_run(run_path, tmp_path / "busy", include="all")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path / "data", out)


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a\\b", "c:d", "tab\there"])
def test_safe_name_refuses(name: str) -> None:
    with pytest.raises(ExportError):
        safe_name(name, "defect type")
    assert safe_name("broken_large", "defect type") == "broken_large"


@pytest.mark.parametrize(
    ("include", "key", "value"),
    [
        ("curated", "image", "../../secret.png"),
        ("curated", "mask", "/SECRET"),
        ("all", "image", "../../../secret.png"),
    ],
)
def test_paths_leading_out_of_the_run_are_refused(tmp_path: Path, include: str, key: str, value: str) -> None:
    """A tampered curated/index.jsonl or candidates.parquet cannot make the export copy outside files."""
    from kka_synth.runs import read_candidates

    source = _dataset(tmp_path / "data", with_test=True)
    run_path, _ = _run(tmp_path, "mvtec_ad", source)
    _curate(run_path)
    secret = tmp_path / "runs" / "secret.png"
    save_rgb(secret, np.zeros((SIZE, SIZE, 3), dtype=np.uint8))
    value = value.replace("/SECRET", str(secret))
    if include == "curated":
        index = run_path / "curated" / "index.jsonl"
        rows = [json.loads(line) for line in index.read_text().splitlines()]
        rows[0][key] = value
        index.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        folder = run_path / "iterations" / "1"
        rows = read_candidates(folder)
        rows[0][key] = value
        write_candidates(folder, rows)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match="lies outside") as error:
        export_run(run_path, out, include=include)
    assert "\n" not in str(error.value) and not out.exists()

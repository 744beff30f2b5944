"""Folder-layout loaders on tiny fake trees: counts, labels, splits, masks, and errors naming the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kka_synth.data import (
    DataError,
    list_categories,
    load_batch,
    load_sample,
    load_samples,
    loco_defects_config,
    sample_id,
    save_mask,
    save_rgb,
    validate_pair,
)
from kka_synth.types import Sample

SHARED_DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def _image(path: Path, size: tuple[int, int] = (8, 8), value: int = 0) -> None:
    image = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    image[0, 0] = (value + 50) % 256
    save_rgb(path, image)


def _mask(path: Path, size: tuple[int, int] = (8, 8)) -> None:
    mask = np.zeros((size[1], size[0]), dtype=bool)
    mask[2:4, 2:4] = True
    save_mask(path, mask)


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    for category in ("bottle", "screw"):
        base = tmp_path / category
        for i in range(3):
            _image(base / "train" / "good" / f"{i:03d}.png", value=i)
        for i in range(2):
            _image(base / "test" / "good" / f"{i:03d}.png")
        for defect in ("broken", "crack"):
            for i in range(2):
                _image(base / "test" / defect / f"{i:03d}.png")
                _mask(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    (tmp_path / "license.txt").write_text("not a category")
    (tmp_path / "bottle" / "train" / "good" / ".DS_Store").write_text("")
    return tmp_path


def test_mvtec_ad_counts_labels_and_masks(mvtec: Path) -> None:
    samples = load_samples("mvtec_ad", mvtec)
    assert len(samples) == 2 * (3 + 2 + 4)
    assert list_categories("mvtec_ad", mvtec) == ["bottle", "screw"]
    bottle = [s for s in samples if s.category == "bottle"]
    assert [s.split for s in bottle] == ["train"] * 3 + ["test"] * 6
    assert [s.defect_type for s in bottle[3:]] == ["good", "good", "broken", "broken", "crack", "crack"]
    for s in samples:
        assert s.label == int(s.defect_type != "good")
        assert (s.mask_path is None) == (s.label == 0)
    crack = bottle[-1]
    assert crack.mask_path == mvtec / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    assert sample_id(crack) == "bottle/test/crack/001"
    assert load_samples("mvtec_ad", mvtec, ["screw"]) == [s for s in samples if s.category == "screw"]
    assert load_samples("mvtec_ad", mvtec) == samples  # deterministic order


def test_mvtec_ad_errors_name_the_missing_piece(mvtec: Path) -> None:
    with pytest.raises(DataError, match=r"unknown mvtec_ad category 'cable'.*known: bottle, screw"):
        load_samples("mvtec_ad", mvtec, ["cable"])
    (mvtec / "screw" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"001_mask.png"):
        load_samples("mvtec_ad", mvtec, ["screw"])
    for path in (mvtec / "bottle" / "train" / "good").iterdir():
        path.unlink()
    (mvtec / "bottle" / "train" / "good").rmdir()
    with pytest.raises(DataError, match=r"missing folder .*bottle.train.good"):
        load_samples("mvtec_ad", mvtec, ["bottle"])
    with pytest.raises(DataError, match="dataset root not found"):
        load_samples("mvtec_ad", mvtec / "nowhere")
    with pytest.raises(DataError, match="needs a root"):
        load_samples("visa", None)
    with pytest.raises(DataError, match=r"unknown dataset 'kitti'.*mvtec_loco"):
        load_samples("kitti", mvtec)


def test_mask_size_mismatch_names_both_files(mvtec: Path) -> None:
    bad = mvtec / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    _mask(bad, size=(10, 8))
    sample = next(s for s in load_samples("mvtec_ad", mvtec) if s.mask_path == bad)
    with pytest.raises(DataError, match=r"000_mask.png is 10x8 but image .*broken.000.png is 8x8"):
        load_sample(sample)
    with pytest.raises(DataError, match=r"000_mask.png is 10x8"):
        validate_pair(sample)
    good = next(s for s in load_samples("mvtec_ad", mvtec) if s.defect_type == "crack")
    validate_pair(good)
    image, mask = load_sample(good, size=16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert mask is not None and mask.shape == (16, 16) and mask.sum() == 16


def test_load_batch_stacks_and_fills_missing_masks(mvtec: Path) -> None:
    samples = load_samples("mvtec_ad", mvtec, ["bottle"])
    images, masks = load_batch(samples, size=4)
    assert images.shape == (9, 4, 4, 3) and images.dtype == np.uint8
    assert masks.shape == (9, 4, 4) and masks.dtype == np.bool_
    assert not masks[:5].any() and all(m.any() for m in masks[5:])


@pytest.fixture
def loco(tmp_path: Path) -> Path:
    base = tmp_path / "juice_bottle"
    for i in range(3):
        _image(base / "train" / "good" / f"{i:03d}.png")
    _image(base / "validation" / "good" / "000.png")
    _image(base / "test" / "good" / "000.png")
    for defect in ("logical_anomalies", "structural_anomalies"):
        for i in range(2):
            _image(base / "test" / defect / f"{i:03d}.png")
            first = np.zeros((8, 8), dtype=bool)
            first[0, 0] = True
            save_mask(base / "ground_truth" / defect / f"{i:03d}" / "000.png", first)
    second = np.zeros((8, 8), dtype=bool)
    second[7, 7] = True
    save_mask(base / "ground_truth" / "logical_anomalies" / "001" / "001.png", second)
    config = [{"defect_name": "missing_label", "pixel_value": 255, "saturation_threshold": 1000}]
    (base / "defects_config.json").write_text(json.dumps(config))
    return tmp_path


def test_mvtec_loco_masks_are_folders_read_as_union(loco: Path) -> None:
    samples = load_samples("mvtec_loco", loco)
    assert [s.split for s in samples].count("validation") == 1
    assert len(samples) == 3 + 1 + 1 + 4
    anomalies = [s for s in samples if s.label == 1]
    assert {s.defect_type for s in anomalies} == {"logical_anomalies", "structural_anomalies"}
    target = next(s for s in anomalies if s.defect_type == "logical_anomalies" and s.image_path.stem == "001")
    assert target.mask_path == loco / "juice_bottle" / "ground_truth" / "logical_anomalies" / "001"
    _, mask = load_sample(target)
    assert mask is not None and mask.sum() == 2 and mask[0, 0] and mask[7, 7]
    assert loco_defects_config(loco, "juice_bottle")[0]["defect_name"] == "missing_label"
    assert loco_defects_config(loco, "absent") == []


def test_mvtec_loco_missing_mask_folder(loco: Path) -> None:
    folder = loco / "juice_bottle" / "ground_truth" / "structural_anomalies" / "000"
    (folder / "000.png").unlink()
    folder.rmdir()
    with pytest.raises(DataError, match=r"missing mask folder .*structural_anomalies.000"):
        load_samples("mvtec_loco", loco)


def _visa_raw(root: Path, normals: int = 10, anomalies: int = 3) -> None:
    data = root / "candle" / "Data"
    for i in range(normals):
        _image(data / "Images" / "Normal" / f"{i:04d}.JPG")
    for i in range(anomalies):
        _image(data / "Images" / "Anomaly" / f"{i:03d}.JPG")
        _mask(data / "Masks" / "Anomaly" / f"{i:03d}.png")


def test_visa_raw_layout_splits_normals_deterministically(tmp_path: Path) -> None:
    _visa_raw(tmp_path)
    samples = load_samples("visa", tmp_path)
    test_normals = [s.image_path.name for s in samples if s.split == "test" and s.label == 0]
    assert test_normals == ["0004.JPG", "0009.JPG"]
    assert sum(s.split == "train" for s in samples) == 8
    anomalies = [s for s in samples if s.label == 1]
    assert len(anomalies) == 3 and all(s.defect_type == "anomaly" and s.split == "test" for s in anomalies)
    assert anomalies[0].mask_path == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "000.png"
    assert list_categories("visa", tmp_path) == ["candle"]
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "002.png").unlink()
    with pytest.raises(DataError, match=r"missing mask .*Anomaly.002.png"):
        load_samples("visa", tmp_path)


def test_visa_split_csv(tmp_path: Path) -> None:
    _visa_raw(tmp_path, normals=4, anomalies=2)
    rows = ["object,split,label,image,mask"]
    rows += [f"candle,train,normal,candle/Data/Images/Normal/{i:04d}.JPG," for i in range(3)]
    rows += ["candle,test,normal,candle/Data/Images/Normal/0003.JPG,"]
    rows += [
        f"candle,test,anomaly,candle/Data/Images/Anomaly/{i:03d}.JPG,candle/Data/Masks/Anomaly/{i:03d}.png"
        for i in range(2)
    ]
    (tmp_path / "split_csv").mkdir()
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    samples = load_samples("visa", tmp_path, ["candle"])
    assert [(s.split, s.label) for s in samples] == [("train", 0)] * 3 + [("test", 0)] + [("test", 1)] * 2
    assert samples[-1].mask_path == tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "001.png"
    with pytest.raises(DataError, match=r"unknown visa category 'pcb1'.*known: candle"):
        load_samples("visa", tmp_path, ["pcb1"])
    csv_path.write_text("\n".join([*rows, "candle,test,broken,candle/Data/Images/Anomaly/000.JPG,"]) + "\n")
    with pytest.raises(DataError, match=r"1cls.csv line 8: label must be normal or anomaly"):
        load_samples("visa", tmp_path)
    csv_path.write_text("\n".join([*rows, "candle,train,normal,candle/Data/Images/Normal/9999.JPG,"]) + "\n")
    with pytest.raises(DataError, match=r"image file not found: .*9999.JPG"):
        load_samples("visa", tmp_path)
    csv_path.write_text("object,split,image\n")
    with pytest.raises(DataError, match=r"lacks the column\(s\) label, mask"):
        load_samples("visa", tmp_path)


def test_folder_structured_with_optional_masks(tmp_path: Path) -> None:
    base = tmp_path / "widget"
    for i in range(2):
        _image(base / "train" / "good" / f"{i}.png")
        _image(base / "test" / "dent" / f"{i}.png")
    _image(base / "test" / "good" / "0.png")
    _mask(base / "ground_truth" / "dent" / "0_mask.png")
    for root in (tmp_path, base):  # ROOT of categories, or ROOT itself a category
        samples = load_samples("folder", root)
        assert len(samples) == 5 and {s.category for s in samples} == {"widget"}
        dents = [s for s in samples if s.defect_type == "dent"]
        assert [s.mask_path is not None for s in dents] == [True, False]


def test_folder_minimal_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiles"
    for i in range(10):
        _image(root / "good" / f"{i:02d}.png")
    for i in range(3):
        _image(root / "scratch" / f"{i}.png")
    _mask(root / "ground_truth" / "scratch" / "1.png")
    samples = load_samples("folder", root)
    assert {s.category for s in samples} == {"tiles"}
    assert sum(s.split == "train" for s in samples) == 8
    assert sum(s.split == "test" and s.label == 0 for s in samples) == 2
    scratches = [s for s in samples if s.label == 1]
    assert [s.defect_type for s in scratches] == ["scratch"] * 3
    assert [s.mask_path for s in scratches] == [None, root / "ground_truth" / "scratch" / "1.png", None]
    assert list_categories("folder", tmp_path) == ["tiles"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no folder categories found"):
        load_samples("folder", tmp_path / "empty")


@pytest.mark.skipif(not (SHARED_DATA / "deeppcb").is_dir(), reason="the shared DeepPCB subset is absent")
def test_real_deeppcb_loads_through_the_mvtec_ad_loader() -> None:
    samples = load_samples("mvtec_ad", SHARED_DATA, ["deeppcb"])
    counts = {(s.split, s.defect_type): 0 for s in samples}
    for s in samples:
        counts[(s.split, s.defect_type)] += 1
    assert counts == {("train", "good"): 200, ("test", "good"): 60, ("test", "pcb_defect"): 60}
    anomaly: Sample = next(s for s in samples if s.label == 1)
    validate_pair(anomaly)
    image, mask = load_sample(anomaly, size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert mask is not None and mask.any()

"""The built-in demo dataset: layout, determinism, exact anomaly masks, disjoint train/test pixels."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import kka_synth.data.demo as demo_module
from kka_synth.data import (
    DEMO_CATEGORIES,
    DEMO_DEFECT_TYPES,
    DataError,
    build_demo,
    demo_root,
    list_categories,
    load_mask,
    load_rgb,
    load_samples,
)
from kka_synth.data.demo_generator import demo_pair


def _digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_root(tmp_path_factory.mktemp("cache"))


def test_demo_layout_loads_with_the_mvtec_ad_loader(demo: Path) -> None:
    assert demo.name == "demo-v1" and demo.parent.name == "datasets"
    assert list_categories("mvtec_ad", demo) == sorted(DEMO_CATEGORIES) == ["brick", "washer"]
    samples = load_samples("mvtec_ad", demo)
    for category in DEMO_CATEGORIES:
        mine = [s for s in samples if s.category == category]
        assert sum(s.split == "train" for s in mine) == 80
        assert sum(s.split == "test" and s.label == 0 for s in mine) == 16
        anomalies = [s for s in mine if s.label == 1]
        assert len(anomalies) == 24
        assert {s.defect_type for s in anomalies} == set(DEMO_DEFECT_TYPES[category])
        for s in anomalies:
            mask = load_mask(s.mask_path)
            assert mask.shape == (128, 128) and mask.any()
    image = load_rgb(samples[0].image_path)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    notes = (demo / "README.txt").read_text() + (demo / "LICENSE.txt").read_text()
    assert "CC0" in notes and "scikit-image" in notes


def test_demo_dataset_name_resolves_to_the_same_tree(demo: Path) -> None:
    cache = demo.parent.parent
    via_dataset = load_samples("demo", cache, ["washer"])
    assert via_dataset == load_samples("mvtec_ad", demo, ["washer"])
    with pytest.raises(DataError, match=r"unknown mvtec_ad category 'tile'.*known: brick, washer"):
        load_samples("demo", cache, ["tile"])


def test_rebuild_is_byte_identical(demo: Path, tmp_path: Path) -> None:
    again = build_demo(tmp_path / "again")
    assert _digest(again) == _digest(demo)
    assert demo_root(demo.parent.parent) == demo  # a finished build is reused


def test_test_normals_share_no_pixels_with_training_crops(demo: Path) -> None:
    def images(folder: Path) -> list[np.ndarray]:
        return [load_rgb(p) for p in sorted(folder.glob("*.png"))]

    brick = demo / "brick"
    train, test = images(brick / "train" / "good"), images(brick / "test" / "good")
    assert not any(np.array_equal(a, b) for a in train for b in test)

    # The 32x32 centre of each test normal, mirrored or not, is found nowhere in any training image:
    # the best match anywhere differs by more than 1 grey level squared per value on average (an exact
    # copy scores about 0; float32 accumulation in OpenCV leaves a few units over the whole patch).
    # Control: a training image's own centre is found, so the check can fail.
    def best_match(patch: np.ndarray) -> float:
        return min(float(cv2.matchTemplate(t, patch, cv2.TM_SQDIFF).min()) for t in train) / patch.size

    assert best_match(np.ascontiguousarray(train[3][48:80, 48:80])) < 1.0
    for image in test:
        patch = image[48:80, 48:80]
        for variant in (patch, np.ascontiguousarray(patch[:, ::-1])):
            assert best_match(np.ascontiguousarray(variant)) > 1.0
    washer = demo / "washer"
    washer_train, washer_test = images(washer / "train" / "good"), images(washer / "test" / "good")
    assert not any(np.array_equal(a, b) for a in washer_train for b in washer_test)


@pytest.mark.parametrize("category", DEMO_CATEGORIES)
def test_anomalies_change_pixels_only_inside_their_masks(category: str) -> None:
    for defect in DEMO_DEFECT_TYPES[category]:
        for index in range(3):
            normal, anomalous, mask = demo_pair(category, defect, index)
            changed = np.any(normal != anomalous, axis=-1)
            assert mask.dtype == np.bool_ and mask.shape == (128, 128)
            assert changed.any()
            name = f"{category}/{defect}/{index}"
            assert not np.any(changed & ~mask), f"{name} changed pixels outside its mask"
            assert changed.sum() >= 0.3 * mask.sum(), f"{name}: the mask is much larger than the edit"
    with pytest.raises(DataError, match="unknown demo defect"):
        demo_pair(category, "rust", 0)


def test_interrupted_build_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_build(dest: Path) -> Path:
        (Path(dest) / "brick").mkdir()
        raise DataError("disk full")

    monkeypatch.setattr(demo_module, "build_demo", broken_build)
    with pytest.raises(DataError, match="disk full"):
        demo_root(tmp_path)
    datasets = tmp_path / "datasets"
    assert list(datasets.iterdir()) == []  # no final folder and no temporary leftover

    (datasets / "demo-v1" / "brick").mkdir(parents=True)  # a foreign, incomplete folder is never trusted
    with pytest.raises(DataError, match="not a complete demo dataset"):
        demo_root(tmp_path)


def test_demo_generator_does_not_use_the_renderers() -> None:
    for module in (demo_module.__file__, Path(demo_module.__file__).with_name("demo_generator.py")):
        tree = ast.parse(Path(module).read_text())
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not any(name.startswith("kka_synth.synth") for name in imported)

"""Hugging Face dataset mirrors, offline: tiny datasets in parquet or save_to_disk folders, loaded by path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kka_synth.config import DataConfig
from kka_synth.data import DataError, list_categories, load_mask, load_rgb, load_samples
from kka_synth.data import hf_mirror as hf

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)


def _box() -> np.ndarray:
    mask = np.zeros((12, 10), dtype=np.uint8)
    mask[3:6, 2:8] = 255
    return mask


FEATURES = {
    "image": datasets.Image(),
    "mask": datasets.Image(),
    "label": datasets.ClassLabel(names=["good", "anomaly"]),
    "category": datasets.Value("string"),
    "defect_type": datasets.Value("string"),
}


def _table(rows: list[tuple[int, str, int, str]], features: dict = FEATURES) -> datasets.Dataset:
    """rows of (seed, category, label, defect_type); anomalies get the box mask."""
    data = {
        "image": [Image.fromarray(_pixels(seed)) for seed, *_ in rows],
        "mask": [Image.fromarray(_box()) if label else None for _, _, label, _ in rows],
        "label": [label for *_, label, _ in rows],
        "category": [category for _, category, *_ in rows],
        "defect_type": [defect for *_, defect in rows],
    }
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


TRAIN = [(0, "bottle", 0, "good"), (1, "bottle", 0, "good"), (2, "screw", 0, "good")]
TEST = [(10, "bottle", 1, "crack"), (11, "bottle", 0, "good"), (12, "screw", 1, "thread")]


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    """A local folder of parquet files with the mirror's own train and test splits."""
    folder = tmp_path / "mvtec-mini"
    (folder / "data").mkdir(parents=True)
    _table(TRAIN).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    _table(TEST).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    return folder


def test_parquet_mirror_by_path(tmp_path: Path, mirror: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    samples = load_samples(f"hf:{mirror}", root)
    assert [(s.category, s.split, s.label, s.defect_type) for s in samples] == [
        ("bottle", "train", 0, "good"),
        ("bottle", "train", 0, "good"),
        ("bottle", "test", 0, "good"),
        ("bottle", "test", 1, "crack"),
        ("screw", "train", 0, "good"),
        ("screw", "test", 1, "thread"),
    ]
    seeds = [0, 1, 11, 10, 2, 12]
    for sample, seed in zip(samples, seeds, strict=True):
        assert sample.image_path.suffix == ".png" and sample.image_path.is_relative_to(root / "mvtec-mini")
        assert np.array_equal(load_rgb(sample.image_path), _pixels(seed))
        assert (sample.mask_path is None) == (sample.label == 0)
    crack = samples[3]
    assert np.array_equal(load_mask(crack.mask_path), _box() > 0)
    assert set(np.unique(np.asarray(Image.open(crack.mask_path))).tolist()) == {0, 255}

    def _no_writes(*args: object) -> None:
        raise AssertionError("a cached image was written again")

    monkeypatch.setattr(hf, "_save_image", _no_writes)
    assert load_samples(f"hf:{mirror}", root) == samples  # same fingerprint + row: the cached files
    assert load_samples(f"hf:{mirror}", root, ["screw"]) == [s for s in samples if s.category == "screw"]
    assert list_categories(f"hf:{mirror}", root) == ["bottle", "screw"]
    with pytest.raises(DataError, match="unknown category 'cable'"):
        load_samples(f"hf:{mirror}", root, ["cable"])


def test_mapped_columns_split_column_and_jpeg(tmp_path: Path) -> None:
    jpeg = io.BytesIO()
    Image.fromarray(_pixels(5)).save(jpeg, format="JPEG", quality=95)
    table = datasets.Dataset.from_dict(
        {
            "img": [Image.fromarray(_pixels(4)), {"bytes": jpeg.getvalue(), "path": None}],
            "gt": [None, Image.fromarray(_box())],
            "is_anomalous": [False, True],
            "subset": ["train", "test"],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "gt": datasets.Image(),
                "is_anomalous": datasets.Value("bool"),
                "subset": datasets.Value("string"),
            }
        ),
    )
    path = tmp_path / "tiles.parquet"
    table.to_parquet(str(path))
    columns = DataConfig(
        dataset=f"hf:{path}",
        hf_columns={"image": "img", "mask": "gt", "label": "is_anomalous", "split": "subset"},
    ).hf_columns
    samples = load_samples(f"hf:{path}", tmp_path / "images", None, columns)
    assert [(s.category, s.split, s.label, s.defect_type) for s in samples] == [
        ("tiles", "train", 0, "good"),
        ("tiles", "test", 1, "anomaly"),
    ]
    decoded = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))
    assert samples[1].image_path.read_bytes().startswith(b"\x89PNG")  # re-encoded losslessly as PNG
    assert np.array_equal(load_rgb(samples[1].image_path), decoded)
    with pytest.raises(DataError, match="column 'image' is missing"):
        load_samples(f"hf:{path}", tmp_path / "images")  # default column names do not fit this mirror


def test_save_to_disk_mirror_and_errors(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": _table(TRAIN), "test": _table(TEST)}).save_to_disk(str(disk))
    assert len(load_samples(f"hf:{disk}", tmp_path / "images")) == 6

    bad = tmp_path / "bad"
    datasets.DatasetDict({"train": _table(TRAIN + TEST[:1])}).save_to_disk(str(bad))
    with pytest.raises(DataError, match="row 3: an anomalous train image"):
        load_samples(f"hf:{bad}", tmp_path / "images")
    odd = tmp_path / "odd"
    datasets.DatasetDict({"holdout": _table(TRAIN)}).save_to_disk(str(odd))
    with pytest.raises(DataError, match="split 'holdout' is none of train, validation, test"):
        load_samples(f"hf:{odd}", tmp_path / "images")
    with pytest.raises(
        DataError, match="cannot load the Hub dataset 'kka-synth-test/no-such-mirror'"
    ) as error:
        load_samples("hf:kka-synth-test/no-such-mirror", tmp_path / "images")
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="unknown dataset 'hf:'"):
        load_samples("hf:", None)

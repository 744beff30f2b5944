"""VFM detector: LoRA scope, training, map sizes, persistence, a planted defect, the pieces by hand."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from kka_synth.config import ConfigError
from kka_synth.detectors import DETECTORS
from kka_synth.detectors.vfm import VfmConfig, VfmDetector
from kka_synth.detectors.vfm.model import AnomalyHead, MomentAccumulator, mahalanobis
from kka_synth.detectors.vfm.train import (
    PasteAcross,
    confidence_loss,
    geometric_shape,
    patch_labels,
    stage_steps,
    texture_noise,
)
from kka_synth.types import DetectorOutput, SyntheticStage
from kka_synth.utils.hub import ModelLoadError

SIDE = 64
TINY_SHAPE = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DINOv2 saved to disk, so that the detector loads it through from_pretrained(path)."""
    folder = tmp_path_factory.mktemp("dinov2-tiny")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY_SHAPE, patch_size=8, image_size=SIDE)).save_pretrained(folder)
    return folder


def tiny(model_dir: Path, **changes: object) -> VfmConfig:
    base = VfmConfig(
        model=str(model_dir), image_size=SIDE, layers=[1, 2], head_widths=[16], lora_rank=4, lora_alpha=8.0,
        steps=8, batch_size=4, eval_batch_size=3, lr=5e-3, lora_lr=5e-3, smooth_sigma=2.0, top_k=0.02,
        calibration_share=0.2,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _flat(count: int, seed: int = 0) -> list[np.ndarray]:
    """Flat grey texture with mild noise."""
    rng = np.random.default_rng(seed)
    return [np.clip(128 + rng.normal(0, 6, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8) for _ in range(count)]


def paint_square(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright 16 x 16 square at a random place: the draw function of a rule stage."""
    y, x = (int(v) for v in rng.integers(0, image.shape[0] - 16, size=2))
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y : y + 16, x : x + 16] = True
    out = image.copy()
    out[mask] = 250
    return out, mask


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    return _flat(10)


@pytest.fixture(scope="module")
def fitted(model_dir: Path, normals: list[np.ndarray]) -> VfmDetector:
    detector = VfmDetector(tiny(model_dir, steps=30))
    detector.fit(normals, [SyntheticStage("rule", draw=paint_square)])
    return detector


def _planted() -> tuple[np.ndarray, np.ndarray]:
    image = _flat(1, seed=7)[0]
    image[20:36, 28:44] = 250
    mask = np.zeros((SIDE, SIDE), dtype=bool)
    mask[20:36, 28:44] = True
    return image, mask


# ------------------------------------------------------------------------------------------- training
def test_lora_changes_only_adapter_and_head_parameters(fitted: VfmDetector, model_dir: Path) -> None:
    assert fitted.backbone is not None and fitted.head is not None and fitted.backbone.has_lora
    pretrained = Dinov2Model.from_pretrained(model_dir).state_dict()
    base = fitted.backbone.model.get_base_model()
    trainable = {name for name, p in fitted.backbone.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    lora_b = [p for name, p in fitted.backbone.named_parameters() if ".lora_B." in name]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it
    checked = 0
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(tensor, pretrained[key]), name
        checked += 1
    assert checked == len(pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(fitted.config.seed + 3)
        initial = AnomalyHead(fitted.backbone.hidden_size, fitted.config.head_widths)
    before, after = initial.state_dict(), fitted.head.state_dict()
    assert not all(torch.equal(before[key], after[key]) for key in before)


def test_training_lowers_the_loss(fitted: VfmDetector) -> None:
    losses = [record["loss"] for record in fitted.history]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert all(record["stage"] == "rule" for record in fitted.history)


def test_stages_run_in_order_and_unmasked_entries_are_skipped(
    model_dir: Path, normals: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    masked = [(*paint_square(image, rng), None) for image in normals[:3]]
    unmasked = [(paint_square(image, rng)[0], None, None) for image in normals[3:5]]
    stages = [
        SyntheticStage("rule", draw=paint_square, share=0.5),
        SyntheticStage("kka", anomalies=masked + unmasked, share=0.25),  # type: ignore[arg-type]
    ]
    calls: list[tuple[int, int]] = []
    detector = VfmDetector(
        tiny(model_dir, steps=8, anomaly_prob=1.0), progress=lambda done, total: calls.append((done, total))
    )
    with caplog.at_level(logging.WARNING, logger="kka_synth.detectors.vfm"):
        detector.fit(normals, stages)
    assert [record["stage"] for record in detector.history] == ["rule"] * 4 + ["kka"] * 2
    assert all(record["positives"] >= 4 for record in detector.history)  # every item is an anomaly
    assert calls == [(i, 6) for i in range(1, 7)]
    assert detector.skipped_unmasked == 2 and "2 anomalies without a mask skipped" in caplog.text
    assert any("without a mask" in note for note in detector.notes)


def test_no_synthetic_set_uses_the_builtin_stages_when_asked(
    model_dir: Path, normals: list[np.ndarray]
) -> None:
    detector = VfmDetector(tiny(model_dir, steps=6, builtin_anomalies=True))
    detector.fit(normals, None)
    assert [record["stage"] for record in detector.history] == ["noise"] * 2 + ["shapes"] * 2 + ["paste"] * 2
    assert any("built-in" in note for note in detector.notes)


def test_no_synthetic_set_trains_nothing_by_default(model_dir: Path, normals: list[np.ndarray]) -> None:
    detector = VfmDetector(tiny(model_dir, steps=6))
    detector.fit(normals, None)
    assert detector.history == [] and detector.head is None
    assert any("distance alone" in note for note in detector.notes)
    assert detector.predict(normals[:1]).anomaly_map.shape[1:] == normals[0].shape[:2]


# -------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("shape", [(SIDE, SIDE), (40, 90), (100, 70)])
def test_maps_have_the_input_size(fitted: VfmDetector, shape: tuple[int, int]) -> None:
    images = [np.resize(image, (*shape, 3)) for image in _flat(3, seed=3)]
    out = fitted.predict(images)
    assert isinstance(out, DetectorOutput)
    assert out.pred_score.shape == (3,) and out.anomaly_map.shape == (3, *shape)
    assert out.pred_score.dtype == np.float32 and out.anomaly_map.dtype == np.float32
    assert np.isfinite(out.pred_score).all() and np.isfinite(out.anomaly_map).all()


@pytest.mark.parametrize("changes", [{}, {"steps": 0, "head_weight": 0.0}, {"scorer": "knn", "steps": 0,
                                                                          "head_weight": 0.0}])  # fmt: skip
def test_planted_square_peaks_inside(
    fitted: VfmDetector, model_dir: Path, normals: list[np.ndarray], changes: dict[str, object]
) -> None:
    detector = fitted
    if changes:
        detector = VfmDetector(tiny(model_dir, **changes))
        detector.fit(normals, None)
    image, mask = _planted()
    out = detector.predict([image, *_flat(3, seed=9)])
    peak = np.unravel_index(np.argmax(out.anomaly_map[0]), mask.shape)
    assert mask[peak]
    assert out.pred_score[0] > out.pred_score[1:].max()


def test_save_load_round_trip(fitted: VfmDetector, tmp_path: Path) -> None:
    fitted.save(tmp_path / "vfm")
    assert sorted(p.name for p in (tmp_path / "vfm").iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(str(tmp_path / "vfm" / "model.safetensors"))
    assert {key.split(".")[0] for key in stored} == {"lora", "head", "distance", "scales"}  # no backbone
    assert not any("base_layer" in key or "embeddings" in key for key in stored)
    loaded = VfmDetector.load(tmp_path / "vfm")
    assert loaded.config == fitted.config and loaded.size == fitted.size and loaded.layers == fitted.layers
    images = [_planted()[0], *_flat(2, seed=11)]
    before, after = fitted.predict(images), loaded.predict(images)
    np.testing.assert_array_equal(after.pred_score, before.pred_score)
    np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)


def test_random_backbone_knn_and_registers_round_trip(
    normals: list[np.ndarray], tmp_path: Path, model_dir: Path
) -> None:
    registers = tmp_path / "registers"
    config = Dinov2WithRegistersConfig(**TINY_SHAPE, patch_size=8, image_size=SIDE, num_register_tokens=4)
    torch.manual_seed(1)
    Dinov2WithRegistersModel(config).save_pretrained(registers)
    cases = {
        "random": VfmConfig(image_size=SIDE, layers=[-1], steps=2, batch_size=2, head_widths=[8], seed=5),
        "knn": tiny(model_dir, scorer="knn", memory_size=50, knn_k=3, steps=2),
        "registers": tiny(registers, steps=2),
    }
    images = [_planted()[0], *_flat(2, seed=13)]
    for name, config in cases.items():
        detector = VfmDetector(config)
        detector.fit(normals, [SyntheticStage("rule", draw=paint_square)])
        detector.save(tmp_path / "saved" / name)
        loaded = VfmDetector.load(tmp_path / "saved" / name)
        np.testing.assert_array_equal(
            loaded.predict(images).anomaly_map, detector.predict(images).anomaly_map
        )
        assert ("random" in " ".join(detector.notes)) == (name == "random")
    knn = VfmDetector.load(tmp_path / "saved" / "knn").distance
    assert knn is not None and knn.tensors["memory.2"].shape == (50, 32)


def test_same_seed_same_maps_and_no_global_random_state(model_dir: Path, normals: list[np.ndarray]) -> None:
    def run(seed: int) -> np.ndarray:
        detector = VfmDetector(tiny(model_dir, steps=3, seed=seed))
        detector.fit(normals, None)
        return detector.predict([_planted()[0]]).anomaly_map

    state = torch.random.get_rng_state()
    first, second, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------------------------- pieces by hand
def test_streamed_ledoit_wolf_matches_sklearn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) + 3.0
    accumulator = MomentAccumulator(12)
    for chunk in np.array_split(x, 7):
        accumulator.update(torch.from_numpy(chunk).float())
    mean, shrunk, shrinkage = accumulator.gaussian()
    reference = covariance.LedoitWolf().fit(x.astype(np.float32).astype(np.float64))
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-4)
    np.testing.assert_allclose(shrunk.numpy(), reference.covariance_, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean.numpy(), x.mean(axis=0), rtol=1e-5)
    _, fixed, used = accumulator.gaussian(shrinkage=1.0)
    assert used == 1.0 and torch.allclose(fixed, fixed.diagonal().mean() * torch.eye(12, dtype=fixed.dtype))


def test_mahalanobis_by_hand() -> None:
    mean = torch.tensor([1.0, 2.0])
    precision = torch.tensor([[4.0, 0.0], [0.0, 0.25]])  # variances 1/4 and 4
    x = torch.tensor([[2.0, 2.0], [1.0, 6.0], [0.0, 0.0]])
    expected = torch.tensor([4.0, 4.0, 4.0 + 1.0])
    assert torch.allclose(mahalanobis(x, mean, precision), expected)


def test_patch_labels_and_confidence_loss_by_hand() -> None:
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0:2, 0:2] = True  # patch (0, 0) fully covered
    masks[0, 2, 2] = True  # patch (1, 1) covered by 1 / 4
    masks[0, 0, 3] = True  # patch (0, 1) covered by 1 / 4
    labels = patch_labels(masks, 2, positive_coverage=0.5)
    assert labels.tolist() == [[1, -1, 0, -1]]
    logits = torch.tensor([[2.0, 5.0, -1.0, 7.0]])
    t = 2.0
    expected = np.log1p(np.exp(-2.0 / t)) + np.log1p(np.exp(-1.0 / t))
    assert confidence_loss(logits, labels, t).item() == pytest.approx(expected, rel=1e-6)
    only_negatives = torch.tensor([[0, 0, -1, -1]])
    assert confidence_loss(logits, only_negatives, 1.0).item() == pytest.approx(
        (np.log1p(np.exp(2.0)) + np.log1p(np.exp(5.0))) / 2, rel=1e-6
    )


def test_stage_steps_by_hand() -> None:
    def stages(*shares: float) -> list[SyntheticStage]:
        return [SyntheticStage(f"s{i}", draw=paint_square, share=s) for i, s in enumerate(shares)]

    assert stage_steps(stages(1 / 3, 1 / 3, 1 / 3), 10) == [3, 4, 3]
    assert stage_steps(stages(0.5, 0.25), 8) == [4, 2]


@pytest.mark.parametrize("name", ["noise", "shapes", "paste"])
def test_builtin_anomalies_change_only_their_mask(name: str, normals: list[np.ndarray]) -> None:
    draw = {"noise": texture_noise, "shapes": geometric_shape, "paste": PasteAcross(normals)}[name]
    for seed in range(5):
        image, mask = draw(normals[0], np.random.default_rng(seed))
        again, _ = draw(normals[0], np.random.default_rng(seed))
        assert image.dtype == np.uint8 and image.shape == normals[0].shape
        assert mask.dtype == np.bool_ and mask.any() and not mask.all()
        assert np.array_equal(image[~mask], normals[0][~mask]) and not np.array_equal(image, normals[0])
        assert np.array_equal(image, again)


# ------------------------------------------------------------------------------------ registry, errors
def test_registered_with_profiles() -> None:
    assert DETECTORS["vfm"] is VfmDetector
    assert VfmConfig(**VfmDetector.profiles["offline"]) == VfmConfig()  # the defaults are offline
    assert VfmDetector.profiles["hub"]["model"] == "facebook/dinov2-base"


def test_bad_inputs_raise_clear_errors(
    model_dir: Path, normals: list[np.ndarray], fitted: VfmDetector
) -> None:
    stage = [SyntheticStage("rule", draw=paint_square)]
    detector = VfmDetector(tiny(model_dir))
    cases = [
        ([], stage, "at least one image"),
        ([normals[0].astype(np.float32)], stage, r"normal\[0\] must be an RGB uint8"),
        (normals[0], stage, "must be a list"),
        (normals, [], "non-empty list"),
        (normals, [SyntheticStage("kka", anomalies=[(normals[0], np.zeros((8, 8), bool), None)])], "mask"),
        (
            normals,
            [SyntheticStage("a", draw=paint_square), SyntheticStage("b", draw=paint_square)],
            "more than",
        ),
    ]
    for images, synthetic, message in cases:
        with pytest.raises(ValueError, match=message):
            detector.fit(images, synthetic)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the patch"):
        VfmDetector(tiny(model_dir, image_size=60)).fit(normals, stage)
    with pytest.raises(ValueError, match="outside the backbone"):
        VfmDetector(tiny(model_dir, layers=[3])).fit(normals, stage)
    with pytest.raises(ValueError, match="share one size"):
        fitted.predict([normals[0], normals[0][:40]])
    with pytest.raises(RuntimeError, match="before fit"):
        VfmDetector(tiny(model_dir)).predict(normals)
    with pytest.raises(ModelLoadError, match="vfm.model"):
        VfmDetector(tiny(model_dir, model=str(model_dir / "missing"))).fit(normals, stage)


@pytest.mark.parametrize(
    "changes",
    [{"random_arch": "huge"}, {"layers": [0]}, {"lora_rank": -1}, {"steps": 0}, {"scorer": "pca"},
     {"shrinkage": 1.5}, {"top_k": 0.0}, {"distance_weight": 0.0, "head_weight": 0.0}, {"temperature": 0.0}],
)  # fmt: skip
def test_config_checks(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="vfm\\."):
        VfmConfig(**changes)  # type: ignore[arg-type]


def test_load_rejects_a_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no VFM detector"):
        VfmDetector.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"detector": "draem"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="does not describe"):
        VfmDetector.load(tmp_path)

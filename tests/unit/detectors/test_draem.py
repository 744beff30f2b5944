"""DRAEM detector: model shapes, losses by hand, the training schedule, persistence, determinism, errors."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data
from torch.nn import functional as F

from kka_synth.config import ConfigError
from kka_synth.detectors import DETECTORS
from kka_synth.detectors.draem import DraemConfig, DraemDetector
from kka_synth.detectors.draem.model import DraemModel
from kka_synth.detectors.draem.train import focal_loss, ssim_loss, stage_steps
from kka_synth.synth.base import RenderError
from kka_synth.types import DetectorOutput, SyntheticStage

TINY = DraemConfig(
    recon_width=4, disc_width=4, image_size=None, crop=None, steps=6, batch_size=2, eval_batch_size=3, lr=1e-2
)


def tiny(**changes: object) -> DraemConfig:
    return dataclasses.replace(TINY, **changes)


def _brick(count: int, side: int = 32, offset: int = 0) -> list[np.ndarray]:
    sheet = np.repeat(data.brick()[..., None], 3, axis=2)
    return [
        np.ascontiguousarray(sheet[offset + 37 * i : offset + 37 * i + side, 40 : 40 + side])
        for i in range(count)
    ]


def paint_square(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bright 8x8 square at a random place: the draw function of a rule stage."""
    y, x = (int(v) for v in rng.integers(0, image.shape[0] - 8, size=2))
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y : y + 8, x : x + 8] = True
    out = image.copy()
    out[mask] = (250, 40, 40)
    return out, mask


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    return _brick(8)


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    clean = _brick(4, offset=300)
    return clean + [paint_square(image, rng)[0] for image in clean]


@pytest.fixture(scope="module")
def fitted(normals: list[np.ndarray]) -> DraemDetector:
    detector = DraemDetector(tiny(steps=40))
    detector.fit(normals, [SyntheticStage("rule", draw=paint_square)])
    return detector


@pytest.fixture(scope="module")
def fitted_none(normals: list[np.ndarray]) -> DraemDetector:
    detector = DraemDetector(tiny(steps=20))
    detector.fit(normals, None)
    return detector


def _initial_model(config: DraemConfig) -> DraemModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return DraemModel(config.recon_width, config.disc_width)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# ----------------------------------------------------------------------------------------------------- model
def test_model_shapes() -> None:
    model = DraemModel(recon_width=2, disc_width=3).eval()
    reconstruction, logits = model(torch.rand(2, 3, 64, 96))
    assert reconstruction.shape == (2, 3, 64, 96) and logits.shape == (2, 2, 64, 96)
    assert model.stride == 32
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(2, 3, 48, 64))


def test_registered() -> None:
    assert DETECTORS["draem"] is DraemDetector
    assert DraemConfig(**DraemDetector.profiles["offline"]) == DraemConfig()  # the defaults are offline
    assert (
        DraemDetector.profiles["hub"]["recon_width"] == 128
        and DraemDetector.profiles["hub"]["disc_width"] == 64
    )


# ---------------------------------------------------------------------------------------------------- losses
def test_ssim_loss_of_identical_images_is_zero() -> None:
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    assert abs(ssim_loss(x, x).item()) < 1e-6
    assert ssim_loss(x, x.flip(-1)).item() > 0.1


def test_ssim_loss_weight_leaves_out_masked_pixels() -> None:
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[..., 10:14, 10:14] = 1.0 - y[..., 10:14, 10:14]
    weight = torch.ones(1, 1, 32, 32)
    weight[..., 0:24, 0:24] = 0.0  # the window reaches 5 px around the change
    assert abs(ssim_loss(x, y, weight).item()) < 1e-6
    assert ssim_loss(x, y).item() > 0.01


def test_focal_loss_by_hand() -> None:
    # pixel 1: equal logits, target 1 -> p_t = 0.5; pixel 2: softmax (0.75, 0.25), target 0 -> p_t = 0.75
    logits = torch.tensor([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])  # (1, 1, 2)
    expected = (0.5**2 * -math.log(0.5) + 0.25**2 * -math.log(0.75)) / 2
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx(expected, rel=1e-6)
    cross_entropy = F.cross_entropy(logits, target).item()
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(cross_entropy, rel=1e-6)


def test_stage_steps_by_hand() -> None:
    def stages(*shares: float) -> list[SyntheticStage]:
        return [SyntheticStage(f"s{i}", draw=paint_square, share=s) for i, s in enumerate(shares)]

    assert stage_steps(stages(0.7, 0.3), 10) == [7, 3]
    assert stage_steps(stages(0.25, 0.25, 0.5), 10) == [2, 3, 5]  # cumulative rounding keeps the total
    assert stage_steps(stages(0.5, 0.25), 8) == [4, 2]  # shares below 1 train fewer steps


# -------------------------------------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_changes_the_weights(fitted: DraemDetector) -> None:
    losses = [record["loss"] for record in fitted.history]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    initial = _initial_model(fitted.config)
    assert fitted.model is not None
    assert not _same_weights(fitted.model.reconstructive, initial.reconstructive)
    assert not _same_weights(fitted.model.discriminative, initial.discriminative)
    assert fitted.mode == "draem" and fitted.size == (32, 32)


def test_none_mode_trains_only_the_reconstruction(fitted_none: DraemDetector) -> None:
    initial = _initial_model(fitted_none.config)
    assert fitted_none.model is not None and fitted_none.mode == "none"
    assert not _same_weights(fitted_none.model.reconstructive, initial.reconstructive)
    assert _same_weights(fitted_none.model.discriminative, initial.discriminative)
    assert {record["stage"] for record in fitted_none.history} == {"normal"}
    assert all(record["focal"] is None and record["anomalies"] == 0 for record in fitted_none.history)


def test_stages_run_in_order_for_their_shares(normals: list[np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    with_clean = [(*paint_square(image, rng), image) for image in normals[:3]]
    without_clean = [(*paint_square(image, rng), None) for image in normals[3:6]]
    stages = [
        SyntheticStage("rule", draw=paint_square, share=0.5),
        SyntheticStage("clean", anomalies=with_clean, share=0.25),  # type: ignore[arg-type]
        SyntheticStage("kka", anomalies=without_clean, share=0.125),  # type: ignore[arg-type]
    ]
    calls: list[tuple[int, int]] = []
    detector = DraemDetector(
        tiny(steps=8, anomaly_prob=1.0), progress=lambda done, total: calls.append((done, total))
    )
    detector.fit(normals, stages)
    assert [record["stage"] for record in detector.history] == ["rule"] * 4 + ["clean"] * 2 + ["kka"]
    assert all(record["anomalies"] == 2 for record in detector.history)  # every item became an anomaly
    assert calls == [(i, 7) for i in range(1, 8)]


def test_fixed_anomalies_of_another_size_are_resized(normals: list[np.ndarray]) -> None:
    big = _brick(2, side=64)
    rng = np.random.default_rng(2)
    anomalies = [(*paint_square(image, rng), None) for image in big]
    detector = DraemDetector(tiny(steps=2, anomaly_prob=1.0))
    detector.fit(normals, [SyntheticStage("kka", anomalies=anomalies)])  # type: ignore[arg-type]
    assert len(detector.history) == 2


def test_failed_draws_are_counted_not_fatal(
    normals: list[np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise RenderError("empty_mask", "the defect covers no pixel")

    detector = DraemDetector(tiny(steps=3, anomaly_prob=1.0))
    with caplog.at_level(logging.WARNING, logger="kka_synth.detectors.draem.train"):
        detector.fit(normals, [SyntheticStage("rule", draw=broken)])
    assert detector.render_errors == 6  # 3 steps x 2 items, each meant to be an anomaly
    assert all(record["anomalies"] == 0 for record in detector.history)
    assert "6 anomaly draws failed" in caplog.text


def test_training_on_crops(normals: list[np.ndarray]) -> None:
    detector = DraemDetector(tiny(steps=2, crop=32, image_size=64, anomaly_prob=1.0))
    detector.fit(normals, [SyntheticStage("rule", draw=paint_square)])
    assert detector.size == (64, 64)
    assert all(record["anomalies"] == 2 for record in detector.history)  # every crop holds its anomaly


# --------------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("side", [(32, 32), (30, 45), (70, 50)])
def test_predict_shapes_at_each_input_size(fitted: DraemDetector, side: tuple[int, int]) -> None:
    images = [np.resize(image, (*side, 3)) for image in _brick(5, side=max(side))]
    out = fitted.predict(images)
    assert isinstance(out, DetectorOutput)
    assert out.pred_score.shape == (5,) and out.anomaly_map.shape == (5, *side)
    assert out.pred_score.dtype == np.float32 and out.anomaly_map.dtype == np.float32
    assert np.isfinite(out.pred_score).all() and np.isfinite(out.anomaly_map).all()
    assert out.anomaly_map.min() >= 0.0 and out.anomaly_map.max() <= 1.0


def test_predict_scores_painted_squares_higher(fitted: DraemDetector, test_images: list[np.ndarray]) -> None:
    scores = fitted.predict(test_images).pred_score
    assert scores[4:].min() > scores[:4].max()


def test_odd_sized_training_images_are_resized() -> None:
    odd = [np.resize(image, (30, 45, 3)) for image in _brick(4, side=45)]
    detector = DraemDetector(tiny(steps=2))
    detector.fit(odd, [SyntheticStage("rule", draw=paint_square)])
    assert detector.size == (32, 32)
    assert detector.predict(odd[:2]).anomaly_map.shape == (2, 30, 45)


def test_save_load_round_trip(
    fitted: DraemDetector, fitted_none: DraemDetector, test_images: list[np.ndarray], tmp_path: Path
) -> None:
    for name, detector in (("draem", fitted), ("none", fitted_none)):
        detector.save(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["config.json", "model.safetensors"]
        loaded = DraemDetector.load(tmp_path / name)
        assert loaded.mode == name and loaded.size == detector.size and loaded.config == detector.config
        before, after = detector.predict(test_images), loaded.predict(test_images)
        np.testing.assert_array_equal(after.pred_score, before.pred_score)
        np.testing.assert_array_equal(after.anomaly_map, before.anomaly_map)


def test_same_seed_same_predictions_other_seed_differs(
    normals: list[np.ndarray], test_images: list[np.ndarray]
) -> None:
    def run(seed: int) -> np.ndarray:
        detector = DraemDetector(tiny(steps=4, seed=seed))
        detector.fit(normals, [SyntheticStage("rule", draw=paint_square)])
        return detector.predict(test_images).anomaly_map

    global_state = torch.random.get_rng_state()
    first, second, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # no global random state was used


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_error(normals: list[np.ndarray], fitted: DraemDetector) -> None:
    stage = [SyntheticStage("rule", draw=paint_square)]
    detector = DraemDetector(TINY)
    cases = [
        ([], stage, "at least one image"),
        ([normals[0].astype(np.float32)], stage, r"normal\[0\] must be an RGB uint8"),
        ([normals[0][..., 0]], stage, r"normal\[0\] must be an RGB uint8"),
        ([normals[0][..., :2]], stage, r"normal\[0\] must be an RGB uint8"),
        (normals[0], stage, "must be a list"),
        (normals, [], "non-empty list"),
        (normals, [SyntheticStage("kka", anomalies=[(normals[0], normals[0][..., 0] // 255, None)])], "bool"),
        (normals, [SyntheticStage("kka", anomalies=[(normals[0], np.zeros((8, 8), bool), None)])], "mask"),
        (
            normals,
            [SyntheticStage("a", draw=paint_square), SyntheticStage("b", draw=paint_square)],
            "more than 1",
        ),
    ]
    for images, synthetic, message in cases:
        with pytest.raises(ValueError, match=message):
            detector.fit(images, synthetic)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uint8"):
        fitted.predict([normals[0].astype(np.float64)])
    with pytest.raises(ValueError, match="share one size"):
        fitted.predict([normals[0], _brick(1, side=40)[0]])
    with pytest.raises(ValueError, match="crop"):
        DraemDetector(tiny(crop=64)).fit(normals, stage)
    with pytest.raises(RuntimeError, match="before fit"):
        DraemDetector(TINY).predict(normals)


@pytest.mark.parametrize(
    "changes",
    [{"image_size": 50}, {"crop": 48}, {"crop": 128, "image_size": 64}, {"steps": 0}, {"batch_size": 1},
     {"lr": 0.0}, {"anomaly_prob": 1.5}, {"recon_width": 0}, {"score_kernel": 0}],
)  # fmt: skip
def test_config_checks(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="draem\\."):
        DraemConfig(**changes)  # type: ignore[arg-type]


def test_load_rejects_a_foreign_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no DRAEM detector"):
        DraemDetector.load(tmp_path)
    (tmp_path / "config.json").write_text('{"detector": "other"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="does not describe"):
        DraemDetector.load(tmp_path)

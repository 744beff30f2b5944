"""Deep SAD head on frozen DINOv2 features: features, input size, dtype, cache, ranking, persistence, errors.

The backbone is a tiny random DINOv2 (2 blocks of width 32, 8-pixel patches) saved to a folder, so the real
``from_pretrained`` path runs; the input-size and dtype tests use one with DINOv2's own 14-pixel patches. A
random backbone sees little: on the demo brick texture a dark blob is just more dark texture to it, and blobs
under ~10% of the image barely move its global feature. The planted set therefore uses the demo washer (an
object on a plain background) with a dark disc over ~20% of a 64-pixel image, whose contrast grows from 0.1
to 1.0 in 12 levels.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from tiny_dinov2 import save_tiny_dinov2
from transformers import Dinov2Model

from kka_synth.alignment.deepsad import CENTER_EPS, EvaluatorInputError
from kka_synth.alignment.feature_sad import (
    Dinov2Features,
    FeatureDeepSADEvaluator,
    backbone_dtype,
    clear_feature_cache,
    dinov2_features,
)
from kka_synth.alignment.hardness import JudgeEvaluator, cross_fit_hardness
from kka_synth.config import ConfigError, EvaluatorConfig
from kka_synth.data.demo_generator import demo_normal
from kka_synth.utils.hub import ModelLoadError

SIDE = 64
RADIUS = 16
LEVELS = np.repeat(np.linspace(0.1, 1.0, 12), 2)  # contrast of the planted discs, two images per level


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2-tiny"))


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_feature_cache()
    yield
    clear_feature_cache()


def dino(model_dir: Path, **changes: object) -> EvaluatorConfig:
    base = {"pretrain_epochs": 5, "epochs": 20, "device": "cpu", "batch_size": 8}
    return EvaluatorConfig(name="deepsad-dinov2", model=str(model_dir), **{**base, **changes})


def _washer(split: str, index: int) -> np.ndarray:
    return cv2.resize(demo_normal("washer", split, index), (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def dark_disc(image: np.ndarray, contrast: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Darken a disc of RADIUS px at a random place by ``contrast`` (0 = unchanged, 1 = black)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(image.shape[:2], np.uint8)
    cy, cx = (int(v) for v in rng.integers(RADIUS + 2, SIDE - RADIUS - 2, size=2))
    cv2.circle(mask, (cx, cy), RADIUS, 1, -1)
    out = image.astype(np.float32)
    out[mask > 0] *= 1.0 - contrast
    return np.clip(out, 0, 255).astype(np.uint8), mask.astype(bool)


@pytest.fixture(scope="module")
def washer() -> dict[str, list[np.ndarray]]:
    planted = [dark_disc(_washer("train", 40 + j), c, 100 + j) for j, c in enumerate(LEVELS)]
    return {
        "normals": [_washer("train", i) for i in range(32)],
        "holdout": [_washer("test", i) for i in range(12)],
        "planted": [image for image, _ in planted],
        "planted_masks": [mask for _, mask in planted],
    }


def _count_forwards(model: torch.nn.Module) -> list[int]:
    """[number of forward calls of ``model`` from now on, then the batch size of each call]."""
    calls = [0]

    def hook(module, args, kwargs, output):
        calls[0] += 1
        calls.append(int(kwargs["pixel_values"].shape[0]))

    model.register_forward_hook(hook, with_kwargs=True)
    return calls


# ------------------------------------------------------------------------------------------- features
def test_features_are_the_pooled_cls_token_and_the_patch_mean(model_dir: Path, washer: dict) -> None:
    images = washer["normals"][:3]
    features = dinov2_features(dino(model_dir), size=SIDE)(images)
    assert features.shape == (3, 64) and features.dtype == torch.float32
    # by hand: resize (already 64), [0, 1], ImageNet normalisation, the model's own outputs
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        out = Dinov2Model.from_pretrained(str(model_dir)).eval()(pixel_values=x)
    expected = torch.cat([out.pooler_output, out.last_hidden_state[:, 1:].mean(dim=1)], dim=1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_normals_are_encoded_once_across_iterations(model_dir: Path, washer: dict) -> None:
    """The loop refits every iteration on the same normals: the second call encodes only new candidates."""
    config = dino(model_dir, pretrain_epochs=1, epochs=2)
    shared = dinov2_features(config, size=SIDE)
    calls = _count_forwards(shared.backbone.model)
    normals, holdout = washer["normals"][:16], washer["holdout"][:6]
    first, second = washer["planted"][:6], washer["planted"][6:10]
    cross_fit_hardness(normals, holdout, first, None, config, seed=0, size=SIDE)
    assert shared.encoded == 16 + 6 + 6 and sum(calls[1:]) == 28 and max(calls[1:]) <= 8
    before = len(calls)
    cross_fit_hardness(normals, holdout, second, None, config, seed=1, size=SIDE)
    assert sum(calls[before:]) == 4 and shared.encoded == 28 + 4  # only the 4 new candidates
    judge = JudgeEvaluator(config, seed=0, size=SIDE).fit(normals, first, None, holdout)
    judge.hardness(second)
    assert shared.encoded == 32  # the judge reuses the same backbone and cache
    assert judge.evaluator.features is shared


# ------------------------------------------------------------------------------ input size and dtype
@pytest.fixture(scope="module")
def patch14_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DINOv2 with the released models' 14-pixel patches."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2-patch14"), patch_size=14, image_size=28)


def _input_sides(features: Dinov2Features, images: list[np.ndarray]) -> tuple[torch.Tensor, set[tuple]]:
    """(features of ``images``, the (H, W) shapes of the pixel_values the backbone was called with)."""
    seen: set[tuple] = set()

    def hook(module, args, kwargs, output):
        seen.add(tuple(kwargs["pixel_values"].shape[2:]))

    handle = features.backbone.model.register_forward_hook(hook, with_kwargs=True)
    try:
        return features(images), seen
    finally:
        handle.remove()


def test_feature_size_sets_the_backbone_input(patch14_dir: Path, washer: dict) -> None:
    images = washer["normals"][:3]
    default, seen = _input_sides(dinov2_features(dino(patch14_dir)), images)
    assert seen == {(224, 224)}  # evaluator.size (the CNN's 128) does not apply
    small, seen = _input_sides(dinov2_features(dino(patch14_dir, feature_size=28)), images)
    assert seen == {(28, 28)}
    for features in (default, small):
        assert features.shape == (3, 64) and features.dtype == torch.float32
        assert bool(torch.isfinite(features).all())
    assert not torch.allclose(default, small)  # other input, other feature: not served from one cache
    evaluator = FeatureDeepSADEvaluator(dino(patch14_dir, feature_size=42, epochs=2))
    assert evaluator.size == 42 and evaluator.features.size == 42


def test_bfloat16_on_cpu_is_close_to_float32_and_cached_apart(patch14_dir: Path, washer: dict) -> None:
    images = washer["normals"][:4]
    full = dinov2_features(dino(patch14_dir, feature_size=28))
    half = dinov2_features(dino(patch14_dir, feature_size=28, dtype="bfloat16"))
    assert full is not half  # a bfloat16 feature is never handed out for a float32 request
    assert next(full.backbone.model.parameters()).dtype == torch.float32  # auto on cpu
    assert next(half.backbone.model.parameters()).dtype == torch.bfloat16
    reference, approximate = full(images), half(images)
    assert full.encoded == 4 and half.encoded == 4
    assert approximate.dtype == torch.float32 and bool(torch.isfinite(approximate).all())
    assert not torch.equal(approximate, reference)  # the bfloat16 backbone did run
    error = (approximate - reference).norm(dim=1) / reference.norm(dim=1)
    assert float(error.max()) < 0.05, f"relative error of bfloat16 features {float(error.max()):.4f}"


def test_float16_on_cpu_is_refused_in_one_line_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="evaluator.dtype float16 is not supported on cpu") as caught:
        dinov2_features(dino(tmp_path / "never-read", dtype="float16"))
    assert "\n" not in str(caught.value)


def test_auto_dtype_is_bfloat16_only_on_cuda_that_supports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backbone_dtype("auto", torch.device("cpu")) == torch.float32
    assert backbone_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert backbone_dtype("float16", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):

        def supported(including_emulation: bool = True, answer: bool = native) -> bool:
            assert not including_emulation  # emulated bfloat16 is slow: auto takes only the native kind
            return answer

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        assert backbone_dtype("auto", torch.device("cuda:0")) == expected


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"feature_size": 100}, "evaluator.feature_size must be a positive multiple of 14"),
        ({"feature_size": 0}, "evaluator.feature_size must be a positive multiple of 14"),
        ({"feature_size": 7}, "evaluator.feature_size must be a positive multiple of 14"),
        ({"dtype": "half"}, "evaluator.dtype must be one of auto, float32, float16, bfloat16"),
    ],
)
def test_bad_feature_size_or_dtype_is_a_one_line_config_error(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        EvaluatorConfig(name="deepsad-dinov2", **changes)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------- training
def test_training_lowers_the_losses_and_the_head_has_no_bias(model_dir: Path, washer: dict) -> None:
    evaluator = FeatureDeepSADEvaluator(dino(model_dir), size=SIDE).fit(
        washer["normals"], washer["planted"][12:], washer["planted_masks"][12:]
    )
    pretrain, train = evaluator.history["pretrain_loss"], evaluator.history["train_loss"]
    assert len(pretrain) == 5 and len(train) == 20
    assert pretrain[-1] < pretrain[0] and train[-1] < 0.5 * train[0]
    assert evaluator.head is not None and evaluator.center is not None
    assert [name for name, _ in evaluator.head.named_parameters() if "bias" in name] == []
    assert evaluator.center.shape == (64,) and bool((evaluator.center.abs() >= CENTER_EPS - 1e-7).all())
    scores = evaluator.score(washer["holdout"])
    assert scores.shape == (12,) and scores.dtype == np.float64 and (scores >= 0).all()


def test_same_seed_same_scores_other_seed_differs(model_dir: Path, washer: dict) -> None:
    def run(seed: int) -> np.ndarray:
        evaluator = FeatureDeepSADEvaluator(dino(model_dir, epochs=5), seed=seed, size=SIDE)
        return evaluator.fit(washer["normals"][:16], washer["planted"][:6]).score(washer["holdout"])

    np.testing.assert_array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


def test_an_empty_mask_keeps_the_anomaly_out_of_training(model_dir: Path, washer: dict) -> None:
    normals, anomalies = washer["normals"][:16], washer["planted"][18:]
    empty = [np.zeros((SIDE, SIDE), bool)] * len(anomalies)
    without = FeatureDeepSADEvaluator(dino(model_dir, epochs=5), size=SIDE).fit(normals, anomalies, empty)
    one_class = FeatureDeepSADEvaluator(dino(model_dir, epochs=5), size=SIDE).fit(normals)
    np.testing.assert_array_equal(without.score(washer["holdout"]), one_class.score(washer["holdout"]))
    pushed = FeatureDeepSADEvaluator(dino(model_dir, epochs=5), size=SIDE).fit(normals, anomalies, None)
    assert not np.allclose(pushed.score(washer["holdout"]), one_class.score(washer["holdout"]))


# ------------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("name", ["deepsad-cnn", "deepsad-dinov2"])
def test_obvious_defects_are_easier_than_subtle_ones(name: str, model_dir: Path, washer: dict) -> None:
    if name == "deepsad-cnn":
        config, kwargs = EvaluatorConfig(pretrain_epochs=2, epochs=6, size=SIDE, crop=None), {}
    else:
        config, kwargs = dino(model_dir), {"size": SIDE}
    result = cross_fit_hardness(
        washer["normals"], washer["holdout"], washer["planted"], washer["planted_masks"], config, 0, **kwargs
    )
    subtlety = 1.0 - LEVELS
    rho = spearmanr(result.hardness, subtlety).statistic
    assert rho > 0.5, f"{name}: Spearman rho {rho:.3f} between hardness and subtlety"
    assert result.hardness[LEVELS == 1.0].max() < 0  # a black disc over a fifth of the image is easy


# ---------------------------------------------------------------------------------------- save/load
def test_judge_round_trips_with_the_dinov2_evaluator(model_dir: Path, washer: dict, tmp_path: Path) -> None:
    config = dino(model_dir, epochs=8)
    judge = JudgeEvaluator(config, seed=0, size=SIDE).fit(
        washer["normals"][:16], washer["planted"][12:], washer["planted_masks"][12:], washer["holdout"]
    )
    first = judge.hardness(washer["planted"][:12])
    judge.save(tmp_path / "judge")
    assert json.loads((tmp_path / "judge" / "judge.json").read_text())["evaluator"] == "deepsad-dinov2"
    clear_feature_cache()  # the loaded judge loads the backbone again from evaluator.model
    loaded = JudgeEvaluator.load(tmp_path / "judge")
    assert isinstance(loaded.evaluator, FeatureDeepSADEvaluator)
    assert loaded.config == config and loaded.rule == judge.rule and loaded.evaluator.size == SIDE
    np.testing.assert_allclose(loaded.hardness(washer["planted"][:12]).hardness, first.hardness, rtol=1e-5)


def test_cnn_judges_saved_without_a_name_still_load(washer: dict, tmp_path: Path) -> None:
    config = EvaluatorConfig(pretrain_epochs=1, epochs=1, size=32, crop=None)
    judge = JudgeEvaluator(config, seed=0, channels=(4, 8, 8)).fit(
        washer["normals"][:4], [], None, washer["holdout"][:4]
    )
    judge.save(tmp_path)
    rule = json.loads((tmp_path / "judge.json").read_text())
    assert rule.pop("evaluator") == "deepsad-cnn"
    (tmp_path / "judge.json").write_text(json.dumps(rule))
    loaded = JudgeEvaluator.load(tmp_path)
    np.testing.assert_array_equal(
        loaded.hardness(washer["planted"][:3]).scores, judge.hardness(washer["planted"][:3]).scores
    )


def test_evaluator_file_round_trip_and_foreign_backbone(
    model_dir: Path, washer: dict, tmp_path: Path
) -> None:
    evaluator = FeatureDeepSADEvaluator(dino(model_dir, epochs=3), size=SIDE).fit(washer["normals"][:8])
    evaluator.save(tmp_path / "head.safetensors")
    loaded = FeatureDeepSADEvaluator.load(tmp_path / "head.safetensors")
    np.testing.assert_array_equal(loaded.score(washer["holdout"]), evaluator.score(washer["holdout"]))
    wider = save_tiny_dinov2(tmp_path / "wider", hidden_size=48, num_attention_heads=3)
    loaded.config.model, loaded._features = str(wider), None
    with pytest.raises(ValueError, match="gives 96 features, but the head was trained on 64"):
        loaded.score(washer["holdout"])


# ------------------------------------------------------------------------------------------- errors
def test_a_missing_model_folder_is_one_line_naming_the_field(tmp_path: Path, washer: dict) -> None:
    config = dino(tmp_path / "no-such-dinov2")
    with pytest.raises(ModelLoadError) as caught:
        cross_fit_hardness(
            washer["normals"][:4], washer["holdout"][:4], washer["planted"][:2], None, config, 0
        )
    message = str(caught.value)
    assert "\n" not in message and "evaluator.model" in message and "--profile offline" in message
    assert "no-such-dinov2" in message


def test_bad_inputs_raise_clear_errors(model_dir: Path, washer: dict) -> None:
    with pytest.raises(ValueError, match="multiple of the DINOv2 patch size 8"):
        FeatureDeepSADEvaluator(dino(model_dir), size=60).fit(washer["normals"][:4])
    evaluator = FeatureDeepSADEvaluator(dino(model_dir, epochs=1), size=SIDE)
    with pytest.raises(RuntimeError, match="before fit"):
        evaluator.score(washer["holdout"])
    with pytest.raises(EvaluatorInputError, match=r"normal\[1\] must be an RGB uint8"):
        evaluator.fit([washer["normals"][0], washer["normals"][1][..., 0]])
    with pytest.raises(EvaluatorInputError, match=r"anomaly_masks\[0\] has shape \(8, 8\)"):
        evaluator.fit(washer["normals"][:4], washer["planted"][:1], [np.ones((8, 8), bool)])
    with pytest.raises(EvaluatorInputError, match="anomaly_masks has 2 entries for 1 anomalies"):
        evaluator.fit(washer["normals"][:4], washer["planted"][:1], [None, None])
    with pytest.raises(EvaluatorInputError, match="at least 2 images"):
        evaluator.fit(washer["normals"][:1])
    with pytest.raises(ValueError, match="widths must be positive"):
        FeatureDeepSADEvaluator(dino(model_dir), widths=())

"""Patch-level Deep SAD: training, scoring, determinism, persistence and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kka_synth.alignment.deepsad import CENTER_EPS, DeepSADEvaluator, EvaluatorInputError
from kka_synth.config import EvaluatorConfig

SMALL = EvaluatorConfig(pretrain_epochs=4, epochs=8, size=64, crop=None)


@pytest.fixture(scope="module")
def fitted(brick_sets: dict[str, list[np.ndarray]]) -> DeepSADEvaluator:
    return DeepSADEvaluator(EvaluatorConfig(pretrain_epochs=6, epochs=12, size=64, crop=None), seed=0).fit(
        brick_sets["normals"], brick_sets["anomalies"], brick_sets["masks"]
    )


def test_training_lowers_both_losses(fitted: DeepSADEvaluator) -> None:
    pretrain, train = fitted.history["pretrain_loss"], fitted.history["train_loss"]
    assert len(pretrain) == 6 and len(train) == 12
    assert pretrain[-1] < 0.7 * pretrain[0]
    assert train[-1] < 0.5 * train[0]


def test_center_has_no_near_zero_coordinate(fitted: DeepSADEvaluator) -> None:
    assert fitted.center is not None and fitted.center.shape == (fitted.channels[2],)
    assert bool((fitted.center.abs() >= CENTER_EPS - 1e-7).all())


def test_normal_images_score_below_obvious_anomalies(
    fitted: DeepSADEvaluator, brick_sets: dict[str, list[np.ndarray]]
) -> None:
    normal = fitted.score(brick_sets["holdout"])
    anomalous = fitted.score(brick_sets["obvious"])
    assert normal.shape == (16,) and anomalous.shape == (8,) and normal.dtype == np.float64
    assert np.isfinite(normal).all() and (normal >= 0).all()
    # every obvious anomaly scores above the 95th percentile of held-out normals
    assert anomalous.min() > np.quantile(normal, 0.95)


def test_score_maps_peak_inside_the_defect(
    fitted: DeepSADEvaluator, brick_sets: dict[str, list[np.ndarray]]
) -> None:
    maps = fitted.score_maps(brick_sets["obvious"])
    assert maps.shape == (8, 16, 16) and maps.dtype == np.float32
    hits = 0
    for grid, mask in zip(maps, brick_sets["obvious_masks"], strict=True):
        row, col = np.unravel_index(grid.argmax(), grid.shape)
        cell = mask[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]  # 128 px image / 16 cells
        near = mask[max(row * 8 - 8, 0) : row * 8 + 16, max(col * 8 - 8, 0) : col * 8 + 16]
        hits += bool(cell.any() or near.any())
    assert hits >= 7


def test_same_seed_same_scores_and_other_seed_differs(brick_sets: dict[str, list[np.ndarray]]) -> None:
    def run(seed: int) -> np.ndarray:
        model = DeepSADEvaluator(SMALL, seed=seed, size=32, channels=(8, 16, 16))
        model.fit(brick_sets["normals"][:16], brick_sets["anomalies"][:6], brick_sets["masks"][:6])
        return model.score(brick_sets["holdout"])

    first, second, other = run(3), run(3), run(4)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)


def test_save_load_round_trip(fitted: DeepSADEvaluator, brick_sets: dict, tmp_path) -> None:
    path = fitted.save(tmp_path / "deepsad.safetensors")
    loaded = DeepSADEvaluator.load(path)
    assert loaded.top_k == fitted.top_k and loaded.channels == fitted.channels
    images = brick_sets["holdout"][:4] + brick_sets["obvious"][:4]
    np.testing.assert_array_equal(loaded.score(images), fitted.score(images))


def test_patch_labels_from_a_mask_by_hand() -> None:
    model = DeepSADEvaluator(SMALL, size=64)  # grid 16 x 16, one cell = 8 px of a 128 px image
    image = np.zeros((128, 128, 3), np.uint8)
    mask = np.zeros((128, 128), bool)
    mask[20:30, 40:44] = True  # rows 20-29 -> cells 2-3, cols 40-43 -> cell 5
    labels = model._patch_labels([image, image, image], [mask, None, np.zeros_like(mask)])
    assert labels.shape == (3, 16, 16)
    expected = np.zeros((16, 16), np.int8)
    expected[1:5, 4:7] = -1  # the ring around the covered cells is ignored
    expected[2:4, 5] = 1
    np.testing.assert_array_equal(labels[0], expected)
    assert (labels[1] == 2).all()  # no mask: top-k patches chosen while training
    assert (labels[2] == -1).all()  # empty mask: left out


def test_unmasked_anomaly_pushes_its_top_k_patches() -> None:
    model = DeepSADEvaluator(SMALL, size=16, top_k=2)  # grid 4 x 4
    labels = torch.tensor([[[0] * 4] * 4, [[2] * 4] * 4], dtype=torch.int8)
    dist = torch.zeros(2, 4, 4)
    dist[1, 0, 3], dist[1, 2, 1] = 5.0, 4.0
    out = model._label_unmasked(labels, dist)
    assert (out[0] == 0).all()
    assert out[1, 0, 3] == 1 and out[1, 2, 1] == 1
    assert int((out[1] == -1).sum()) == 14


def test_fit_without_anomalies_is_one_class(brick_sets: dict[str, list[np.ndarray]]) -> None:
    model = DeepSADEvaluator(SMALL, size=32, channels=(8, 16, 16)).fit(brick_sets["normals"][:8])
    assert model.score(brick_sets["holdout"][:3]).shape == (3,)


def test_bad_inputs_raise_clear_errors(brick_sets: dict[str, list[np.ndarray]]) -> None:
    normals = brick_sets["normals"][:4]
    model = DeepSADEvaluator(SMALL, size=32)
    with pytest.raises(RuntimeError, match="before fit"):
        model.score(normals)
    with pytest.raises(EvaluatorInputError, match=r"normal\[1\] must be an RGB uint8"):
        model.fit([normals[0], normals[1][..., 0]])
    with pytest.raises(EvaluatorInputError, match=r"anomalies\[0\] must be an RGB uint8"):
        model.fit(normals, [normals[0].astype(np.float32)])
    with pytest.raises(
        EvaluatorInputError, match=r"anomaly_masks\[0\] has shape \(4, 4\), expected its image"
    ):
        model.fit(normals, [normals[0]], [np.ones((4, 4), bool)])
    with pytest.raises(EvaluatorInputError, match="2 entries for 1 anomalies"):
        model.fit(normals, [normals[0]], [None, None])
    with pytest.raises(ValueError, match="top_k"):
        DeepSADEvaluator(SMALL, size=16, top_k=17)


def test_crop_training_scores_whole_images_at_full_resolution(
    brick_sets: dict[str, list[np.ndarray]],
) -> None:
    config = EvaluatorConfig(pretrain_epochs=2, epochs=2, size=64, crop=32)
    model = DeepSADEvaluator(config, seed=0, channels=(8, 16, 16))
    model.fit(brick_sets["normals"][:8], brick_sets["obvious"][:4], [None] * 4)
    assert model.crop == 32 and model.score_maps(brick_sets["normals"][:2]).shape == (2, 16, 16)
    assert len(model.history["train_loss"]) == 2 and np.isfinite(model.history["train_loss"]).all()


def test_crops_of_anomalies_keep_a_labelled_cell() -> None:
    import torch

    model = DeepSADEvaluator(EvaluatorConfig(size=64, crop=16), seed=3)
    labels = torch.zeros((4, 16, 16), dtype=torch.int8)
    for i, (y, x) in enumerate([(0, 0), (15, 15), (7, 3), (2, 14)]):
        labels[i, y, x] = 1  # one labelled-anomaly cell per image
    for _ in range(10):
        x, cropped = model._crop(torch.zeros((4, 3, 64, 64)), labels)
        assert x.shape == (4, 3, 16, 16) and cropped.shape == (4, 4, 4)
        assert (cropped == 1).flatten(1).any(dim=1).all()

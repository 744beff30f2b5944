"""AeCSAD: losses by hand, the students and the teacher (its weights: test_aecsad_teacher.py), the patch
histogram, fusion, pseudo-labels, the whole detector on tiny configs (fit, predict, calibration,
persistence, errors) and LOCO's split metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from kka_synth.config import ConfigError, RunConfig
from kka_synth.data import save_mask, save_rgb
from kka_synth.detectors import DETECTORS
from kka_synth.detectors.aecsad import AecsadConfig, AecsadDetector
from kka_synth.detectors.aecsad.components import (
    GroundedSamLabeler,
    cluster_embeddings,
    filter_sam_masks,
    split_reliable,
    square_crop,
    unsupervised_components,
)
from kka_synth.detectors.aecsad.fusion import TrimmedZ, calibrate_weights, f1_threshold, trimmed_stats
from kka_synth.detectors.aecsad.histogram import Gaussian, PatchHistogram, grid_histograms
from kka_synth.detectors.aecsad.lgst import (
    GlobalStudent,
    LocalStudent,
    SelfAttention2d,
    TeacherProjection,
    hard_feature_loss,
    lgst_losses,
    lgst_maps,
)
from kka_synth.detectors.aecsad.segment import (
    dice_loss,
    entropy_loss,
    focal_loss,
    histogram_loss,
    labeled_loss,
    lsa_augment,
)
from kka_synth.detectors.aecsad.train import to_tensor, train_lgst
from kka_synth.detectors.aecsad.wrn import WideResNet
from kka_synth.eval.protocol import evaluate_run
from kka_synth.runs import RunDir
from kka_synth.types import SyntheticStage
from kka_synth.utils.hub import ModelLoadError

SIDE = 64
TINY = AecsadConfig(
    image_size=SIDE,
    wrn_base=4,
    wrn_blocks=(1, 1, 1, 1),
    label_images=None,
    colour_clusters=3,
    max_components=4,
    crop_variants=2,
    hdbscan_min_cluster_size=3,
    seg_channels=8,
    seg_epochs=3,
    unlabeled_start=1,
    seg_batch_size=4,
    feature_dim=8,
    local_width=4,
    global_width=8,
    lgst_steps=8,
    lgst_batch_size=2,
    calibration_draws=1,
)


def tiny(**changes: object) -> AecsadConfig:
    return dataclasses.replace(TINY, **changes)


def layout(rng: np.random.Generator, squares: int = 1, scratch: bool = False) -> np.ndarray:
    """A gray 64 px image with a red disc and ``squares`` blue squares at jittered places."""
    image = np.full((SIDE, SIDE, 3), 120, np.uint8)
    image += rng.integers(0, 6, image.shape, dtype=np.uint8)
    cy, cx = (int(v) for v in rng.integers(18, 24, 2))
    cv2.circle(image, (cx, cy), 9, (200, 40, 40), -1)
    for k in range(squares):
        y, x = int(rng.integers(36, 40)), 8 + 18 * k + int(rng.integers(0, 3))
        image[y : y + 12, x : x + 12] = (40, 60, 200)
    if scratch:
        cv2.line(image, (5, 5), (55, 30), (250, 250, 250), 2)
    return image


@pytest.fixture(scope="module")
def normals() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [layout(rng) for _ in range(12)]


@pytest.fixture(scope="module")
def test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(9)
    return [layout(rng) for _ in range(3)] + [layout(rng, scratch=True), layout(rng, squares=2)]


@pytest.fixture(scope="module")
def fitted(normals: list[np.ndarray]) -> AecsadDetector:
    detector = AecsadDetector(TINY)
    detector.fit(normals)
    return detector


# ------------------------------------------------------------------------------------------ losses
def test_segmentation_losses_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2): pixel 0 favours class 0
    target = torch.tensor([[[0, 0]]])
    p0 = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.e)]  # class-0 probabilities of the two pixels
    p1 = [1 - p for p in p0]
    dice0 = (2 * sum(p0) + 1) / (sum(p0) + 2 + 1)
    dice1 = (2 * 0 + 1) / (sum(p1) + 0 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - (dice0 + dice1) / 2, rel=1e-6)
    focal = np.mean([-((1 - p) ** 2) * math.log(p) for p in p0])
    assert focal_loss(logits, target, 2.0).item() == pytest.approx(focal, rel=1e-6)
    ce = np.mean([-math.log(p) for p in p0])
    assert focal_loss(logits, target, 0.0).item() == pytest.approx(ce, rel=1e-6)
    terms = labeled_loss(logits, target, (1.0, 2.0, 3.0), 2.0)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    expected = ce + 2 * terms["dice"].item() + 3 * focal
    assert terms["total"].item() == pytest.approx(expected, rel=1e-6)
    shares = torch.tensor([np.mean(p0), np.mean(p1)])
    hist = (shares - torch.tensor([0.5, 0.5])).abs().sum().item()
    assert histogram_loss(logits, torch.tensor([0.5, 0.5])).item() == pytest.approx(hist, rel=1e-6)
    assert entropy_loss(torch.zeros(1, 4, 2, 2)).item() == pytest.approx(math.log(4), rel=1e-6)
    entropy = np.mean([-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in p0])
    assert entropy_loss(logits).item() == pytest.approx(entropy, rel=1e-6)


def test_lgst_losses_and_maps_by_hand():
    teacher = torch.zeros(1, 1, 2, 5)
    local = torch.arange(1.0, 11.0).reshape(1, 1, 2, 5)  # squared errors 1, 4, ..., 100
    assert hard_feature_loss(teacher, local, 0.8).item() == pytest.approx((81 + 100) / 2)
    assert hard_feature_loss(teacher, local, 0.999).item() == pytest.approx(100.0)
    global_ = torch.full((1, 1, 2, 5), 2.0)
    fuse = torch.full((1, 1, 2, 5), 3.0)
    terms = lgst_losses(teacher, local, fuse, global_, (1.0, 0.5, 2.0), 0.8)
    assert terms["global"].item() == pytest.approx(4.0)  # (0 - 2)^2
    assert terms["fusion"].item() == pytest.approx(1.0)  # (2 - 3)^2
    assert terms["total"].item() == pytest.approx(90.5 + 0.5 * 4 + 2 * 1)
    augmented = lgst_losses(teacher, local, fuse, global_, (1.0, 1.0, 1.0), 0.8, teacher + 1)
    assert augmented["global"].item() == pytest.approx(1.0)  # the global branch's own target
    teacher2 = torch.zeros(1, 2, 1, 1)
    maps = lgst_maps(teacher2, torch.tensor([1.0, 3.0]).view(1, 2, 1, 1), teacher2 + 1, teacher2 + 2)
    assert maps.shape == (1, 3, 1, 1)
    assert maps.flatten().tolist() == pytest.approx([5.0, 4.0, 1.0])  # (1+9)/2, (4+4)/2, (1+1)/2


# ------------------------------------------------------------------------------------------ networks
def test_attention_changes_the_global_student():
    x = torch.rand(2, 3, 256, 256)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        attentive = GlobalStudent(8, 16, 256, attention=True).eval()
        torch.manual_seed(0)
        plain = GlobalStudent(8, 16, 256, attention=False).eval()
    sizes: list[tuple[int, int]] = []
    for module in attentive.modules():
        if isinstance(module, SelfAttention2d):
            module.register_forward_hook(lambda m, args, out: sizes.append(tuple(args[0].shape[2:])))
    with torch.no_grad():
        a, b = attentive(x), plain(x)
    assert a.shape == b.shape == (2, 16, 64, 64)
    assert sizes == [(16, 16), (8, 8), (16, 16), (32, 32)]  # encoder 16 and 8, decoder 16 and 32
    assert not any(isinstance(m, SelfAttention2d) for m in plain.modules())
    assert (a - b).abs().mean() > 1e-3
    shared = {k: v for k, v in attentive.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(shared, strict=False)  # same convolutions; only the attention differs
    with torch.no_grad():
        assert not torch.allclose(attentive(x), plain(x))


def test_local_student_sees_33_pixels_and_outputs_a_quarter():
    student = LocalStudent(4, 8)
    for module in student.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.constant_(module.weight, 0.01)
            torch.nn.init.constant_(module.bias, 0.01)
    x = torch.rand(1, 3, 128, 128, requires_grad=True)
    local, fuse = student(x)
    assert local.shape == fuse.shape == (1, 8, 32, 32)
    local[0, 0, 16, 16].backward()
    rows = torch.nonzero(x.grad[0].abs().sum(dim=0).sum(dim=1)).flatten()
    cols = torch.nonzero(x.grad[0].abs().sum(dim=0).sum(dim=0)).flatten()
    assert rows.max() - rows.min() + 1 == 33 and cols.max() - cols.min() + 1 == 33


def test_teacher_projection_is_fixed_and_normalises():
    projection = TeacherProjection(6, 4)
    assert not any(p.requires_grad for p in projection.parameters())
    features = {"layer2": torch.rand(3, 2, 8, 8), "layer3": torch.rand(3, 4, 4, 4) * 5}
    raw = projection.raw(features, (16, 16))
    assert raw.shape == (3, 4, 16, 16)
    projection.set_normalisation(raw)
    normalised = projection(features, (16, 16))
    assert normalised.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert torch.allclose(normalised.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)


def test_grid_histograms_and_mahalanobis_by_hand():
    maps = np.zeros((1, 4, 4), np.uint8)
    maps[0, :2, :2] = 1
    maps[0, 3, 3] = 2
    hist = grid_histograms(maps, 3, 2).reshape(2, 2, 2)
    assert hist[0, 0].tolist() == [1.0, 0.0] and hist[1, 1].tolist() == [0.0, 0.25]
    assert grid_histograms(maps, 3, 1).tolist() == [[4 / 16, 1 / 16]]
    features = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])
    gaussian = Gaussian(shrinkage=0.0).fit(features)  # mean (1, 2); variances 4/3 and 16/3, no covariance
    distance = gaussian.distance(np.array([[3.0, 2.0]]))[0]
    assert distance == pytest.approx(math.sqrt(4 / (4 / 3)), rel=1e-4)
    shrunk = Gaussian(shrinkage=1.0).fit(features)  # identity times the mean variance 10/3
    assert shrunk.distance(np.array([[3.0, 2.0]]))[0] == pytest.approx(math.sqrt(4 / (10 / 3)), rel=1e-4)


def _label_layout(rng: np.random.Generator, squares: int = 2, disc: bool = True) -> np.ndarray:
    label = np.zeros((48, 48), np.uint8)
    for k in range(squares):
        y, x = int(rng.integers(4, 7)), 4 + 14 * k + int(rng.integers(0, 3))
        label[y : y + 8, x : x + 8] = 1
    if disc:
        cy, cx = (int(v) for v in rng.integers(32, 36, 2))
        cv2.circle(label, (cx, cy), 6, 2, -1)
    return label


def test_histogram_score_grows_for_a_duplicated_or_removed_component():
    rng = np.random.default_rng(0)
    train = np.stack([_label_layout(rng) for _ in range(40)])
    histogram = PatchHistogram(3, 4, 0.1).fit(train)
    normal = histogram.score(np.stack([_label_layout(rng) for _ in range(10)]))
    duplicated = histogram.score(_label_layout(rng, squares=3)[None])
    removed = histogram.score(_label_layout(rng, squares=1)[None])
    no_disc = histogram.score(_label_layout(rng, disc=False)[None])
    for anomaly in (duplicated, removed, no_disc):
        assert (anomaly > normal.max(axis=0)).all()  # both the global and the patch histogram
    again = PatchHistogram.from_state(histogram.state())
    assert np.array_equal(again.score(train[:3]), histogram.score(train[:3]))


# -------------------------------------------------------------------------------------------- fusion
def test_trimmed_statistics_by_hand_and_robust_to_20_percent_outliers():
    mean, std = trimmed_stats(np.arange(1.0, 11.0), 0.2)  # keeps 3..8
    assert mean == pytest.approx(5.5) and std == pytest.approx(math.sqrt(35 / 12))
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 1.0, 400)
    dirty = np.concatenate([clean[:320], np.full(40, 1e3), np.full(40, -5e2)])  # 20% outliers
    robust_mean, robust_std = trimmed_stats(dirty, 0.2)
    clean_mean, clean_std = trimmed_stats(clean[:320], 0.2)
    assert abs(robust_mean - clean_mean) < 0.15 and abs(robust_std - clean_std) < 0.15
    assert abs(dirty.mean()) > 40 and dirty.std() > 300  # the plain statistics are ruined
    z = TrimmedZ(0.2).fit(np.stack([dirty, np.full(400, 3.0)], axis=1))
    assert z.std[1] == 1.0  # zero spread keeps scale 1
    assert z(np.array([[robust_mean + robust_std, 5.0]]))[0].tolist() == pytest.approx([1.0, 2.0])


def test_thresholds_and_calibrated_weights():
    assert f1_threshold(np.array([0.1, 0.2, 0.6]), np.array([0.5, 0.9])) == pytest.approx(0.5)
    normal = np.zeros((8, 3))
    normal[:, 2] = np.linspace(0, 1, 8)
    anomalous = np.zeros((6, 3))
    anomalous[:, 0] = 0.3  # only the histogram sees these anomalies, weakly
    anomalous[:, 2] = np.linspace(0, 1, 6)
    assert calibrate_weights(normal, anomalous) == (4.0, 1.0)  # 4 * 0.3 lifts them above every normal
    assert calibrate_weights(normal, anomalous[:3]) == (1.0, 1.0)  # too few to calibrate


# ------------------------------------------------------------------------------------- pseudo-labels
def test_sam_masks_are_filtered_by_background_then_objects():
    shape = (20, 20)

    def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        mask = np.zeros(shape, bool)
        mask[y0:y1, x0:x1] = True
        return mask

    boxes = np.array([[0, 0, 10, 10]])
    obj = box_mask(0, 10, 0, 8)
    inside = box_mask(2, 6, 2, 6)
    background = box_mask(12, 20, 12, 20)  # outside every box: stage 1
    off_object = box_mask(0, 10, 8, 10)  # in the box, outside the object mask: stage 2
    kept = filter_sam_masks([inside, background, off_object], [obj], boxes, 0.5, 0.5)
    assert len(kept) == 1 and np.array_equal(kept[0], inside)
    assert [m.sum() for m in filter_sam_masks([background], [obj], boxes, 0.5, 0.5)] == [80]  # objects remain


def test_component_crops_clusters_and_reliable_split():
    mask = np.zeros((40, 40), bool)
    mask[10:14, 5:25] = True  # 4 x 20 bar; its rectangle's diagonal ~ 20 px
    image = np.full((40, 40, 3), 50, np.uint8)
    crop = square_crop(image, mask, 32)
    assert crop.shape == (32, 32, 3)
    assert crop[0].max() == 0 and crop[16, 16].tolist() == [50, 50, 50]  # masked-out corners, kept centre
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0, 0.05, (30, 4)) + [1, 0, 0, 0], rng.normal(0, 0.05, (12, 4))])
    classes = cluster_embeddings(blobs, 0.3, 8, 0)
    assert set(classes[:30]) == {1} and set(classes[30:]) == {2}
    assert set(cluster_embeddings(blobs, 0.3, 1, 0)) == {1}  # merged into the one kept class
    outliers = [[0.9, 0.9], [0.0, 0.95], [0.9, 0.0]]
    two = np.concatenate([rng.normal(0.3, 0.01, (12, 2)), rng.normal([0.6, 0.2], 0.01, (10, 2)), outliers])
    reliable = split_reliable(two, 5, 0.3)
    assert reliable[:22].all() and not reliable[22:].any()
    one = np.concatenate([rng.normal(0.3, 0.01, (20, 2)), outliers])
    reliable = split_reliable(one, 5, 0.5)
    assert reliable.sum() >= 12 and not reliable[20:].any()  # topped up with the most typical
    assert split_reliable(one[:4], 5, 0.5).sum() == 2  # too few for HDBSCAN: the most typical half


def test_unsupervised_components_find_the_parts(normals: list[np.ndarray]):
    components = unsupervised_components(normals, TINY)
    for masks, image in zip(components, normals, strict=True):
        assert 2 <= len(masks) <= TINY.max_components
        red = (image[..., 0] > 150) & (image[..., 2] < 100)
        assert any((m & red).sum() > 0.8 * red.sum() for m in masks)


def test_lsa_pastes_components_with_their_labels():
    image = np.zeros((32, 32, 3), np.uint8)
    label = np.zeros((32, 32), np.uint8)
    donor_image = image.copy()
    donor_label = label.copy()
    donor_image[4:10, 4:10] = 200
    donor_label[4:10, 4:10] = 3
    out_image, out_label = lsa_augment(
        image, label, [(donor_image, donor_label)], np.random.default_rng(1), 2
    )
    assert set(np.unique(out_label)) == {0, 3} and (out_label == 3).sum() > 10
    assert (out_image[out_label == 0] == 0).all() and out_image[out_label == 3].mean() > 100
    assert (label == 0).all()  # the input is not changed


def test_grounded_sam_without_weights_is_a_one_line_error(tmp_path: Path):
    config = tiny(
        labeler="grounded_sam", grounding_model=str(tmp_path / "none"), sam_model=str(tmp_path / "none")
    )
    with pytest.raises(ModelLoadError, match="aecsad.grounding_model") as error:
        GroundedSamLabeler(config, ["cap", "label"])
    assert "\n" not in str(error.value)


def test_grounded_sam_labeler_runs_sam_on_boxes_and_a_point_grid():
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "mlp_dim": 32}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sam = SamModel(SamConfig(vision_config={**vision, "global_attn_indexes": [0], "window_size": 4}))
    labeler = GroundedSamLabeler.__new__(GroundedSamLabeler)  # GroundingDINO replaced by fixed boxes
    labeler.config = tiny(sam_points=2, sam_iou=0.0, background_overlap=1.0, object_overlap=0.0)
    labeler.device = "cpu"
    labeler.sam_processor = SamProcessor(SamImageProcessorPil())
    labeler.sam = sam.eval()
    labeler.boxes = lambda image: np.array([[2.0, 2.0, 40.0, 30.0]])
    image = layout(np.random.default_rng(0))
    masks, ious = labeler._sam(image, input_points=[[[[16.0, 16.0]], [[48.0, 48.0]]]])
    assert masks.shape == (2, 3, SIDE, SIDE) and masks.dtype == bool and ious.shape == (2, 3)
    components = labeler(image)
    assert len(components) <= labeler.config.max_components
    assert all(m.shape == (SIDE, SIDE) and m.dtype == bool and m.any() for m in components)


# ------------------------------------------------------------------------------------------ detector
def test_fit_predicts_maps_and_training_lowers_the_losses(fitted: AecsadDetector, test_images):
    out = fitted.predict(test_images)
    assert out.pred_score.shape == (5,) and out.pred_score.dtype == np.float32
    assert out.anomaly_map.shape == (5, SIDE, SIDE) and out.anomaly_map.dtype == np.float32
    assert np.isfinite(out.pred_score).all() and np.isfinite(out.anomaly_map).all()
    seg = fitted.history["segmentation"]
    assert seg[-1]["ce"] < seg[0]["ce"] and seg[-1]["focal"] < seg[0]["focal"]
    assert seg[0]["hist"] is None and seg[-1]["hist"] is not None  # D_U terms from unlabeled_start
    assert len(fitted.history["lgst"]) == TINY.lgst_steps
    assert fitted.pseudo_labels.maps.shape[1:] == (SIDE, SIDE) and fitted.pseudo_labels.num_classes >= 2
    assert set(fitted.thresholds) == {"image", "pixel"} and fitted.weights == (1.0, 1.0)
    assert any("random WideResNet-50-2" in note for note in fitted.notes)
    big = fitted.predict([cv2.resize(image, (96, 80)) for image in test_images[:2]])
    assert big.anomaly_map.shape == (2, 80, 96)
    assert fitted.predict([]).pred_score.shape == (0,)


def test_lgst_training_lowers_each_loss():
    config = tiny(lgst_steps=40, lgst_batch_size=4, lgst_lr=3e-3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        wrn = WideResNet(base=4, blocks=(1, 1, 1, 1)).eval()
        teacher = TeacherProjection(wrn.channels("layer2") + wrn.channels("layer3"), 8)
        local, global_ = LocalStudent(4, 8), GlobalStudent(8, 8, SIDE)
    rng = np.random.default_rng(0)
    images = to_tensor([layout(rng) for _ in range(4)], "cpu")
    history = train_lgst(wrn, teacher, local, global_, images, config)
    for term in ("local", "global", "loss"):  # the fusion term starts near 0 and follows the global student
        first, last = (np.mean([r[term] for r in part]) for part in (history[:5], history[-5:]))
        assert last < first, term
    assert history[-1]["lr"] == pytest.approx(3e-4)  # x0.1 at 95% of the steps


def test_synthetic_sets_only_calibrate(fitted: AecsadDetector, normals, test_images):
    def square(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        out, mask = image.copy(), np.zeros(image.shape[:2], bool)
        mask[20:30, 20:30] = True
        out[mask] = (255, 255, 0)
        return out, mask

    detector = AecsadDetector(TINY)
    detector.fit(normals, [SyntheticStage("rule", draw=square)])
    same, base = detector.predict(test_images), fitted.predict(test_images)
    np.testing.assert_array_equal(same.pred_score, base.pred_score)  # the same seed, never trained on them
    np.testing.assert_array_equal(same.anomaly_map, base.anomaly_map)
    assert detector.calibration["anomalies"] == 2 and detector.calibration["with_masks"] == 2  # 2 held out
    assert any("calibration only" in note for note in detector.notes)
    weighted = AecsadDetector(tiny(fusion_weights="calibrated"))
    weighted.fit(normals, [SyntheticStage("kka", anomalies=[square(n, None) + (n,) for n in normals[:4]])])
    assert weighted.calibration == {"anomalies": 4, "with_masks": 4, "weights": "calibrated"}


def test_save_load_round_trip(fitted: AecsadDetector, test_images, tmp_path: Path):
    fitted.save(tmp_path / "model")
    assert not list((tmp_path / "model").glob("*.tmp"))
    loaded = AecsadDetector.load(tmp_path / "model")
    before, after = fitted.predict(test_images), loaded.predict(test_images)
    np.testing.assert_array_equal(before.pred_score, after.pred_score)
    np.testing.assert_array_equal(before.anomaly_map, after.anomaly_map)
    assert loaded.thresholds == fitted.thresholds and loaded.notes == fitted.notes
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    meta["teacher_checksum"] += 1.0
    (tmp_path / "model" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="rebuilt teacher differs"):
        AecsadDetector.load(tmp_path / "model")
    fitted.config.save_teacher = True
    try:
        fitted.save(tmp_path / "full")
    finally:
        fitted.config.save_teacher = False
    full = AecsadDetector.load(tmp_path / "full").predict(test_images)
    np.testing.assert_array_equal(before.pred_score, full.pred_score)


def test_bad_input_is_a_clear_error(fitted: AecsadDetector, normals, tmp_path: Path):
    with pytest.raises(ValueError, match="at least 4 normal images"):
        AecsadDetector(TINY).fit(normals[:3])
    with pytest.raises(ValueError, match=r"normal\[1\] must be an RGB uint8 array"):
        AecsadDetector(TINY).fit([normals[0], normals[1].astype(np.float32)])
    with pytest.raises(ValueError, match="share one size"):
        fitted.predict([normals[0], normals[0][:32]])
    with pytest.raises(ValueError, match="SyntheticStage"):
        AecsadDetector(TINY).fit(normals, ["not a stage"])
    with pytest.raises(RuntimeError, match="before fit"):
        AecsadDetector(TINY).predict(normals[:1])
    with pytest.raises(FileNotFoundError, match="no AeCSAD detector"):
        AecsadDetector.load(tmp_path)
    with pytest.raises(ConfigError, match="aecsad.image_size"):
        AecsadConfig(image_size=100)
    with pytest.raises(ConfigError, match="aecsad.labeler"):
        AecsadConfig(labeler="magic")
    with pytest.raises(ConfigError, match="teacher_weights needs the full-size"):
        AecsadConfig(wrn_base=8, teacher_weights="w.safetensors")
    assert DETECTORS["aecsad"] is AecsadDetector
    assert AecsadConfig(**AecsadDetector.profiles["hub"]).feature_dim == 512
    assert AecsadConfig(**AecsadDetector.profiles["offline"]) == AecsadConfig()  # the defaults are offline


# ------------------------------------------------------------------------------------- LOCO eval
def test_loco_eval_reports_logical_and_structural_auroc(tmp_path: Path):
    rng = np.random.default_rng(3)
    base = tmp_path / "loco" / "juice_bottle"
    for i in range(10):
        save_rgb(base / "train" / "good" / f"{i:03d}.png", layout(rng))
    for i in range(3):
        save_rgb(base / "test" / "good" / f"{i:03d}.png", layout(rng))
    for kind, image in (
        ("logical_anomalies", layout(rng, squares=2)),
        ("structural_anomalies", layout(rng, scratch=True)),
    ):
        for i in range(2):
            save_rgb(base / "test" / kind / f"{i:03d}.png", image)
            mask = np.zeros((SIDE, SIDE), bool)
            mask[30:50, 30:50] = True
            save_mask(base / "ground_truth" / kind / f"{i:03d}" / "000.png", mask)
    options = {key: list(v) if isinstance(v, tuple) else v for key, v in dataclasses.asdict(TINY).items()}
    config = RunConfig.from_dict(
        {
            "name": "loco",
            "out": str(tmp_path / "runs"),
            "data": {"dataset": "mvtec_loco", "root": str(tmp_path / "loco"), "image_size": SIDE},
            "eval": {
                "detectors": ["aecsad"],
                "variants": ["none"],
                "overlays": 0,
                "options": {"aecsad": options},
            },
        }
    )
    run = RunDir.open(config)
    summary = evaluate_run(run.path)
    entry = summary["categories"]["juice_bottle"]["aecsad"]["none"]
    for metric in ("image_auroc", "logical_auroc", "structural_auroc"):
        assert 0.0 <= entry["mean"][metric] <= 1.0
    assert "logical AUROC" in (run.path / "metrics.md").read_text()
    model = json.loads((run.path / "eval/juice_bottle/aecsad/none/seed0/model/config.json").read_text())
    assert "bottle" in model["config"]["components"]  # the knowledge base's parts prompt GroundingDINO
    result = json.loads((run.path / "eval/juice_bottle/aecsad/none/seed0/result.json").read_text())
    assert result["test_images"] == {"normal": 3, "anomalous": 4}

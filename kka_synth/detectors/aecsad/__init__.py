"""The AeCSAD detector: component segmentation, patch histogram and an attention-enhanced student-teacher.

AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) extends CSAD (Hsieh and Lai, "CSAD: Unsupervised
Component Segmentation for Logical Anomaly Detection", BMVC 2024). The thesis reports image AUROC 95.05 on
MVTec LOCO AD (logical 97.56, structural 92.54), against CSAD's 94.64. Its parts, one module each:

- :mod:`.wrn`: the frozen WRN-50-2 teacher (torchvision's names; ImageNet weights load as safetensors from a
  Hub id or a local file);
- :mod:`.components`: component pseudo-labels (Grounded-SAM or an unsupervised fallback, crops, MeanShift
  classes, HDBSCAN split into reliable D_L and unreliable D_U images);
- :mod:`.segment`: the DeepLabV3+ segmentation decoder, its semi-supervised losses and LSA;
- :mod:`.histogram`: the patch histogram scored by Mahalanobis distance (logical anomalies);
- :mod:`.lgst`: the local-global student-teacher (structural anomalies; the anomaly maps);
- :mod:`.fusion`: trimmed z-normalisation of the scores on a held-out normal split;
- :mod:`.train`: the two training loops;
- :mod:`.config` (settings and profiles), :mod:`.data` (images to tensors), :mod:`.persist` (what is saved).

**Synthetic anomalies.** AeCSAD trains on normal images only, as the thesis does, so ``fit`` never trains
on ``synthetic``: with the same seed, ``fit(normal)`` and ``fit(normal, synthetic)`` give the same networks,
maps and (with equal weights) scores. The curated (or rule-based) set is the *calibration set* instead: its
fixed anomalies, and ``calibration_draws`` draws per held-out normal from a stage's ``draw``, are scored
next to the held-out normals. They set the image and pixel thresholds (F1-optimal; ``thresholds``), and
with ``fusion_weights="calibrated"`` the ratio of the histogram and LGST weights (the AUROC-best ratio of a
small grid; ties go to the thesis's equal sum). The fusion's z-statistics always come from normals only.
With ``synthetic=None`` the weights stay equal and the thresholds are the trimmed mean + 3 trimmed standard
deviations of the held-out normals. Measured with ``kka-synth eval`` on the demo (offline profile, seed 0),
calibrated weights lowered image AUROC from 0.581 (none, equal weights) to 0.536 (kka) and 0.552 (rule) on
brick and to 0.568 and 0.573 on washer, so the default keeps the thesis's equal weights and the synthetic
set sets only the thresholds.

**Offline profile.** No weights are downloaded: the teacher keeps random weights unless ``teacher_weights``
names a local ``.safetensors`` file or folder, and the pseudo-labels come from the unsupervised fallback.
``notes`` says so for each fitted detector. Random teacher features carry little information (a
nearest-neighbour test on them reached image AUROC 0.60-0.63 on the demo), so the offline detector runs the
whole method but does not detect well; the thesis's results need the hub profile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from kka_synth.detectors.aecsad import persist
from kka_synth.detectors.aecsad.components import make_pseudo_labels
from kka_synth.detectors.aecsad.config import PROFILES, WRN50_2_WEIGHTS, AecsadConfig
from kka_synth.detectors.aecsad.data import to_tensor
from kka_synth.detectors.aecsad.fusion import (
    TrimmedZ,
    calibrate_weights,
    calibration_set,
    f1_threshold,
    fuse,
    normal_threshold,
    pixel_threshold,
)
from kka_synth.detectors.aecsad.histogram import PatchHistogram
from kka_synth.detectors.aecsad.lgst import (
    TEACHER_LAYERS,
    GlobalStudent,
    LocalStudent,
    TeacherProjection,
    lgst_maps,
)
from kka_synth.detectors.aecsad.segment import SEG_LAYERS, SegmentationHead
from kka_synth.detectors.aecsad.train import segmentation_steps, train_lgst, train_segmentation
from kka_synth.detectors.aecsad.wrn import WideResNet, load_torchvision_weights
from kka_synth.detectors.inputs import check_images, resize_rgb
from kka_synth.detectors.saved import read_saved, write_saved
from kka_synth.types import DetectorOutput, SyntheticStage

__all__ = ["AecsadConfig", "AecsadDetector"]

logger = logging.getLogger(__name__)


class AecsadDetector:
    """AeCSAD on RGB uint8 images: :meth:`fit`, :meth:`predict`, :meth:`save`, :meth:`load`.

    Images are resized to ``config.image_size`` squared; maps come back at each input's size. After
    :meth:`fit`: ``history`` (per-step records of ``segmentation`` and ``lgst``), ``pseudo_labels``
    (the maps and the D_L split), ``weights`` (w_hist, w_lgst), ``thresholds`` (``image`` on the fused score,
    ``pixel`` on the map), ``calibration`` (what the synthetic set contributed) and ``notes`` (one line
    each on what the run could not do as the thesis does, e.g. random teacher weights).
    """

    name = "aecsad"
    config_class = AecsadConfig
    profiles = PROFILES
    """``offline`` (the config defaults) trains on one CPU thread in a few minutes at 128 px with a random
    full-size teacher and small students; ``hub`` follows the thesis (see :data:`.config.PROFILES`)."""

    def __init__(
        self, config: AecsadConfig | None = None, progress: Callable[[int, int], None] | None = None
    ):
        self.config = config or AecsadConfig()
        self.progress = progress
        self.wrn: WideResNet | None = None
        self.head: SegmentationHead | None = None
        self.teacher: TeacherProjection | None = None
        self.local: LocalStudent | None = None
        self.global_: GlobalStudent | None = None
        self.histogram: PatchHistogram | None = None
        self.zscore = TrimmedZ(self.config.trim)
        self.map_quantiles = np.zeros((3, 2))
        self.weights = (1.0, 1.0)
        self.thresholds: dict[str, float] = {}
        self.calibration: dict[str, Any] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.pseudo_labels = None
        self.notes: list[str] = []
        self.teacher_checksum = 0.0
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ models
    def _build_teacher(self, random: bool = False) -> WideResNet:
        """The teacher: random weights from the seed, then ``teacher_weights`` unless ``random``."""
        config = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            wrn = WideResNet(base=config.wrn_base, blocks=config.wrn_blocks)
        if config.teacher_weights and not random:
            load_torchvision_weights(wrn, config.teacher_weights)
        return wrn.to(config.device).eval().requires_grad_(False)

    def _build_students(self, num_classes: int) -> None:
        config, wrn = self.config, self.wrn
        assert wrn is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            self.head = SegmentationHead(
                [wrn.channels(n) for n in SEG_LAYERS], num_classes, config.seg_channels, config.aspp_rates
            )
            channels = sum(wrn.channels(n) for n in TEACHER_LAYERS)
            self.teacher = TeacherProjection(channels, config.feature_dim)
            self.local = LocalStudent(config.local_width, config.feature_dim)
            self.global_ = GlobalStudent(
                config.global_width, config.feature_dim, config.image_size, config.attention
            )
        for module in (self.head, self.teacher, self.local, self.global_):
            module.to(config.device)

    # --------------------------------------------------------------------------------------- analysis
    @torch.no_grad()
    def _forward(self, images: list[np.ndarray]) -> tuple[np.ndarray, torch.Tensor]:
        """Working-size images -> (segmentation (N, S, S) uint8, raw LGST maps (N, 3, S/4, S/4) on the CPU).

        The teacher's layers 1-3 are computed once per batch and shared by the decoder and the teacher.
        """
        assert self.wrn and self.head and self.teacher and self.local and self.global_
        side = self.config.image_size
        seg, maps = [], []
        for start in range(0, len(images), self.config.eval_batch_size):
            x = to_tensor(images[start : start + self.config.eval_batch_size], self.config.device)
            features = self.wrn.features(x, SEG_LAYERS)
            seg.append(self.head(features, (side, side)).argmax(dim=1).to(torch.uint8).cpu())
            teacher = self.teacher(features, (side // 4, side // 4))
            local, fuse_out = self.local(x)
            maps.append(lgst_maps(teacher, local, fuse_out, self.global_(x)).float().cpu())
        return torch.cat(seg).numpy(), torch.cat(maps)

    def _combined(self, raw: torch.Tensor) -> torch.Tensor:
        """(N, 3, h, w) raw maps -> (N, h, w): each sent to 0.1 * (A - q_low) / (q_high - q_low), weighted."""
        low = torch.tensor(self.map_quantiles[:, 0], dtype=raw.dtype)[None, :, None, None]
        span = torch.tensor(self.map_quantiles[:, 1] - self.map_quantiles[:, 0], dtype=raw.dtype).clamp_min(
            1e-12
        )
        weights = torch.tensor(self.config.map_weights, dtype=raw.dtype)[None, :, None, None]
        return (0.1 * (raw - low) / span[None, :, None, None] * weights).sum(dim=1)

    def _z(self, seg: np.ndarray, combined: torch.Tensor) -> np.ndarray:
        """(N, 3) z-scores of (global histogram, patch histogram, LGST = max of the combined map)."""
        assert self.histogram is not None
        lgst = combined.flatten(1).amax(dim=1).double().numpy()[:, None]
        return self.zscore(np.concatenate([self.histogram.score(seg), lgst], axis=1))

    def _full_size(self, combined: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        return F.interpolate(combined[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].numpy()

    # --------------------------------------------------------------------------------------------- fit
    def fit(self, normal: list[np.ndarray], synthetic: list[SyntheticStage] | None = None) -> None:
        """Train on normal images only; ``synthetic`` is the calibration set (see the module docstring)."""
        config = self.config
        side = (config.image_size, config.image_size)
        normals = [resize_rgb(image, side) for image in check_images(normal, "normal")]
        if len(normals) < 4:
            raise ValueError(
                f"aecsad needs at least 4 normal images (train + held-out split), got {len(normals)}"
            )
        rng = np.random.default_rng(config.seed)
        order = rng.permutation(len(normals))
        n_val = max(2, round(config.val_share * len(normals)))
        held_out = [normals[i] for i in order[:n_val]]
        train = [normals[i] for i in sorted(order[n_val:])]
        calibration = calibration_set(synthetic, held_out, config.image_size, config.calibration_draws, rng)
        cuda = torch.device(config.device).type == "cuda"
        with torch.random.fork_rng(devices=[torch.device(config.device).index or 0] if cuda else []):
            torch.manual_seed(config.seed + 4)  # dropout and anything else that draws from torch's RNG
            self._fit(train, held_out, calibration)

    def _fit(
        self,
        train: list[np.ndarray],
        held_out: list[np.ndarray],
        calibration: list[tuple[np.ndarray, np.ndarray | None]],
    ) -> None:
        config = self.config
        self.notes = []
        self.wrn = self._build_teacher()
        self.teacher_checksum = persist.teacher_checksum(self.wrn)
        if not config.teacher_weights:
            self.notes.append(
                "teacher: random WideResNet-50-2 weights (offline; set aecsad.teacher_weights to "
                f"{WRN50_2_WEIGHTS} or a local .safetensors file for ImageNet weights)"
            )
            logger.warning("aecsad: the teacher has random weights (no aecsad.teacher_weights given)")
        if config.labeler == "unsupervised":
            self.notes.append("pseudo-labels: unsupervised colour/position k-means (no GroundingDINO/SAM)")
        clock = time.perf_counter()
        self.timings = {}
        self.pseudo_labels = make_pseudo_labels(train, self.wrn, config, config.components)
        labels = self.pseudo_labels
        self.timings["pseudo_labels"], clock = time.perf_counter() - clock, time.perf_counter()
        self._build_students(labels.num_classes)
        total = segmentation_steps(config, int(labels.reliable.sum())) + config.lgst_steps
        done = [0]

        def step(count: int) -> None:
            done[0] += count
            if self.progress is not None:
                self.progress(done[0], total)

        assert self.head and self.teacher and self.local and self.global_
        self.history = {
            "segmentation": train_segmentation(
                self.wrn, self.head, train, labels.maps, labels.reliable, config, step
            )
        }
        self.timings["segmentation"], clock = time.perf_counter() - clock, time.perf_counter()
        images = to_tensor(train, config.device)
        self.history["lgst"] = train_lgst(
            self.wrn, self.teacher, self.local, self.global_, images, config, step
        )
        del images
        self.timings["lgst"], clock = time.perf_counter() - clock, time.perf_counter()
        side = config.image_size
        # the histogram's Gaussians come from the training normals, every scale from the held-out ones
        seg_train, _ = self._forward(train)
        self.histogram = PatchHistogram(labels.num_classes, config.hist_grid, config.hist_shrinkage).fit(
            seg_train
        )
        seg_val, raw_val = self._forward(held_out)
        per_map = raw_val.permute(1, 0, 2, 3).flatten(1).double().numpy()  # (3, n * h * w)
        self.map_quantiles = np.quantile(per_map, config.map_quantiles, axis=1).T  # (3, 2)
        combined_val = self._combined(raw_val)
        lgst_val = combined_val.flatten(1).amax(dim=1).double().numpy()[:, None]
        self.zscore = TrimmedZ(config.trim).fit(
            np.concatenate([self.histogram.score(seg_val), lgst_val], axis=1)
        )
        self._calibrate(
            self._z(seg_val, combined_val), self._full_size(combined_val, (side, side)), calibration
        )
        self.timings["statistics"] = time.perf_counter() - clock
        logger.info(
            "aecsad fit: %s", ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.timings.items())
        )

    def _calibrate(
        self, z_val: np.ndarray, maps_val: np.ndarray, calibration: list[tuple[np.ndarray, np.ndarray | None]]
    ) -> None:
        """Fusion weights and thresholds from the held-out normals' z-scores (n, 3) and maps (n, S, S), and
        the calibration anomalies."""
        config = self.config
        self.weights = (1.0, 1.0)
        self.calibration = {"anomalies": len(calibration), "with_masks": 0, "weights": "equal"}
        if not calibration:
            self.thresholds = {
                "image": normal_threshold(fuse(z_val, self.weights), config.trim),
                "pixel": pixel_threshold(maps_val, maps_val[:0], []),
            }
            return
        seg_cal, raw_cal = self._forward([image for image, _ in calibration])
        combined_cal = self._combined(raw_cal)
        z_cal = self._z(seg_cal, combined_cal)
        if config.fusion_weights == "calibrated":
            self.weights = calibrate_weights(z_val, z_cal)
            self.calibration["weights"] = "calibrated"
        self.thresholds = {"image": f1_threshold(fuse(z_val, self.weights), fuse(z_cal, self.weights))}
        masked = [k for k, (_, mask) in enumerate(calibration) if mask is not None and mask.any()]
        self.calibration["with_masks"] = len(masked)
        side = config.image_size
        maps_cal = self._full_size(combined_cal[masked], (side, side)) if masked else maps_val[:0]
        masks = [calibration[k][1] for k in masked]
        self.thresholds["pixel"] = pixel_threshold(maps_val, maps_cal, masks)
        self.notes.append(
            f"synthetic set: calibration only, never trained on ({len(calibration)} anomalies set the "
            "thresholds"
            + (
                f" and the weights w_hist={self.weights[0]:g}, w_lgst={self.weights[1]:g})"
                if config.fusion_weights == "calibrated"
                else ")"
            )
        )

    # ----------------------------------------------------------------------------------------- predict
    def predict(self, images: list[np.ndarray]) -> DetectorOutput:
        """Score RGB uint8 images that share one size: pred_score (N,) and anomaly_map (N, H, W), float32.

        The score is the fused z-score (histogram and LGST); the map is the combined LGST map, resized
        bilinearly to the input size.
        """
        if self.histogram is None or self.wrn is None:
            raise RuntimeError("AecsadDetector.predict called before fit or load")
        checked = check_images(images, "images")
        shapes = sorted({image.shape[:2] for image in checked})
        if len(shapes) > 1:
            raise ValueError(
                f"images must share one size to stack their maps, got {shapes[0]} and {shapes[1]}"
            )
        height, width = shapes[0] if shapes else (self.config.image_size,) * 2
        if not checked:
            return DetectorOutput(np.zeros(0, np.float32), np.zeros((0, height, width), np.float32))
        side = (self.config.image_size, self.config.image_size)
        seg, raw = self._forward([resize_rgb(image, side) for image in checked])
        combined = self._combined(raw)
        scores = fuse(self._z(seg, combined), self.weights)
        return DetectorOutput(
            pred_score=scores.astype(np.float32),
            anomaly_map=self._full_size(combined, (height, width)).astype(np.float32),
        )

    # --------------------------------------------------------------------------------------- save/load
    def _modules(self) -> dict[str, torch.nn.Module]:
        assert self.head and self.teacher and self.local and self.global_
        return {"head": self.head, "teacher": self.teacher, "local": self.local, "global": self.global_}

    def save(self, path: Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` into folder ``path`` (see :mod:`.persist`)."""
        if self.histogram is None or self.wrn is None:
            raise RuntimeError("AecsadDetector.save called before fit or load")
        modules = {**self._modules(), "wrn": self.wrn}
        keep = None if self.config.save_teacher else {"wrn": persist.buffer_keys(self.wrn)}
        tensors = persist.module_tensors(modules, keep)
        tensors.update(persist.array_tensors("histogram", self.histogram.state()))
        tensors.update(persist.array_tensors("zscore", {"mean": self.zscore.mean, "std": self.zscore.std}))
        tensors.update(persist.array_tensors("fit", {"map_quantiles": self.map_quantiles.astype(np.float64)}))
        meta = {
            "detector": self.name,
            "config": self.config.to_dict(),
            "num_classes": self.histogram.num_classes,
            "weights": list(self.weights),
            "thresholds": self.thresholds,
            "calibration": self.calibration,
            "notes": self.notes,
            "teacher_checksum": self.teacher_checksum,
        }
        write_saved(Path(path), meta, tensors)

    @classmethod
    def load(cls, path: Path) -> AecsadDetector:
        """Read a folder written by :meth:`save`; the result predicts exactly as the saved detector did."""
        meta, tensors = read_saved(Path(path), cls.name, "AeCSAD")
        detector = cls(AecsadConfig(**meta["config"]))
        wrn_state = persist.under("wrn", tensors)
        detector.wrn = detector._build_teacher(random=detector.config.save_teacher)
        persist.restore_teacher(detector.wrn, wrn_state, float(meta["teacher_checksum"]), Path(path))
        detector.teacher_checksum = float(meta["teacher_checksum"])
        detector._build_students(int(meta["num_classes"]))
        for prefix, module in detector._modules().items():
            module.load_state_dict(persist.under(prefix, tensors))
            module.eval()
        arrays = {key: value.numpy() for key, value in tensors.items()}
        detector.histogram = PatchHistogram.from_state(persist.under("histogram", arrays))
        detector.zscore = TrimmedZ(detector.config.trim)
        detector.zscore.mean, detector.zscore.std = arrays["zscore.mean"], arrays["zscore.std"]
        detector.map_quantiles = arrays["fit.map_quantiles"]
        detector.weights = (float(meta["weights"][0]), float(meta["weights"][1]))
        detector.thresholds = {key: float(value) for key, value in meta["thresholds"].items()}
        detector.calibration = meta.get("calibration", {})
        detector.notes = list(meta.get("notes", []))
        return detector

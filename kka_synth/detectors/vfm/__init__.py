"""The VFM detector: a DINOv2 backbone adapted with LoRA, an anomaly head, and dense distance scoring.

``fit`` trains LoRA adapters on the backbone's attention and an MLP head on the patch tokens with synthetic
anomalies (a run's curated set, rule-based draws, or the detector's own three-stage generator), then fits a
Gaussian per scoring layer to the adapted tokens of normal patches (or keeps a k-NN memory of them).
``predict`` scores every patch by its distance to the normal patches (Mahalanobis with a shrunk covariance,
or k-NN cosine), fuses it with the head's anomaly probability, and returns the map upsampled to the input
size and smoothed, with the mean of its top-k pixels as the image score.

The two scores live on different scales, so each is first put on the scale of normal patches: a patch's
score minus the median over held-out normal images' patches, divided by the gap between their 99th
percentile and median (for the head at least :data:`HEAD_SCALE_FLOOR`, so that a head that is very sure of
every normal patch cannot blow up its weight). The head's term is clipped at 0: it may add evidence where it
finds a patch more anomalous than the typical normal one, but never subtract from the distance, so a head
that learned little from the synthetic anomalies cannot bury what the distance sees. ``head_weight = 0``
scores by distance alone.

Papers: see :mod:`.model` (DINOv2, registers, LoRA, Mahalanobis, Ledoit-Wolf, k-NN) and :mod:`.train`
(the loss and the built-in anomalies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from kka_synth.detectors.inputs import check_images, prepare_stages, resize_rgb
from kka_synth.detectors.saved import read_saved, write_saved
from kka_synth.detectors.vfm.model import (
    AnomalyHead,
    Backbone,
    PatchDistance,
    gaussian_blur,
    load_dinov2,
    random_dinov2,
)
from kka_synth.detectors.vfm.train import VfmConfig, builtin_stages, train_vfm
from kka_synth.types import DetectorOutput, SyntheticStage
from kka_synth.utils.hub import load_pretrained

__all__ = ["HEAD_SCALE_FLOOR", "VfmConfig", "VfmDetector"]

logger = logging.getLogger(__name__)

HEAD_SCALE_FLOOR = 0.1
"""Smallest normal-patch spread (in probability) the head's score is divided by."""


class VfmDetector:
    """DINOv2 + LoRA + anomaly head on RGB uint8 images: :meth:`fit`, :meth:`predict`, :meth:`save`,
    :meth:`load`.

    Images are resized to one working size (``config.image_size`` or the first normal image's size, rounded
    to multiples of the patch); maps come back at each input's size. Weights are drawn under forked torch RNGs
    and every other choice from seeded numpy generators, so no global random state changes.

    After :meth:`fit`: ``history`` holds one dict per step (``step``, ``stage``, ``loss``, ``bce``,
    ``anchor``, ``positives``, ``negatives``), ``render_errors`` the failed draws, ``skipped_unmasked``
    the fixed anomalies left out for want of a mask, ``distance`` the fitted :class:`PatchDistance`, and
    ``notes`` short sentences the evaluation report shows (random weights, the built-in anomalies, skipped
    entries).
    """

    name = "vfm"
    config_class = VfmConfig
    profiles: dict[str, dict[str, Any]] = {
        "offline": {"model": None, "random_arch": "tiny", "image_size": 128, "layers": [-1], "steps": 48,
                    "batch_size": 8, "lr": 1e-3, "lora_lr": 1e-4},
        "hub": {"model": "facebook/dinov2-base", "image_size": 448, "layers": [-7, -4, -1], "steps": 1000,
                "batch_size": 8, "lr": 1e-3, "lora_lr": 1e-4},
    }  # fmt: skip
    """Field overrides per profile. ``offline`` (the config defaults) draws a random ``tiny`` backbone (192
    wide, 4 blocks, patch 8; about 1.9 M parameters) at 128 px (16 x 16 patches) and trains 48 steps of 8,
    about half a minute on one CPU thread; with random weights its scores are weak, and the report says the
    weights are random. ``hub`` loads dinov2-base at 448 px (32 x 32 patches), scores blocks 6, 9 and 12 (mid
    to last, as the head reads the last) and trains 1,000 steps; it wants a GPU."""

    def __init__(self, config: VfmConfig | None = None, progress: Callable[[int, int], None] | None = None):
        self.config = config or VfmConfig()
        self.progress = progress
        self.backbone: Backbone | None = None
        self.head: AnomalyHead | None = None
        self.size: tuple[int, int] | None = None
        self.layers: list[int] = []
        self.distance: PatchDistance | None = None
        self.scales = torch.tensor([0.0, 1.0, 0.0, 1.0])
        """Median and spread of the distance, then of the head probability, over held-out normal patches."""
        self.history: list[dict[str, Any]] = []
        self.render_errors = 0
        self.skipped_unmasked = 0
        self.notes: list[str] = []

    # ------------------------------------------------------------------------------------------ backbone
    def _build_backbone(self) -> Backbone:
        config = self.config
        if config.model is None:
            model = random_dinov2(config.random_arch, config.seed)
        else:
            model = load_pretrained(load_dinov2, config.model, "the DINOv2 backbone", "vfm.model")
        return Backbone(model).to(config.device)

    def _working_size(self, first: np.ndarray, patch: int) -> tuple[int, int]:
        if self.config.image_size is not None:
            if self.config.image_size % patch:
                raise ValueError(
                    f"vfm.image_size {self.config.image_size} is not a multiple of the patch {patch}"
                )
            return (self.config.image_size, self.config.image_size)
        height, width = (max(patch, round(side / patch) * patch) for side in first.shape[:2])
        return (height, width)

    # ---------------------------------------------------------------------------------------------- fit
    def _prepare_stages(self, synthetic: object, size: tuple[int, int]) -> list[SyntheticStage]:
        """The stages with fixed anomalies checked and resized; entries without a mask are left out."""
        prepared, skipped = prepare_stages(synthetic, size)
        kept = []
        for stage in prepared:
            count = skipped.get(stage.name, 0)
            if count:
                logger.warning("vfm: stage %s: %d anomalies without a mask skipped", stage.name, count)
                self.notes.append(f"stage {stage.name}: {count} anomalies without a mask were skipped")
                self.skipped_unmasked += count
                if not stage.anomalies and stage.draw is None:
                    self.notes.append(
                        f"stage {stage.name}: no anomaly has a mask; its steps were not trained"
                    )
                    continue
            kept.append(stage)
        return kept

    def fit(self, normal: list[np.ndarray], synthetic: list[SyntheticStage] | None = None) -> None:
        """Train LoRA and the head on normal images mixed with synthetic anomalies (stage by stage, each for
        its share of ``config.steps``), then fit the normal-patch statistics and the score scales.

        ``synthetic=None`` trains nothing (normal images only: the frozen backbone scored by distance), or
        on the built-in anomalies (noise, shapes, paste) with ``config.builtin_anomalies``. A
        ``calibration_share`` of the normal images (at least one, when there are two or more) is held out of
        training and statistics and only sets the score scales.
        """
        config = self.config
        normals = check_images(normal, "normal")
        if not normals:
            raise ValueError("normal must hold at least one image")
        self.notes, self.skipped_unmasked = [], 0
        backbone = self._build_backbone()
        size = self._working_size(normals[0], backbone.patch_size)
        layers = backbone.resolve(config.layers)
        stages = None if synthetic is None else self._prepare_stages(synthetic, size)
        resized = [resize_rgb(image, size) for image in normals]
        order = np.random.default_rng(config.seed).permutation(len(resized))
        held = min(max(1, round(config.calibration_share * len(resized))), len(resized) - 1)
        calibration = [resized[i] for i in order[:held]] or resized
        training = [resized[i] for i in order[held:]]
        if config.model is None:
            self.notes.append(
                f"backbone weights are random ({config.random_arch} architecture, offline profile)"
            )
        head = None
        self.history, self.render_errors = [], 0
        if stages is None and not config.builtin_anomalies:
            self.notes.append("no synthetic set: frozen backbone, scored by distance alone")
        elif config.steps > 0:
            if stages is None:
                stages = builtin_stages(training)
                self.notes.append(
                    "no synthetic set given: trained on the built-in noise, shape and paste anomalies"
                )
            if config.lora_rank > 0:
                backbone.add_lora(config.lora_rank, config.lora_alpha, config.lora_targets,
                                  config.lora_dropout, config.seed + 2)  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 3)
                head = AnomalyHead(backbone.hidden_size, config.head_widths).to(config.device)
            if stages:
                self.history, self.render_errors = train_vfm(
                    backbone, head, training, stages, config, layers, self.progress
                )
            else:
                head = None
                self.notes.append("no synthetic stage left to train on: scored by distance alone")
        self.backbone, self.head, self.size, self.layers = backbone, head, size, layers
        self._fit_distance(training)
        self._calibrate(calibration)

    def _batches(self, images: list[np.ndarray]) -> Iterator[torch.Tensor]:
        """Yield (B, 3, H, W) float tensors in [0, 1] of ``eval_batch_size`` images at the working size."""
        step = self.config.eval_batch_size
        for start in range(0, len(images), step):
            chunk = np.stack(images[start : start + step])  # (B, H, W, 3)
            yield torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div(255.0).to(self.config.device)

    def _tokens(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Block -> (B, N, D) float32 tokens of the scoring layers (and of the last block for the head)."""
        assert self.backbone is not None
        blocks = sorted({*self.layers, self.backbone.num_layers}) if self.head is not None else self.layers
        device = torch.device(self.config.device).type
        with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=self.config.bf16):
            tokens = self.backbone(x, blocks)
        return {block: t.float() for block, t in zip(blocks, tokens, strict=True)}

    def _fit_distance(self, images: list[np.ndarray]) -> None:
        """The normal-patch statistics (or memory) of the scoring blocks, streamed over ``images``."""
        assert self.backbone is not None and self.size is not None
        config = self.config
        self.distance = PatchDistance(config.scorer, self.layers, config.knn_k)
        patches = (self.size[0] // self.backbone.patch_size) * (self.size[1] // self.backbone.patch_size)
        batches = (self._tokens(x) for x in self._batches(images))
        rng = np.random.default_rng(config.seed + 4)
        self.distance.fit(batches, len(images) * patches, config.shrinkage, config.memory_size, rng)

    def _patch_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, H, W) -> (distance (B, N), head probability (B, N) or None)."""
        assert self.backbone is not None and self.distance is not None
        tokens = self._tokens(x)
        probability = None
        if self.head is not None and self.config.head_weight > 0:
            with torch.inference_mode():
                logits = self.head(tokens[self.backbone.num_layers])
            probability = torch.sigmoid(logits / self.config.temperature)
        return self.distance(tokens), probability

    def _calibrate(self, images: list[np.ndarray]) -> None:
        """Median and 99th-percentile gap of both scores over the held-out normal images' patches."""
        distances, probabilities = [], []
        for x in self._batches(images):
            distance, probability = self._patch_scores(x)
            distances.append(distance.flatten().cpu())
            if probability is not None:
                probabilities.append(probability.flatten().cpu())
        values = [torch.cat(distances)]
        if probabilities:
            values.append(torch.cat(probabilities))
        scale = []
        for index, value in enumerate(values):
            median, high = torch.quantile(value.double(), torch.tensor([0.5, 0.99], dtype=torch.float64))
            floor = HEAD_SCALE_FLOOR if index == 1 else 1e-6
            scale += [float(median), max(float(high - median), floor)]
        self.scales = torch.tensor(scale + [0.0, 1.0] * (2 - len(values)), dtype=torch.float32)

    # ------------------------------------------------------------------------------------------ predict
    def predict(self, images: list[np.ndarray]) -> DetectorOutput:
        """Score RGB uint8 images of one size: pred_score (N,) and anomaly_map (N, H, W), float32.

        The patch map is the fused normalised score (about 0 on typical normal patches, 1 at their 99th
        percentile), upsampled bilinearly to the working size, Gaussian-smoothed and resized to the input
        size; the image score is the mean of its top ``top_k`` share of pixels at the working size.
        """
        if self.backbone is None or self.size is None or self.distance is None:
            raise RuntimeError("VfmDetector.predict called before fit or load")
        checked = check_images(images, "images")
        shapes = sorted({image.shape[:2] for image in checked})
        if len(shapes) > 1:
            raise ValueError(
                f"images must share one size to stack their maps, got {shapes[0]} and {shapes[1]}"
            )
        height, width = shapes[0] if shapes else self.size
        grid = (self.size[0] // self.backbone.patch_size, self.size[1] // self.backbone.patch_size)
        d_median, d_scale, h_median, h_scale = self.scales.tolist()
        count = max(1, round(self.config.top_k * self.size[0] * self.size[1]))
        scores, maps = [], []
        for x in self._batches([resize_rgb(image, self.size) for image in checked]):
            distance, probability = self._patch_scores(x)
            fused = self.config.distance_weight * (distance - d_median) / d_scale
            if probability is not None:
                fused = fused + self.config.head_weight * ((probability - h_median) / h_scale).clamp_min(0.0)
            patch_map = fused.reshape(-1, 1, *grid)  # (B, 1, h, w)
            amap = F.interpolate(patch_map, size=self.size, mode="bilinear", align_corners=False)
            amap = gaussian_blur(amap, self.config.smooth_sigma)  # (B, 1, H', W')
            scores.append(amap.flatten(1).topk(count, dim=1).values.mean(dim=1).cpu())
            full = F.interpolate(amap, size=(height, width), mode="bilinear", align_corners=False)
            maps.append(full[:, 0].cpu())
        if not scores:
            return DetectorOutput(np.zeros(0, np.float32), np.zeros((0, height, width), np.float32))
        return DetectorOutput(
            pred_score=torch.cat(scores).numpy().astype(np.float32),
            anomaly_map=torch.cat(maps).numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------------------------------- save/load
    def save(self, path: Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (LoRA adapter, head, statistics; not the
        backbone, which :meth:`load` rebuilds from ``config.model`` or the seed) into folder ``path``."""
        if self.backbone is None or self.size is None or self.distance is None:
            raise RuntimeError("VfmDetector.save called before fit or load")
        tensors = {f"lora.{k}": v for k, v in self.backbone.adapter_state().items()}
        if self.head is not None:
            tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        tensors.update({f"distance.{k}": v for k, v in self.distance.tensors.items()})
        tensors["scales"] = self.scales
        meta = {
            "detector": self.name,
            "size": list(self.size),
            "layers": self.layers,
            "lora": self.backbone.has_lora,
            "head": self.head is not None,
            "shrinkage": self.distance.shrinkage,
            "notes": self.notes,
            "config": self.config.to_dict(),
        }
        write_saved(path, meta, tensors)

    @classmethod
    def load(cls, path: Path) -> VfmDetector:
        """Read a folder written by :meth:`save`; the backbone comes from ``config.model`` (or the seed)."""
        meta, tensors = read_saved(path, cls.name, "VFM")
        detector = cls(VfmConfig(**meta["config"]))
        config = detector.config
        tensors = {key: value.to(config.device) for key, value in tensors.items()}
        backbone = detector._build_backbone()
        if meta["lora"]:
            backbone.add_lora(
                config.lora_rank, config.lora_alpha, config.lora_targets, config.lora_dropout, 0
            )
            backbone.load_adapter_state({k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        if meta["head"]:
            detector.head = AnomalyHead(backbone.hidden_size, config.head_widths).to(config.device).eval()
            detector.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        detector.backbone = backbone
        detector.distance = PatchDistance(config.scorer, [int(v) for v in meta["layers"]], config.knn_k)
        detector.distance.tensors = {k[9:]: v for k, v in tensors.items() if k.startswith("distance.")}
        detector.distance.shrinkage = list(meta.get("shrinkage", []))
        detector.scales = tensors["scales"].cpu()
        detector.size = (int(meta["size"][0]), int(meta["size"][1]))
        detector.layers = [int(v) for v in meta["layers"]]
        detector.notes = list(meta.get("notes", []))
        return detector

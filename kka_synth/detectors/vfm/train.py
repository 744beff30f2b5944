"""The VFM detector's settings, its own synthetic anomalies, and the loop that trains LoRA and the head.

Training sees normal images, each turned into a synthetic anomaly with probability ``anomaly_prob``. The
mask of an anomaly labels the patch grid: a patch whose area the mask covers by at least
``positive_coverage`` is a positive, a patch it does not touch is a negative, and a partly covered patch is
left out. The head's logits ``z`` are divided by a temperature ``T`` and trained with a class-balanced
binary cross-entropy (the "confidence loss"): the mean of ``softplus(-z / T)`` over positives plus the mean of
``softplus(z / T)`` over negatives, each class averaged on its own so that a defect's few patches are not
drowned by the many normal ones.

So that adapting the backbone does not spoil the distance scoring, an anchor term keeps the negatives'
adapted tokens at every scoring layer pointing where the pretrained tokens point: ``anchor_weight`` times the
mean of ``1 - cos(adapted, pretrained)``. The normal-patch statistics are computed on the adapted features
after training, so the distance always describes the model that scores.

Without a synthetic set, the detector draws its own anomalies in three stages, a third of the steps each:

- ``noise``: a thresholded Perlin blob in a random window, filled with two-colour fractal noise (after the
  texture anomalies of DRAEM, Zavrtanik et al., ICCV 2021);
- ``shapes``: a filled rectangle, ellipse or polygon, or a thick line, in a colour that stands out;
- ``paste``: a rectangle of another normal image, flipped or rotated and with its brightness changed, pasted
  elsewhere (CutPaste, Li et al., CVPR 2021, across images).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from kka_synth.config import check_config, help_field
from kka_synth.detectors.vfm.model import RANDOM_ARCHS, AnomalyHead, Backbone
from kka_synth.synth.base import RenderError
from kka_synth.synth.perlin import fractal_noise, perlin_noise
from kka_synth.types import SyntheticStage

logger = logging.getLogger(__name__)

SCORERS = ("mahalanobis", "knn")


@dataclass
class VfmConfig:
    """Settings of a VFM detector; the defaults are the offline profile (random tiny backbone, CPU)."""

    model: str | None = help_field(
        "Hub id or local directory of a DINOv2 model (with or without registers); None builds random "
        "weights of random_arch (the offline profile).",
        default=None,
    )
    random_arch: str = help_field(
        "Shape of the random backbone when model is None: " + ", ".join(RANDOM_ARCHS) + ".", default="tiny"
    )
    image_size: int | None = help_field(
        "Side images are resized to (a multiple of the patch size); None uses the first normal image's "
        "size, each side rounded to a multiple of the patch size.",
        default=128,
    )
    layers: list[int] = help_field("Blocks scored (1 = first, -1 = last).", default_factory=lambda: [-1])
    lora_rank: int = help_field("LoRA rank; 0 trains no adapter (the backbone stays frozen).", default=8)
    lora_alpha: float = help_field("LoRA alpha (the update is scaled by alpha / rank).", default=16.0)
    lora_targets: list[str] = help_field("Modules LoRA adapts.", default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = help_field("Dropout on the LoRA input.", default=0.0)
    head_widths: list[int] = help_field(
        "Hidden widths of the anomaly head's MLP (input: the hidden size; output: one logit).",
        default_factory=lambda: [512, 256],
    )
    steps: int = help_field("Training steps in all, shared by the stages; 0 trains nothing.", default=48)
    builtin_anomalies: bool = help_field(
        "With no synthetic set, train on the built-in noise, shape and paste anomalies. Off (default), a fit "
        "without synthetic data trains nothing and scores by distance alone: the evaluation's none variant.",
        default=False,
    )
    batch_size: int = help_field("Images per training step.", default=8)
    lr: float = help_field("AdamW learning rate of the head.", default=1e-3)
    lora_lr: float = help_field("AdamW learning rate of the LoRA weights.", default=1e-4)
    anomaly_prob: float = help_field("Chance that a training image becomes a synthetic anomaly.", default=0.5)
    positive_coverage: float = help_field(
        "Share of a patch a mask must cover to make it a positive; partly covered patches are left out.",
        default=0.25,
    )
    temperature: float = help_field("Divides the head's logits in the loss and in scoring.", default=1.0)
    anchor_weight: float = help_field(
        "Weight of the term keeping normal patches' adapted tokens aligned with the pretrained ones.",
        default=1.0,
    )
    scorer: str = help_field("Distance to the normal patches: mahalanobis or knn.", default="mahalanobis")
    shrinkage: float | None = help_field(
        "Covariance shrinkage towards a scaled identity, in [0, 1]; None takes the Ledoit-Wolf value.",
        default=None,
    )
    memory_size: int = help_field("Normal patches kept for the knn scorer.", default=16384)
    knn_k: int = help_field("Neighbours averaged by the knn scorer.", default=1)
    distance_weight: float = help_field("Weight of the normalised distance in the fused map.", default=1.0)
    head_weight: float = help_field(
        "Weight of the normalised head probability in the fused map; 0 scores by distance alone.", default=0.5
    )
    calibration_share: float = help_field(
        "Share of the normal images held out to put both scores on one scale (at least one image).",
        default=0.1,
    )
    smooth_sigma: float = help_field("Gaussian smoothing of the map at the working size (px).", default=4.0)
    top_k: float = help_field("Share of the map's top pixels averaged into the image score.", default=0.01)
    eval_batch_size: int = help_field("Images per forward pass outside training.", default=16)
    bf16: bool = help_field("Run the backbone under bfloat16 autocast (on a GPU).", default=False)
    seed: int = help_field("Seed of random weights, LoRA, the head, batches and anomalies.", default=0)
    device: str = help_field("Torch device for training and inference.", default="cpu")

    def __post_init__(self) -> None:
        rules = [  # (field, holds, what the field must be)
            ("model", self.model is None or bool(self.model), "None or a Hub id / directory"),
            ("random_arch", self.random_arch in RANDOM_ARCHS, f"one of {', '.join(RANDOM_ARCHS)}"),
            ("image_size", self.image_size is None or self.image_size >= 8, "None or >= 8"),
            ("layers", bool(self.layers) and all(isinstance(v, int) and v != 0 for v in self.layers),
             "non-zero block indices"),
            ("lora_rank", self.lora_rank >= 0, ">= 0"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_targets", bool(self.lora_targets), "at least one module name"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)"),
            ("head_widths", all(w >= 1 for w in self.head_widths), "widths >= 1"),
            ("steps", self.steps >= 0, ">= 0"),
            ("head_weight", self.steps > 0 or self.head_weight == 0.0, "0 when vfm.steps is 0 (no head)"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("lr", 0.0 < self.lr < 1.0, "in (0, 1)"),
            ("lora_lr", 0.0 < self.lora_lr < 1.0, "in (0, 1)"),
            ("anomaly_prob", 0.0 <= self.anomaly_prob <= 1.0, "in [0, 1]"),
            ("positive_coverage", 0.0 < self.positive_coverage <= 1.0, "in (0, 1]"),
            ("temperature", self.temperature > 0, "> 0"),
            ("anchor_weight", self.anchor_weight >= 0, ">= 0"),
            ("scorer", self.scorer in SCORERS, f"one of {', '.join(SCORERS)}"),
            ("shrinkage", self.shrinkage is None or 0.0 <= self.shrinkage <= 1.0, "None or in [0, 1]"),
            ("memory_size", self.memory_size >= 1, ">= 1"),
            ("knn_k", self.knn_k >= 1, ">= 1"),
            ("distance_weight", self.distance_weight >= 0, ">= 0"),
            ("head_weight", self.head_weight >= 0 and self.distance_weight + self.head_weight > 0,
             ">= 0, and not 0 when vfm.distance_weight is 0"),
            ("calibration_share", 0.0 < self.calibration_share < 1.0, "in (0, 1)"),
            ("smooth_sigma", self.smooth_sigma >= 0, ">= 0"),
            ("top_k", 0.0 < self.top_k <= 1.0, "in (0, 1]"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("device", bool(self.device), "a torch device"),
        ]  # fmt: skip
        for name, holds, rule in rules:
            check_config(holds, f"vfm.{name} must be {rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------- built-in anomalies
def _contrasting_colour(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB colour at least 60 grey levels from the mean under ``mask`` in some channel."""
    mean = image[mask].mean(axis=0)
    for _ in range(8):
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        if np.abs(colour - mean).max() >= 60:
            return colour
    return np.where(mean < 128, 255.0, 0.0).astype(np.float32)


def _blend(image: np.ndarray, fill: np.ndarray, mask: np.ndarray, opacity: float) -> np.ndarray:
    out = image.astype(np.float32)
    out[mask] = (1.0 - opacity) * out[mask] + opacity * fill[mask]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _window(shape: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(y, x, height, width) of a random window between 1/8 and 1/3 of each side (at least 4 px)."""
    height, width = shape
    wh = int(rng.integers(max(4, height // 8), max(5, height // 3) + 1))
    ww = int(rng.integers(max(4, width // 8), max(5, width // 3) + 1))
    wh, ww = min(wh, height), min(ww, width)
    return int(rng.integers(height - wh + 1)), int(rng.integers(width - ww + 1)), wh, ww


def texture_noise(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A Perlin blob in a random window, filled with two-colour fractal noise: (image, mask)."""
    y, x, wh, ww = _window(image.shape[:2], rng)
    blob = perlin_noise((wh, ww), (float(rng.uniform(1.0, 2.5)),) * 2, rng, float(rng.uniform(0, np.pi)))
    inner = blob > np.quantile(blob, rng.uniform(0.3, 0.7))
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[y : y + wh, x : x + ww] = inner
    if not mask.any():
        raise RenderError("empty_mask", "the noise blob covers no pixel")
    texture = (fractal_noise(image.shape[:2], (8.0, 8.0), rng) + 1.0) / 2.0  # (H, W) in [0, 1]
    low, high = _contrasting_colour(image, mask, rng), rng.integers(0, 256, size=3).astype(np.float32)
    fill = low + texture[..., None] * (high - low)  # (H, W, 3)
    return _blend(image, fill, mask, float(rng.uniform(0.6, 1.0))), mask


def geometric_shape(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A filled rectangle, ellipse or polygon, or a thick line, in a standing-out colour: (image, mask)."""
    y, x, wh, ww = _window(image.shape[:2], rng)
    canvas = np.zeros(image.shape[:2], dtype=np.uint8)
    kind = int(rng.integers(4))
    if kind == 0:
        cv2.rectangle(canvas, (x, y), (x + ww - 1, y + wh - 1), 1, thickness=-1)
    elif kind == 1:
        cv2.ellipse(canvas, (x + ww // 2, y + wh // 2), (max(1, ww // 2), max(1, wh // 2)),
                    float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)  # fmt: skip
    elif kind == 2:
        points = np.stack([x + rng.integers(0, ww, 5), y + rng.integers(0, wh, 5)], axis=1)
        cv2.fillPoly(canvas, [cv2.convexHull(points.astype(np.int32))], 1)
    else:
        thickness = max(1, min(image.shape[:2]) // 48)
        cv2.line(canvas, (x, y), (x + ww - 1, y + wh - 1), 1, thickness=thickness)
    mask = canvas.astype(bool)
    if not mask.any():
        raise RenderError("empty_mask", "the shape covers no pixel")
    fill = np.broadcast_to(_contrasting_colour(image, mask, rng), image.shape)
    return _blend(image, fill, mask, float(rng.uniform(0.7, 1.0))), mask


class PasteAcross:
    """``draw(image, rng)``: a rectangle of another normal image, flipped or rotated and brightness-jittered,
    pasted at a random place; a paste that changes the pixels by less than ``min_change`` grey levels on
    average is redrawn (up to ``attempts`` times)."""

    def __init__(self, normals: Sequence[np.ndarray], min_change: float = 8.0, attempts: int = 4):
        self.normals, self.min_change, self.attempts = list(normals), min_change, attempts

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        height, width = image.shape[:2]
        for _ in range(self.attempts):
            source = self.normals[int(rng.integers(len(self.normals)))]
            if source.shape != image.shape:
                source = cv2.resize(source, (width, height), interpolation=cv2.INTER_AREA)
            _, _, wh, ww = _window((height, width), rng)
            side = min(wh, ww) if rng.random() < 0.5 else None  # square pieces may be rotated
            wh, ww = (side, side) if side else (wh, ww)
            sy, sx = int(rng.integers(height - wh + 1)), int(rng.integers(width - ww + 1))
            piece = source[sy : sy + wh, sx : sx + ww].astype(np.float32)
            piece = np.rot90(piece, int(rng.integers(1, 4))) if side else piece[:: rng.choice([-1, 1]), ::-1]
            piece = np.clip(piece * rng.uniform(0.75, 1.25), 0, 255)
            y, x = int(rng.integers(height - wh + 1)), int(rng.integers(width - ww + 1))
            before = image[y : y + wh, x : x + ww].astype(np.float32)
            if np.abs(piece - before).mean() < self.min_change:
                continue
            out = image.copy()
            out[y : y + wh, x : x + ww] = np.rint(piece).astype(np.uint8)
            mask = np.zeros((height, width), dtype=bool)
            mask[y : y + wh, x : x + ww] = True
            return out, mask
        raise RenderError("unchanged", f"no pasted piece changed the image in {self.attempts} attempts")


def builtin_stages(normals: Sequence[np.ndarray]) -> list[SyntheticStage]:
    """The three stages used without a synthetic set: noise, shapes, paste, a third of the steps each."""
    return [
        SyntheticStage("noise", draw=texture_noise, share=1 / 3),
        SyntheticStage("shapes", draw=geometric_shape, share=1 / 3),
        SyntheticStage("paste", draw=PasteAcross(normals), share=1 / 3),
    ]


# --------------------------------------------------------------------------------------------- the loop
def stage_steps(stages: Sequence[SyntheticStage], steps: int) -> list[int]:
    """Steps per stage, with boundaries at ``round(cumulative share * steps)``."""
    bounds = np.rint(np.cumsum([stage.share for stage in stages]) * steps).astype(int)
    return np.diff(np.concatenate([[0], bounds])).tolist()


def patch_labels(masks: torch.Tensor, patch: int, positive_coverage: float) -> torch.Tensor:
    """(B, H, W) bool masks -> (B, h * w) patch labels: 1 where the mask covers ``positive_coverage`` or more,
    0 where it covers nothing, -1 (left out) otherwise."""
    coverage = F.avg_pool2d(masks[:, None].float(), patch).flatten(1)  # (B, h * w)
    labels = torch.full_like(coverage, -1.0)
    labels[coverage == 0] = 0.0
    labels[coverage >= positive_coverage] = 1.0
    return labels.long()


def confidence_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class-balanced BCE of ``logits / temperature`` against labels 1 / 0 (-1 left out): the mean of
    ``softplus(-z)`` over positives plus the mean of ``softplus(z)`` over negatives; a class with no patch
    adds 0."""
    z = logits / temperature
    loss = logits.new_zeros(())
    for label, sign in ((1, -1.0), (0, 1.0)):
        chosen = labels == label
        if chosen.any():
            loss = loss + F.softplus(sign * z[chosen]).mean()
    return loss


def _draw(
    stage: SyntheticStage, normal: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    if stage.anomalies:
        image, mask, _ = stage.anomalies[int(rng.integers(len(stage.anomalies)))]
        return image, mask
    assert stage.draw is not None
    image, mask = stage.draw(normal, rng)
    if image.shape != normal.shape or mask.shape != normal.shape[:2]:
        raise ValueError(f"stage {stage.name!r}: draw returned shapes {image.shape} and {mask.shape}")
    return image, mask.astype(bool)


def train_vfm(
    backbone: Backbone,
    head: AnomalyHead,
    normals: list[np.ndarray],
    stages: Sequence[SyntheticStage],
    config: VfmConfig,
    layers: list[int],
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Train the head and the LoRA weights in place; return (per-step history, number of failed draws).

    ``normals`` and the stages' fixed anomalies are RGB uint8 at the working size. ``layers`` are the resolved
    scoring blocks (the anchor's); the head reads the last block.
    """
    rng = np.random.default_rng(config.seed + 1)
    device, last = config.device, backbone.num_layers
    used = sorted({*layers, last})
    lora = [p for p in backbone.parameters() if p.requires_grad]
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    if lora:
        groups.append({"params": lora, "lr": config.lora_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    plan = list(zip(stages, stage_steps(stages, config.steps), strict=True))
    total = sum(count for _, count in plan)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.bf16)
    history: list[dict[str, Any]] = []
    errors = 0
    head.train()
    backbone.train()
    for stage, count in plan:
        for _ in range(count):
            images, masks = [], []
            for _ in range(config.batch_size):
                normal = normals[int(rng.integers(len(normals)))]
                image, mask = normal, np.zeros(normal.shape[:2], dtype=bool)
                if rng.random() < config.anomaly_prob:
                    try:
                        image, mask = _draw(stage, normal, rng)
                    except RenderError as error:
                        errors += 1
                        logger.debug("stage %s: draw failed (%s); the item stays normal", stage.name, error)
                images.append(image)
                masks.append(mask)
            x = (
                torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(device)
            )  # (B, 3, H, W)
            labels = patch_labels(torch.from_numpy(np.stack(masks)).to(device), backbone.patch_size,
                                  config.positive_coverage)  # (B, N)  # fmt: skip
            with autocast:
                tokens = dict(zip(used, backbone(x, used), strict=True))  # block -> (B, N, D)
                logits = head(tokens[last].float())  # (B, N)
            bce = confidence_loss(logits.float(), labels, config.temperature)
            anchor = logits.new_zeros(())
            if config.anchor_weight > 0 and backbone.has_lora and (labels == 0).any():
                with torch.no_grad(), backbone.without_adapter(), autocast:
                    reference = backbone(x, layers)
                negatives = labels == 0
                for block, ref in zip(layers, reference, strict=True):
                    cosine = F.cosine_similarity(
                        tokens[block].float()[negatives], ref.float()[negatives], dim=-1
                    )
                    anchor = anchor + (1.0 - cosine).mean() / len(layers)
            loss = bce + config.anchor_weight * anchor
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            history.append(
                {
                    "step": len(history),
                    "stage": stage.name,
                    "loss": loss.item(),
                    "bce": bce.item(),
                    "anchor": anchor.item(),
                    "positives": int((labels == 1).sum()),
                    "negatives": int((labels == 0).sum()),
                }
            )
            if len(history) % 20 == 0:
                logger.debug("vfm step %d/%d: loss %.4f", len(history), total, history[-1]["loss"])
            if progress is not None:
                progress(len(history), total)
    head.eval()
    backbone.eval()
    if errors:
        logger.warning("vfm: %d anomaly draws failed and were kept as normal images", errors)
    return history, errors


__all__ = [
    "VfmConfig",
    "builtin_stages",
    "confidence_loss",
    "geometric_shape",
    "patch_labels",
    "PasteAcross",
    "stage_steps",
    "texture_noise",
    "train_vfm",
]

"""DRAEM's configuration, losses and training loop (plain PyTorch).

Follows Zavrtanik, Kristan and Skočaj, "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection" (ICCV 2021). Each step takes a batch of normal images and turns each item into a
synthetic anomaly with probability ``anomaly_prob`` (the paper: 0.5). The reconstructive sub-network is
trained to return the clean image with an L2 plus SSIM loss; the discriminative sub-network segments the
anomaly with a focal loss (gamma 2). The three terms are summed with weight 1, as in the paper.

Where a fixed anomaly has no clean source, its target is the anomalous image itself and the reconstruction
loss is masked out inside the anomaly (the network is not taught to copy the defect, nor told what lies
under it).

Learning rate: the paper trains for 700 epochs at 1e-4 and multiplies the rate by 0.2 at 80% and 90% of
training. The same step decay is kept here, but the offline profile trains for about a hundred steps from
scratch, where 1e-4 barely moves the networks. On the demo at that budget, 2e-3 gave the best image AUROC
of the rates tried (1e-3, 2e-3, 3e-3, 5e-3; 5e-3 was as good on one category and worse on the other) and
never diverged, so it is the default. The hub profile, with its long schedule, keeps the paper's 1e-4.

Training may run on random crops (``crop``) of the working-size images: the networks are fully
convolutional, so a crop keeps the image's resolution at a fraction of the cost, and an anomaly's crop is
placed to hold one of its pixels so that no drawn anomaly is wasted. On the 128 px demo, training on whole
images downsampled to 64 px did better in the same time than 64 px crops at full resolution (the whole
image gives the context), so the offline defaults downsample and leave ``crop`` off.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from kka_synth.config import check_config, help_field
from kka_synth.detectors.draem.model import DraemModel
from kka_synth.synth.base import RenderError
from kka_synth.types import SyntheticStage

logger = logging.getLogger(__name__)

STRIDE = 32
"""Working image sides and crops are multiples of this (five poolings in the discriminative U-Net)."""

LR_MILESTONES = (0.8, 0.9)
"""Shares of the steps after which the learning rate is multiplied by ``LR_DECAY`` (the paper's schedule)."""

LR_DECAY = 0.2

SSIM_WINDOW = 11
"""Side of the Gaussian SSIM window (sigma 1.5), as in Wang et al. and DRAEM."""


@dataclass
class DraemConfig:
    """Settings of a DRAEM detector; the defaults are the offline profile (small widths, CPU)."""

    recon_width: int = help_field("Base width of the reconstructive sub-network (paper: 128).", default=8)
    disc_width: int = help_field("Base width of the discriminative sub-network (paper: 64).", default=8)
    image_size: int | None = help_field(
        "Side that images are resized to (a multiple of 32); None uses the first normal image's size, "
        "each side rounded to a multiple of 32.",
        default=64,
    )
    crop: int | None = help_field(
        "Train on random crops of this side (a multiple of 32); None trains on whole images.", default=None
    )
    steps: int = help_field("Optimisation steps in all (the synthetic stages share them).", default=120)
    batch_size: int = help_field("Images per training step.", default=8)
    eval_batch_size: int = help_field("Images per forward pass in predict.", default=16)
    lr: float = help_field("Adam learning rate (decayed by 0.2 at 80% and 90% of the steps).", default=2e-3)
    anomaly_prob: float = help_field("Chance that a training item becomes a synthetic anomaly.", default=0.5)
    focal_gamma: float = help_field("Focusing parameter of the focal loss.", default=2.0)
    score_kernel: int = help_field(
        "Side of the mean filter before the image score's max, at 256 px (scaled with the image).",
        default=21,
    )
    seed: int = help_field("Seed of the weights, the batches and the anomalies drawn.", default=0)
    device: str = help_field("Torch device for training and inference.", default="cpu")

    def __post_init__(self) -> None:
        check_config(self.recon_width >= 1, f"draem.recon_width must be >= 1, got {self.recon_width}")
        check_config(self.disc_width >= 1, f"draem.disc_width must be >= 1, got {self.disc_width}")
        check_config(
            self.image_size is None or (self.image_size >= STRIDE and self.image_size % STRIDE == 0),
            f"draem.image_size must be None or a multiple of {STRIDE}, got {self.image_size}",
        )
        check_config(
            self.crop is None or (self.crop >= STRIDE and self.crop % STRIDE == 0),
            f"draem.crop must be None or a multiple of {STRIDE}, got {self.crop}",
        )
        check_config(
            self.crop is None or self.image_size is None or self.crop <= self.image_size,
            f"draem.crop {self.crop} must not exceed draem.image_size {self.image_size}",
        )
        check_config(self.steps >= 1, f"draem.steps must be >= 1, got {self.steps}")
        check_config(
            self.batch_size >= 2, f"draem.batch_size must be >= 2 (batch norm), got {self.batch_size}"
        )
        check_config(
            self.eval_batch_size >= 1, f"draem.eval_batch_size must be >= 1, got {self.eval_batch_size}"
        )
        check_config(0.0 < self.lr < 1.0, f"draem.lr must be in (0, 1), got {self.lr}")
        check_config(
            0.0 <= self.anomaly_prob <= 1.0, f"draem.anomaly_prob must be in [0, 1], got {self.anomaly_prob}"
        )
        check_config(self.focal_gamma >= 0.0, f"draem.focal_gamma must be >= 0, got {self.focal_gamma}")
        check_config(self.score_kernel >= 1, f"draem.score_kernel must be >= 1, got {self.score_kernel}")
        check_config(bool(self.device), "draem.device must name a torch device")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- losses
def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    """(C, 1, size, size) normalised Gaussian kernel for a depthwise convolution."""
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """(B, C, H, W) images in [0, 1] -> (B, 1, H, W) SSIM per pixel, averaged over channels.

    Local statistics use a Gaussian window (sigma 1.5) with zero padding; the constants are
    ``(0.01 L)^2`` and ``(0.03 L)^2`` with ``L = 1`` (Wang et al., 2004).
    """
    channels = x.shape[1]
    kernel = _gaussian_window(window, 1.5, channels, x)
    pad = window // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, padding=pad, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean(dim=1, keepdim=True)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (B, 1, H, W) weighted by ``weight`` (B, 1, H, W) or plain when None."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``1 - mean SSIM`` of (B, C, H, W) images; ``weight`` (B, 1, H, W) restricts the mean to some pixels."""
    return 1.0 - _weighted_mean(ssim_map(x, y), weight)


def l2_loss(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of (B, C, H, W) images, weighted per pixel by ``weight`` (B, 1, H, W)."""
    return _weighted_mean((x - y).pow(2).mean(dim=1, keepdim=True), weight)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) of (B, 2, H, W) logits against a (B, H, W) 0/1 target.

    ``mean(-(1 - p_t)^gamma * log p_t)`` over pixels, where ``p_t`` is the softmax probability of the true
    class; ``gamma = 0`` gives the cross-entropy.
    """
    log_p = F.log_softmax(logits, dim=1)  # (B, 2, H, W)
    log_pt = log_p.gather(1, target.long()[:, None]).squeeze(1)  # (B, H, W)
    return (-((1.0 - log_pt.exp()) ** gamma) * log_pt).mean()


# -------------------------------------------------------------------------------------------------- batches
@dataclass
class _Item:
    image: np.ndarray  # (H, W, 3) uint8, the network's input
    target: np.ndarray  # (H, W, 3) uint8, what the reconstruction should be
    mask: np.ndarray  # (H, W) bool, the anomaly
    masked_loss: bool  # leave the reconstruction loss out inside the mask


def _crop_item(item: _Item, crop: int, rng: np.random.Generator) -> _Item:
    """A random crop x crop window of an item; an anomaly's window holds one of its pixels."""
    height, width = item.mask.shape
    if item.mask.any():
        ys, xs = np.nonzero(item.mask)
        pick = int(rng.integers(len(ys)))
        y = int(rng.integers(max(0, ys[pick] - crop + 1), min(height - crop, ys[pick]) + 1))
        x = int(rng.integers(max(0, xs[pick] - crop + 1), min(width - crop, xs[pick]) + 1))
    else:
        y, x = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
    window = (slice(y, y + crop), slice(x, x + crop))
    return _Item(item.image[window], item.target[window], item.mask[window], item.masked_loss)


def _to_tensor(images: Sequence[np.ndarray], device: str) -> torch.Tensor:
    """List of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    array = np.stack(images).astype(np.float32) / 255.0  # (B, H, W, 3)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


def stage_steps(stages: Sequence[SyntheticStage], steps: int) -> list[int]:
    """Steps per stage: boundaries at ``round(cumulative share * steps)``, so shares summing to 1 use all
    ``steps`` exactly and shares summing below 1 use fewer."""
    bounds = np.rint(np.cumsum([stage.share for stage in stages]) * steps).astype(int)
    return np.diff(np.concatenate([[0], bounds])).tolist()


class _Sampler:
    """Draws training items: normal images, each made a stage's anomaly with probability ``anomaly_prob``."""

    def __init__(self, normals: list[np.ndarray], config: DraemConfig, rng: np.random.Generator):
        self.normals, self.config, self.rng = normals, config, rng
        self.render_errors = 0
        self._empty = np.zeros(normals[0].shape[:2], dtype=bool)

    def item(self, stage: SyntheticStage | None) -> _Item:
        normal = self.normals[int(self.rng.integers(len(self.normals)))]
        if stage is None or self.rng.random() >= self.config.anomaly_prob:
            return _Item(normal, normal, self._empty, False)
        if stage.anomalies:
            image, mask, clean = stage.anomalies[int(self.rng.integers(len(stage.anomalies)))]
            if clean is None:
                return _Item(image, image, mask, True)
            return _Item(image, clean, mask, False)
        assert stage.draw is not None
        try:
            image, mask = stage.draw(normal, self.rng)
        except RenderError as error:
            self.render_errors += 1
            logger.debug("stage %s: draw failed (%s); the item stays normal", stage.name, error)
            return _Item(normal, normal, self._empty, False)
        if image.shape != normal.shape or mask.shape != normal.shape[:2]:
            raise ValueError(
                f"stage {stage.name!r}: draw returned shapes {image.shape} and {mask.shape} "
                f"for a normal image of shape {normal.shape}"
            )
        return _Item(image, normal, mask.astype(bool), False)

    def batch(self, stage: SyntheticStage | None) -> dict[str, torch.Tensor]:
        items = [self.item(stage) for _ in range(self.config.batch_size)]
        if self.config.crop is not None:
            items = [_crop_item(item, self.config.crop, self.rng) for item in items]
        device = self.config.device
        masks = torch.from_numpy(np.stack([item.mask for item in items])).to(device)  # (B, H, W) bool
        keep = [~item.mask if item.masked_loss else np.ones_like(item.mask) for item in items]
        return {
            "image": _to_tensor([item.image for item in items], device),  # (B, 3, H, W)
            "target": _to_tensor([item.target for item in items], device),  # (B, 3, H, W)
            "mask": masks,
            "weight": torch.from_numpy(np.stack(keep)[:, None].astype(np.float32)).to(device),  # (B, 1, H, W)
        }


# ---------------------------------------------------------------------------------------------------- loop
def train_draem(
    model: DraemModel,
    normals: list[np.ndarray],
    stages: Sequence[SyntheticStage] | None,
    config: DraemConfig,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Train ``model`` in place and return (per-step history, number of failed draws).

    ``normals`` and the stages' fixed anomalies must already be RGB uint8 at the working size. With
    ``stages=None`` only the reconstructive sub-network trains, on normal images (L2 + SSIM); otherwise the
    stages run in order for their share of ``config.steps`` (see :func:`stage_steps`).
    """
    rng = np.random.default_rng(config.seed)
    sampler = _Sampler(normals, config, rng)
    if stages is None:
        plan: list[tuple[SyntheticStage | None, int]] = [(None, config.steps)]
        parameters = list(model.reconstructive.parameters())
    else:
        plan = list(zip(stages, stage_steps(stages, config.steps), strict=True))
        parameters = list(model.parameters())
    total = sum(count for _, count in plan)
    optimizer = torch.optim.Adam(parameters, lr=config.lr)
    milestones = sorted({max(1, round(share * total)) for share in LR_MILESTONES})
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_DECAY)
    model.train()
    history: list[dict[str, Any]] = []
    for stage, count in plan:
        for _ in range(count):
            batch = sampler.batch(stage)
            if stage is None:
                reconstruction = model.reconstructive(batch["image"])  # (B, 3, H, W)
                focal = None
            else:
                reconstruction, logits = model(batch["image"])  # (B, 3, H, W), (B, 2, H, W)
                focal = focal_loss(logits, batch["mask"], config.focal_gamma)
            l2 = l2_loss(reconstruction, batch["target"], batch["weight"])
            ssim = ssim_loss(reconstruction, batch["target"], batch["weight"])
            loss = l2 + ssim if focal is None else l2 + ssim + focal
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record = {
                "step": len(history),
                "stage": "normal" if stage is None else stage.name,
                "loss": loss.item(),
                "l2": l2.item(),
                "ssim": ssim.item(),
                "focal": None if focal is None else focal.item(),
                "anomalies": int(batch["mask"].flatten(1).any(dim=1).sum()),
                "lr": optimizer.param_groups[0]["lr"],
            }
            scheduler.step()
            history.append(record)
            if len(history) % 50 == 0:
                logger.debug("draem step %d/%d: loss %.4f", len(history), total, record["loss"])
            if progress is not None:
                progress(len(history), total)
    model.eval()
    if sampler.render_errors:
        logger.warning("draem: %d anomaly draws failed and were kept as normal images", sampler.render_errors)
    return history, sampler.render_errors

"""AeCSAD's two training loops (plain PyTorch): the segmentation decoder, then the LGST students.

The thesis (Amjad, MSc thesis, Ontario Tech University, 2025) trains both on normal images only, as CSAD
does (Hsieh and Lai, BMVC 2024):

- :func:`train_segmentation`: Adam on the DeepLabV3+ decoder over the frozen teacher. Each epoch walks
  D_L in shuffled batches (CE + Dice + focal against the pseudo-labels, LSA on a share of the items); from
  epoch ``unlabeled_start`` every step also draws a D_U batch for the histogram-matching and entropy terms.
  Features of unaugmented images are cached when ``cache_features`` is set (the teacher is frozen).
- :func:`train_lgst`: Adam (weight decay 1e-4, rate x0.1 at 95% of the steps, as in CSAD) on both
  students against the teacher features of the training images, computed once. With ``global_augment``
  the global branch (global student and the local student's fusion head) sees colour-jittered images
  and the teacher's features of those.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kka_synth.detectors.aecsad.config import AecsadConfig
from kka_synth.detectors.aecsad.data import to_tensor
from kka_synth.detectors.aecsad.lgst import (
    TEACHER_LAYERS,
    GlobalStudent,
    LocalStudent,
    TeacherProjection,
    lgst_losses,
)
from kka_synth.detectors.aecsad.segment import (
    SEG_LAYERS,
    SegmentationHead,
    entropy_loss,
    histogram_loss,
    labeled_loss,
    lsa_augment,
)
from kka_synth.detectors.aecsad.wrn import WideResNet

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
"""Called with the number of steps just finished (the detector turns it into done/total)."""


def segmentation_steps(config: AecsadConfig, labeled: int) -> int:
    return config.seg_epochs * math.ceil(labeled / config.seg_batch_size)


def train_segmentation(
    wrn: WideResNet,
    head: SegmentationHead,
    images: Sequence[np.ndarray],
    labels: np.ndarray,
    reliable: np.ndarray,
    config: AecsadConfig,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Train ``head`` in place on RGB uint8 ``images`` and their (N, H, W) pseudo-label maps; returns one
    record per step (``epoch``, ``loss``, ``ce``, ``dice``, ``focal``, ``hist``, ``entropy``)."""
    rng = np.random.default_rng(config.seed + 1)
    device = config.device
    size = labels.shape[1:]
    d_l = np.flatnonzero(reliable)
    d_u = np.flatnonzero(~reliable)
    donors = [(images[i], labels[i]) for i in d_l]
    num_classes = head.classifier.out_channels
    target_shares = np.bincount(labels[d_l].ravel(), minlength=num_classes)[:num_classes] / labels[d_l].size
    target = torch.tensor(target_shares, dtype=torch.float32, device=device)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def features(index: int, image: np.ndarray, augmented: bool) -> dict[str, torch.Tensor]:
        if not augmented and index in cache:
            return cache[index]
        with torch.no_grad():
            out = {k: v[0] for k, v in wrn.features(to_tensor([image], device), SEG_LAYERS).items()}
        if not augmented and config.cache_features:
            cache[index] = out
        return out

    def batch_features(items: list[tuple[int, np.ndarray, bool]]) -> dict[str, torch.Tensor]:
        per_item = [features(i, image, augmented) for i, image, augmented in items]
        return {name: torch.stack([f[name] for f in per_item]) for name in SEG_LAYERS}

    optimizer = torch.optim.Adam(head.parameters(), lr=config.seg_lr)
    weights = (config.ce_weight, config.dice_weight, config.focal_weight)
    history: list[dict[str, Any]] = []
    wrn.eval()
    head.train()
    for epoch in range(config.seg_epochs):
        order = rng.permutation(d_l)
        for start in range(0, len(order), config.seg_batch_size):
            chosen = order[start : start + config.seg_batch_size]
            items, targets = [], []
            for index in chosen:
                image, label = images[index], labels[index]
                augmented = bool(rng.random() < config.lsa_prob)
                if augmented:
                    image, label = lsa_augment(image, label, donors, rng, config.lsa_components)
                items.append((int(index), image, augmented))
                targets.append(label)
            if len(items) == 1:  # batch norm needs two items
                items.append(items[0])
                targets.append(targets[0])
            logits = head(batch_features(items), size)  # (B, K, H, W)
            target_maps = torch.from_numpy(np.stack(targets).astype(np.int64)).to(device)
            terms = labeled_loss(logits, target_maps, weights, config.focal_gamma)
            loss = terms["total"]
            record = {
                "epoch": epoch,
                "ce": terms["ce"].item(),
                "dice": terms["dice"].item(),
                "focal": terms["focal"].item(),
            }
            record["hist"] = record["entropy"] = None
            if epoch >= config.unlabeled_start and len(d_u):
                picked = rng.choice(
                    d_u, size=max(2, min(config.seg_batch_size, len(d_u))), replace=len(d_u) < 2
                )
                unlabeled = head(batch_features([(int(i), images[i], False) for i in picked]), size)
                hist, entropy = histogram_loss(unlabeled, target), entropy_loss(unlabeled)
                loss = loss + config.hist_weight * hist + config.entropy_weight * entropy
                record["hist"], record["entropy"] = hist.item(), entropy.item()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record["loss"] = loss.item()
            history.append(record)
            if progress is not None:
                progress(1)
    head.eval()
    logger.debug("aecsad segmentation: %d steps, last loss %.4f", len(history), history[-1]["loss"])
    return history


def colour_jitter(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation factors in [0.8, 1.2] per image of a (B, 3, H, W) batch."""
    b = images.shape[0]
    factors = 0.8 + 0.4 * torch.rand(3, b, 1, 1, 1, generator=generator).to(images.device)
    x = images * factors[0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[1] + mean
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * factors[2] + gray
    return x.clamp(0.0, 1.0)


def train_lgst(
    wrn: WideResNet,
    teacher: TeacherProjection,
    local: LocalStudent,
    global_: GlobalStudent,
    images: torch.Tensor,
    config: AecsadConfig,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Set the teacher's normalisation from (N, 3, H, W) images in [0, 1], then train both students in
    place on them. Returns one record per step (``loss``, ``local``, ``global``, ``fusion``, ``lr``)."""
    size = (images.shape[2] // 4, images.shape[3] // 4)
    with torch.no_grad():
        raw = torch.cat(
            [
                teacher.raw(
                    wrn.features(images[start : start + config.eval_batch_size], TEACHER_LAYERS), size
                )
                for start in range(0, len(images), config.eval_batch_size)
            ]
        )  # (N, F, H/4, W/4)
        teacher.set_normalisation(raw)
        targets = (raw - teacher.mean) / teacher.std
    del raw
    generator = torch.Generator().manual_seed(config.seed + 2)
    optimizer = torch.optim.Adam(
        list(local.parameters()) + list(global_.parameters()), lr=config.lgst_lr, weight_decay=1e-4
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, int(0.95 * config.lgst_steps)), gamma=0.1
    )
    weights = (config.local_weight, config.global_weight, config.fusion_weight)
    history: list[dict[str, Any]] = []
    local.train()
    global_.train()
    for step in range(config.lgst_steps):
        index = torch.randint(len(images), (config.lgst_batch_size,), generator=generator)
        x = images[index]  # (B, 3, H, W)
        target = targets[index]
        local_out, fuse_out = local(x)  # (B, F, H/4, W/4) each
        if config.global_augment:
            x_global = colour_jitter(x, generator)
            with torch.no_grad():
                target_global = teacher(wrn.features(x_global, TEACHER_LAYERS), size)
            _, fuse_out = local(x_global)
        else:
            x_global, target_global = x, target
        terms = lgst_losses(
            target, local_out, fuse_out, global_(x_global), weights, config.hard_quantile, target_global
        )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        history.append(
            {
                "step": step,
                "loss": terms["total"].item(),
                "local": terms["local"].item(),
                "global": terms["global"].item(),
                "fusion": terms["fusion"].item(),
                "lr": optimizer.param_groups[0]["lr"],
            }
        )
        scheduler.step()
        if progress is not None:
            progress(1)
    local.eval()
    global_.eval()
    logger.debug("aecsad LGST: %d steps, last loss %.4f", len(history), history[-1]["loss"])
    return history

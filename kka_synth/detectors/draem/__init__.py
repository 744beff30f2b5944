"""The DRAEM detector: ``fit`` on normal images plus synthetic anomalies, ``predict`` maps and scores.

DRAEM (Zavrtanik, Kristan and Skočaj, "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021) learns to reconstruct clean images from synthetic anomalies and to
segment the anomaly from the input and its reconstruction. The anomaly map is the discriminative
sub-network's anomaly probability; the image score is the maximum of that map after a mean filter (21 x 21
at 256 px in the paper, scaled here with the image).

With ``synthetic=None`` (the "none" variant of the evaluation protocol) there are no anomalies to segment:
only the reconstructive sub-network trains, as an autoencoder on normal images, and ``predict`` scores by
reconstruction error, ``1 - SSIM`` per pixel, mean-filtered like the segmentation. The mode is saved with
the weights.

The networks live in :mod:`.model`, the losses and the loop in :mod:`.train`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from kka_synth.detectors.draem.model import DraemModel
from kka_synth.detectors.draem.train import STRIDE, DraemConfig, ssim_map, train_draem
from kka_synth.detectors.inputs import check_images, prepare_stages, resize_rgb
from kka_synth.detectors.saved import CONFIG_FILE, read_saved, write_saved
from kka_synth.types import DetectorOutput, SyntheticStage

__all__ = ["DraemConfig", "DraemDetector", "DraemModel"]

logger = logging.getLogger(__name__)

MODES = ("draem", "none")
"""``draem``: trained on synthetic anomalies, scored by segmentation; ``none``: reconstruction error only."""


def _score_kernel(config: DraemConfig, size: tuple[int, int]) -> int:
    """The mean filter's side at the working size: ``score_kernel`` at 256 px, scaled, odd, at least 1."""
    side = max(1, round(config.score_kernel * min(size) / 256))
    return side if side % 2 else side + 1


class DraemDetector:
    """DRAEM on RGB uint8 images: :meth:`fit`, :meth:`predict`, :meth:`save`, :meth:`load`.

    All images are resized to one working size (``config.image_size``, or the first normal image's size
    rounded to multiples of 32); maps come back at each input's own size. Training is deterministic for a
    given ``config.seed`` at a fixed torch thread count: the weights are drawn under a forked torch RNG and
    every other choice from a seeded numpy generator, so no global random state changes.

    After :meth:`fit`, ``history`` holds one dict per optimisation step (``step``, ``stage``, ``loss``,
    ``l2``, ``ssim``, ``focal``, ``anomalies``, ``lr``) and ``render_errors`` the number of failed draws.
    """

    name = "draem"
    config_class = DraemConfig
    profiles: dict[str, dict[str, Any]] = {
        "offline": {
            "recon_width": 8,
            "disc_width": 8,
            "image_size": 64,
            "crop": None,
            "steps": 120,
            "batch_size": 8,
            "lr": 2e-3,
        },
        "hub": {
            "recon_width": 128,
            "disc_width": 64,
            "image_size": 256,
            "crop": None,
            "steps": 20000,
            "batch_size": 8,
            "lr": 1e-4,
        },
    }
    """Field overrides per profile. ``offline`` (the config defaults) trains from scratch on one CPU thread
    in about half a minute on 128 px images: base widths 8 and 8 at 64 px, 120 steps of 8 (chosen on the
    demo among widths 4 to 16, 64 and 96 px, whole images or 64 px crops, batches of 4 to 16). ``hub`` uses
    the paper's widths (128 and 64) at 256 px, lr 1e-4 and 20,000 steps, and wants a GPU."""

    def __init__(self, config: DraemConfig | None = None, progress: Callable[[int, int], None] | None = None):
        self.config = config or DraemConfig()
        self.progress = progress
        self.model: DraemModel | None = None
        self.mode: str | None = None
        self.size: tuple[int, int] | None = None
        self.history: list[dict[str, Any]] = []
        self.render_errors = 0

    # ---------------------------------------------------------------------------------------------- fit
    def _working_size(self, first: np.ndarray) -> tuple[int, int]:
        if self.config.image_size is not None:
            return (self.config.image_size, self.config.image_size)
        height, width = (max(STRIDE, round(side / STRIDE) * STRIDE) for side in first.shape[:2])
        return (height, width)

    def _prepare_stages(self, synthetic: object, size: tuple[int, int]) -> list[SyntheticStage] | None:
        """The stages with their fixed anomalies checked and resized to the working size."""
        if synthetic is None:
            return None
        prepared, skipped = prepare_stages(synthetic, size)
        for stage in prepared:
            if skipped.get(stage.name):
                # DRAEM learns to segment: an anomaly without a mask (text-to-image) gives no target
                logger.warning(
                    "stage %r: skipped %d anomalies without a mask (DRAEM needs pixel targets)",
                    stage.name,
                    skipped[stage.name],
                )
                if not stage.anomalies and stage.draw is None:
                    raise ValueError(
                        f"stage {stage.name!r} has no anomaly with a mask; DRAEM needs pixel targets"
                    )
        return prepared

    def fit(self, normal: list[np.ndarray], synthetic: list[SyntheticStage] | None = None) -> None:
        """Train on normal images mixed with synthetic anomalies, stage by stage in order, each stage for
        its share of ``config.steps``.

        Each step samples ``batch_size`` normal images and makes each item an anomaly with probability
        ``anomaly_prob``: from ``stage.draw(normal, rng)`` on the normal image at the working size (target:
        the normal image) or one of the stage's fixed anomalies chosen uniformly (target: its clean image,
        or when it has none the image itself with the reconstruction loss masked out inside the anomaly).
        A draw that raises ``RenderError`` leaves the item normal and is counted in ``render_errors``.
        Stage shares that sum below 1 train for fewer steps in all.

        ``synthetic=None`` trains only the reconstructive sub-network on normal images, and :meth:`predict`
        then scores by reconstruction error.
        """
        normals = check_images(normal, "normal")
        if not normals:
            raise ValueError("normal must hold at least one image")
        size = self._working_size(normals[0])
        if self.config.crop is not None and self.config.crop > min(size):
            raise ValueError(f"draem.crop {self.config.crop} exceeds the working size {size}")
        stages = self._prepare_stages(synthetic, size)
        resized = [resize_rgb(image, size) for image in normals]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            model = DraemModel(self.config.recon_width, self.config.disc_width)
        model.to(self.config.device)
        self.history, self.render_errors = train_draem(model, resized, stages, self.config, self.progress)
        self.model, self.size = model, size
        self.mode = "none" if stages is None else "draem"

    # ------------------------------------------------------------------------------------------ predict
    def predict(self, images: list[np.ndarray]) -> DetectorOutput:
        """Score RGB uint8 images that share one size: pred_score (N,) and anomaly_map (N, H, W), float32.

        In "draem" mode the map is the anomaly probability of the segmentation; in "none" mode it is
        ``1 - SSIM`` between the image and its reconstruction. Maps are resized bilinearly to the input size;
        the score is the maximum of the mean-filtered map at the working size.
        """
        if self.model is None or self.size is None:
            raise RuntimeError("DraemDetector.predict called before fit or load")
        checked = check_images(images, "images")
        shapes = sorted({image.shape[:2] for image in checked})
        if len(shapes) > 1:
            raise ValueError(
                f"images must share one size to stack their maps, got {shapes[0]} and {shapes[1]}"
            )
        height, width = shapes[0] if shapes else self.size
        kernel = _score_kernel(self.config, self.size)
        scores, maps = [], []
        self.model.eval()
        with torch.inference_mode():
            for start in range(0, len(checked), self.config.eval_batch_size):
                chunk = [
                    resize_rgb(image, self.size)
                    for image in checked[start : start + self.config.eval_batch_size]
                ]
                x = torch.from_numpy(np.stack(chunk).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
                x = x.contiguous().to(self.config.device)  # (B, 3, h, w)
                if self.mode == "none":
                    reconstruction = self.model.reconstructive(x)  # (B, 3, h, w)
                    amap = 1.0 - ssim_map(reconstruction.clamp(0.0, 1.0), x)  # (B, 1, h, w)
                else:
                    _, logits = self.model(x)  # (B, 2, h, w)
                    amap = logits.softmax(dim=1)[:, 1:]  # (B, 1, h, w)
                smooth = F.avg_pool2d(amap, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
                scores.append(smooth.flatten(1).amax(dim=1).float().cpu())  # (B,)
                full = F.interpolate(amap, size=(height, width), mode="bilinear", align_corners=False)
                maps.append(full[:, 0].float().cpu())  # (B, H, W)
        if not scores:
            return DetectorOutput(np.zeros(0, np.float32), np.zeros((0, height, width), np.float32))
        return DetectorOutput(
            pred_score=torch.cat(scores).numpy().astype(np.float32),
            anomaly_map=torch.cat(maps).numpy().astype(np.float32),
        )

    # ---------------------------------------------------------------------------------------- save/load
    def save(self, path: Path) -> None:
        """Write ``config.json`` (config, mode, working size) and ``model.safetensors`` into folder ``path``.

        Each file is written to a temporary name first and then renamed.
        """
        if self.model is None or self.size is None:
            raise RuntimeError("DraemDetector.save called before fit or load")
        meta = {
            "detector": self.name,
            "mode": self.mode,
            "size": list(self.size),
            "config": self.config.to_dict(),
        }
        write_saved(path, meta, self.model.state_dict())

    @classmethod
    def load(cls, path: Path) -> DraemDetector:
        """Read a folder written by :meth:`save`; the result predicts exactly as the saved detector did."""
        meta, tensors = read_saved(path, cls.name, "DRAEM")
        if meta.get("mode") not in MODES:
            raise ValueError(f"{Path(path) / CONFIG_FILE} does not describe a saved DRAEM detector")
        detector = cls(DraemConfig(**meta["config"]))
        with torch.random.fork_rng(devices=[]):
            model = DraemModel(detector.config.recon_width, detector.config.disc_width)
        model.load_state_dict(tensors)
        detector.model = model.to(detector.config.device).eval()
        detector.mode = meta["mode"]
        detector.size = (int(meta["size"][0]), int(meta["size"][1]))
        return detector

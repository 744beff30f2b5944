"""Component pseudo-labels: find the parts of each normal image, cluster them into classes, split the images.

Follows the unsupervised label generation of CSAD (Hsieh and Lai, "CSAD: Unsupervised Component
Segmentation for Logical Anomaly Detection", BMVC 2024) as AeCSAD extends it (Amjad, MSc thesis, Ontario
Tech University, 2025). The models used here are discarded once the labels exist.

1. **Components per image.**
   - ``grounded_sam``: the category's component names from the knowledge base (in place of the thesis's
     RAM++ tags) prompt GroundingDINO; its boxes prompt SAM for one mask per object. SAM's automatic masks
     (a grid of point prompts) are then filtered in two stages: a mask mostly outside every box is
     background and dropped; of the rest, a mask mostly outside the objects' masks is dropped too.
   - ``unsupervised`` (no weights): k-means on Lab colour and pixel position over all training images,
     a 5 x 5 median filter, then the connected components of every cluster except the background (the
     cluster that covers most of the image borders).
2. **Crops.** Each component is cut out with its mask and cropped to a square whose side is the diagonal
   of its minimum-area bounding rectangle, resized to ``crop_size``.
3. **Embeddings.** Every crop's rotations and flips are encoded by the teacher's layer 4 (global average
   pooled) and averaged, so a component's class does not depend on its orientation.
4. **Classes.** MeanShift clusters the embeddings (after a PCA to at most 32 dimensions, for speed); the
   ``max_classes`` largest clusters are kept and every other component joins the nearest kept centre.
   Class 0 is the background.
5. **Reliable images.** HDBSCAN on the per-image class histograms separates images whose layout is typical
   (clustered: D_L, trained with labels) from the rest (noise: D_U, trained without them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from kka_synth.detectors.aecsad.config import AecsadConfig
from kka_synth.detectors.aecsad.wrn import WideResNet
from kka_synth.utils.hub import load_pretrained

logger = logging.getLogger(__name__)

PCA_DIMS = 32
"""Embeddings are reduced to at most this many dimensions before MeanShift."""


@dataclass
class PseudoLabels:
    """What the labeler made of the training images."""

    maps: np.ndarray
    """(N, H, W) uint8 class per pixel, 0 = background."""
    reliable: np.ndarray
    """(N,) bool, True for D_L (labels trusted) and False for D_U."""
    num_classes: int
    """Classes including the background."""
    components: int
    """Components found over all images."""


# ------------------------------------------------------------------------------------------ components
def unsupervised_components(images: Sequence[np.ndarray], config: AecsadConfig) -> list[list[np.ndarray]]:
    """Per image, the bool (H, W) masks of its components, largest first (see the module docstring)."""
    from sklearn.cluster import KMeans

    height, width = images[0].shape[:2]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    position = np.stack([yy / max(height - 1, 1), xx / max(width - 1, 1)], axis=-1) * config.position_weight

    def features(image: np.ndarray) -> np.ndarray:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB).astype(np.float32) / 255.0  # (H, W, 3)
        return np.concatenate([lab, position], axis=-1).reshape(-1, 5)  # (H * W, 5)

    rng = np.random.default_rng(config.seed)
    per_image = max(1, 40000 // len(images))
    sample = np.concatenate([features(image)[rng.integers(0, height * width, per_image)] for image in images])
    kmeans = KMeans(n_clusters=config.colour_clusters, n_init=3, random_state=config.seed).fit(sample)
    label_maps = []
    border = np.zeros(config.colour_clusters, dtype=np.int64)
    for image in images:
        labels = kmeans.predict(features(image)).reshape(height, width).astype(np.uint8)
        labels = cv2.medianBlur(labels, 5)
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        border += np.bincount(edge, minlength=config.colour_clusters)
        label_maps.append(labels)
    background = int(np.argmax(border))
    min_area = config.min_component_area * height * width
    components = []
    for labels in label_maps:
        found = []
        for cluster in range(config.colour_clusters):
            if cluster == background:
                continue
            count, parts, stats, _ = cv2.connectedComponentsWithStats(
                (labels == cluster).astype(np.uint8), connectivity=8
            )
            found += [parts == i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_area]
        found.sort(key=lambda mask: -int(mask.sum()))
        components.append(found[: config.max_components])
    return components


def filter_sam_masks(
    automatic: Sequence[np.ndarray],
    objects: Sequence[np.ndarray],
    boxes: np.ndarray,
    background_overlap: float,
    object_overlap: float,
) -> list[np.ndarray]:
    """The two-stage filter of SAM's automatic masks (bool (H, W) each), returned largest first.

    Stage 1 (background): a mask with more than ``background_overlap`` of its pixels outside every box
    (``boxes`` (M, 4) as x0, y0, x1, y1 pixels) is background. Stage 2 (objects): a remaining mask with less
    than ``object_overlap`` of its pixels inside the union of ``objects`` (SAM's box-prompted masks) is
    dropped. Where no automatic mask survives, the object masks themselves are the components.
    """
    if not len(objects) and not len(automatic):
        return []
    shape = (objects[0] if len(objects) else automatic[0]).shape
    inside_boxes = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        inside_boxes[max(0, int(y0)) : max(0, math.ceil(y1)), max(0, int(x0)) : max(0, math.ceil(x1))] = True
    union = np.zeros(shape, dtype=bool)
    for mask in objects:
        union |= mask
    kept = []
    for mask in automatic:
        area = int(mask.sum())
        if area == 0 or (mask & ~inside_boxes).sum() > background_overlap * area:
            continue
        if (mask & union).sum() < object_overlap * area:
            continue
        kept.append(mask)
    if not kept:
        kept = [mask for mask in objects if mask.any()]
    return sorted(kept, key=lambda mask: -int(mask.sum()))


class GroundedSamLabeler:
    """GroundingDINO boxes from component names, SAM masks from boxes and from a point grid, filtered.

    Loads its models through :func:`kka_synth.utils.hub.load_pretrained`, so missing weights give one
    ModelLoadError line naming ``aecsad.grounding_model`` or ``aecsad.sam_model``.
    """

    def __init__(self, config: AecsadConfig, names: Sequence[str]):
        from transformers import AutoProcessor, GroundingDinoForObjectDetection, SamModel, SamProcessor

        self.config = config
        self.device = config.device
        self.dino_processor = load_pretrained(
            AutoProcessor.from_pretrained,
            config.grounding_model,
            "the GroundingDINO processor",
            "aecsad.grounding_model",
        )
        self.dino = load_pretrained(
            GroundingDinoForObjectDetection.from_pretrained,
            config.grounding_model,
            "the GroundingDINO detector",
            "aecsad.grounding_model",
        ).to(self.device)
        self.sam_processor = load_pretrained(
            SamProcessor.from_pretrained, config.sam_model, "the SAM processor", "aecsad.sam_model"
        )
        self.sam = load_pretrained(SamModel.from_pretrained, config.sam_model, "SAM", "aecsad.sam_model").to(
            self.device
        )
        words = [name.replace("_", " ").strip() for name in names if name.strip()] or ["object"]
        self.prompt = ". ".join(words) + "."

    @torch.no_grad()
    def boxes(self, image: np.ndarray) -> np.ndarray:
        """(M, 4) x0, y0, x1, y1 pixel boxes of the named components."""
        inputs = self.dino_processor(images=image, text=self.prompt, return_tensors="pt").to(self.device)
        outputs = self.dino(**inputs)
        result = self.dino_processor.post_process_grounded_object_detection(
            outputs,
            input_ids=inputs["input_ids"],
            threshold=self.config.box_threshold,
            text_threshold=self.config.text_threshold,
            target_sizes=[image.shape[:2]],
        )[0]
        return result["boxes"].detach().cpu().numpy().reshape(-1, 4)

    @torch.no_grad()
    def _sam(self, image: np.ndarray, **prompts: object) -> tuple[np.ndarray, np.ndarray]:
        """SAM's (P, 3, H, W) bool masks and (P, 3) predicted IoUs for a batch of prompts."""
        inputs = self.sam_processor(images=image, return_tensors="pt", **prompts).to(self.device)
        outputs = self.sam(**inputs, multimask_output=True)
        masks = self.sam_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu()
        )[0]
        return masks.numpy().astype(bool), outputs.iou_scores[0].cpu().numpy()

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        """The filtered components of one RGB uint8 image, largest first."""
        boxes = self.boxes(image)
        if not len(boxes):
            logger.warning("aecsad: GroundingDINO found none of %r in an image", self.prompt)
            return []
        masks, ious = self._sam(image, input_boxes=[boxes.tolist()])
        objects = [masks[i, int(np.argmax(ious[i]))] for i in range(len(masks))]
        side = self.config.sam_points
        height, width = image.shape[:2]
        grid = [
            [[(x + 0.5) * width / side, (y + 0.5) * height / side]] for y in range(side) for x in range(side)
        ]
        masks, ious = self._sam(image, input_points=[grid])
        best = ious.argmax(axis=1)
        automatic = [masks[i, best[i]] for i in range(len(masks)) if ious[i, best[i]] >= self.config.sam_iou]
        return filter_sam_masks(
            automatic, objects, boxes, self.config.background_overlap, self.config.object_overlap
        )[: self.config.max_components]


# ------------------------------------------------------------------------------------ crops and classes
def square_crop(image: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """The component cut out with its mask (zero elsewhere), cropped to a square of side the diagonal of its
    minimum-area rectangle around the rectangle's centre (zero-padded at the borders), resized to ``size``."""
    points = cv2.findNonZero(mask.astype(np.uint8))
    (cx, cy), (w, h), _ = cv2.minAreaRect(points)
    side = max(2, math.ceil(math.hypot(w, h)))
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    cut = np.where(mask[..., None], image, 0).astype(np.uint8)
    pad = side
    padded = cv2.copyMakeBorder(cut, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    window = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    return cv2.resize(window, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)


def _variants(batch: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` of the 8 rotations x flips of a (B, 3, S, S) batch: 1 identity, 2 + h-flip, 4 rotations,
    8 rotations with and without the flip."""
    if count == 1:
        return [batch]
    if count == 2:
        return [batch, batch.flip(-1)]
    rotations = [torch.rot90(batch, k, dims=(-2, -1)) for k in range(4)]
    return rotations if count == 4 else rotations + [r.flip(-1) for r in rotations]


@torch.no_grad()
def embed_crops(
    wrn: WideResNet, crops: Sequence[np.ndarray], variants: int, batch_size: int = 64
) -> np.ndarray:
    """(M, C4) L2-normalised layer-4 embeddings of (S, S, 3) uint8 crops, averaged over their variants."""
    device = next(wrn.parameters()).device
    out = []
    for start in range(0, len(crops), batch_size):
        chunk = np.stack(crops[start : start + batch_size]).astype(np.float32) / 255.0
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous().to(device)  # (B, 3, S, S)
        pooled = [wrn.features(v, ("layer4",))["layer4"].mean(dim=(2, 3)) for v in _variants(x, variants)]
        out.append(torch.stack(pooled).mean(dim=0).cpu())  # (B, C4)
    embeddings = torch.cat(out) if out else torch.zeros(0, wrn.channels("layer4"))
    return torch.nn.functional.normalize(embeddings, dim=1).numpy()


def cluster_embeddings(embeddings: np.ndarray, quantile: float, max_classes: int, seed: int) -> np.ndarray:
    """(M,) class per embedding in 1..K (K <= max_classes), numbered by size, largest first."""
    from sklearn.cluster import MeanShift, estimate_bandwidth
    from sklearn.decomposition import PCA

    count = len(embeddings)
    if count < 3:
        return np.ones(count, dtype=np.int64)
    dims = min(PCA_DIMS, count - 1, embeddings.shape[1])
    reduced = PCA(n_components=dims, random_state=seed).fit_transform(embeddings.astype(np.float64))
    bandwidth = estimate_bandwidth(reduced, quantile=quantile, n_samples=min(count, 1000), random_state=seed)
    if not bandwidth > 0:
        return np.ones(count, dtype=np.int64)
    shift = MeanShift(bandwidth=bandwidth).fit(reduced)
    labels, centres = shift.labels_, shift.cluster_centers_
    sizes = np.bincount(labels, minlength=len(centres))
    keep = np.argsort(-sizes, kind="stable")[:max_classes]
    distances = ((reduced[:, None, :] - centres[None, keep, :]) ** 2).sum(axis=-1)  # (M, kept)
    nearest = np.where(np.isin(labels, keep), labels, keep[distances.argmin(axis=1)])
    rank = {int(cluster): index + 1 for index, cluster in enumerate(keep)}
    return np.array([rank[int(c)] for c in nearest], dtype=np.int64)


def paint_label_maps(
    components: Sequence[Sequence[np.ndarray]], classes: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """(N, H, W) uint8 maps: each component painted with its class, larger first so small ones stay visible.

    ``classes`` holds one class per component in the order of ``components`` flattened.
    """
    maps = np.zeros((len(components), *shape), dtype=np.uint8)
    index = 0
    for n, masks in enumerate(components):
        painted = list(zip(masks, classes[index : index + len(masks)], strict=True))
        index += len(masks)
        for mask, cls in sorted(painted, key=lambda pair: -int(pair[0].sum())):
            maps[n][mask] = cls
    return maps


def class_shares(maps: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes - 1) share of each image's pixels in each foreground class."""
    flat = maps.reshape(len(maps), -1)
    counts = np.stack([np.bincount(row, minlength=num_classes)[1:num_classes] for row in flat])
    return counts.astype(np.float64) / flat.shape[1]


def split_reliable(histograms: np.ndarray, min_cluster_size: int, min_share: float) -> np.ndarray:
    """(N,) bool D_L membership: images HDBSCAN places in a cluster of their class histograms.

    A single cluster is allowed (one typical layout is the common case for a product line; HDBSCAN's
    default would call all of it noise).

    When fewer than ``ceil(min_share * N)`` are clustered (HDBSCAN calls every image noise on small or
    diverse sets), the images nearest the median histogram fill D_L up to that count.
    """
    from sklearn.cluster import HDBSCAN

    count = len(histograms)
    reliable = np.zeros(count, dtype=bool)
    if count >= 2 * min_cluster_size and histograms.shape[1] > 0:
        labels = HDBSCAN(min_cluster_size=min_cluster_size, allow_single_cluster=True, copy=True).fit_predict(
            histograms
        )
        reliable = labels >= 0
    need = math.ceil(min_share * count)
    if count and reliable.sum() < need:
        distance = np.linalg.norm(histograms - np.median(histograms, axis=0), axis=1)
        for index in np.argsort(distance, kind="stable"):
            if reliable.sum() >= need:
                break
            reliable[index] = True
    return reliable


# ---------------------------------------------------------------------------------------------- all
def make_pseudo_labels(
    images: Sequence[np.ndarray], wrn: WideResNet, config: AecsadConfig, names: Sequence[str] = ()
) -> PseudoLabels:
    """Pseudo-label maps and the D_L / D_U split of RGB uint8 images that share one size.

    With ``label_images`` set, only a seeded random subset of that many images is labelled; the others join
    D_U (their maps stay background and are never used as targets).
    """
    everything = list(images)
    chosen = np.arange(len(everything))
    if config.label_images is not None and config.label_images < len(everything):
        rng = np.random.default_rng(config.seed + 3)
        chosen = np.sort(rng.choice(len(everything), size=config.label_images, replace=False))
    images = [everything[i] for i in chosen]
    labels = _label_subset(images, wrn, config, names)
    if len(chosen) == len(everything):
        return labels
    maps = np.zeros((len(everything), *labels.maps.shape[1:]), dtype=np.uint8)
    reliable = np.zeros(len(everything), dtype=bool)
    maps[chosen], reliable[chosen] = labels.maps, labels.reliable
    return PseudoLabels(maps, reliable, labels.num_classes, labels.components)


def _label_subset(
    images: Sequence[np.ndarray], wrn: WideResNet, config: AecsadConfig, names: Sequence[str]
) -> PseudoLabels:
    if config.labeler == "grounded_sam":
        labeler = GroundedSamLabeler(config, names)
        components = [labeler(image) for image in images]
        del labeler
    else:
        components = unsupervised_components(images, config)
    crops = [
        square_crop(image, mask, config.crop_size)
        for image, masks in zip(images, components, strict=True)
        for mask in masks
    ]
    total = len(crops)
    shape = images[0].shape[:2]
    if total == 0:
        logger.warning("aecsad: no components found; the patch histogram sees background only")
        return PseudoLabels(np.zeros((len(images), *shape), np.uint8), np.ones(len(images), bool), 1, 0)
    embeddings = embed_crops(wrn, crops, config.crop_variants)
    classes = cluster_embeddings(embeddings, config.meanshift_quantile, config.max_classes, config.seed)
    num_classes = int(classes.max()) + 1
    maps = paint_label_maps(components, classes, shape)
    reliable = split_reliable(
        class_shares(maps, num_classes), config.hdbscan_min_cluster_size, config.min_labeled_share
    )
    logger.info(
        "aecsad pseudo-labels: %d components in %d classes; %d of %d images reliable (D_L)",
        total,
        num_classes - 1,
        int(reliable.sum()),
        len(images),
    )
    return PseudoLabels(maps, reliable, num_classes, total)

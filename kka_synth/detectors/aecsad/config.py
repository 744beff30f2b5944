"""The settings of the AeCSAD detector, one typed dataclass; the defaults are the offline profile.

AeCSAD (Amjad, MSc thesis, Ontario Tech University, 2025) extends CSAD (Hsieh and Lai, BMVC 2024). The
defaults here are small enough to train on one CPU thread in a few minutes at 128 px with random teacher
weights; :attr:`kka_synth.detectors.aecsad.AecsadDetector.profiles` ``["hub"]`` holds the thesis's settings
(256 px, ImageNet weights, 512 teacher channels, Grounded-SAM pseudo-labels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from kka_synth.config import check_config, help_field
from kka_synth.utils.hub import PICKLE_SUFFIXES

STRIDE = 32
"""Working image sides are multiples of this (layer 4 of the teacher has stride 32)."""

WRN50_2_WEIGHTS = "timm/wide_resnet50_2.tv2_in1k"
"""Hub repo whose ``model.safetensors`` holds torchvision's IMAGENET1K_V2 weights of wide_resnet50_2 under
torchvision's names; CSAD's teacher loads this repo. ``timm/wide_resnet50_2.tv_in1k`` holds IMAGENET1K_V1
under the same names and loads as well."""

LABELERS = ("unsupervised", "grounded_sam")
FUSION_WEIGHTS = ("equal", "calibrated")


@dataclass
class AecsadConfig:
    """Settings of an AeCSAD detector (offline defaults: CPU, random teacher weights, small students)."""

    # ---------------------------------------------------------------------------------------------- data
    image_size: int = help_field(
        "Side images are resized to (a multiple of 32; the thesis: 256).", default=128
    )
    val_share: float = help_field(
        "Share of the normal images held out for the fusion statistics and map normalisation.", default=0.2
    )
    seed: int = help_field("Seed of the weights, the splits, the clustering and the batches.", default=0)
    device: str = help_field("Torch device for training and inference.", default="cpu")
    eval_batch_size: int = help_field("Images per forward pass in predict.", default=8)
    # ------------------------------------------------------------------------------------------- teacher
    teacher_weights: str | None = help_field(
        "ImageNet weights of the WRN-50-2 teacher, safetensors only: a Hub id (hub profile: "
        f"{WRN50_2_WEIGHTS}), a local .safetensors file or a folder holding model.safetensors; None keeps "
        "random weights.",
        default=None,
    )
    wrn_base: int = help_field(
        "Planes of the teacher's first stage (64 = WRN-50-2; smaller for tests).", default=64
    )
    wrn_blocks: tuple[int, int, int, int] = help_field(
        "Bottleneck blocks per teacher stage ((3, 4, 6, 3) = WRN-50-2).", default=(3, 4, 6, 3)
    )
    # ------------------------------------------------------------------------------------- pseudo-labels
    labeler: str = help_field(
        "Component pseudo-labels: unsupervised (colour/position k-means, no weights) or grounded_sam.",
        default="unsupervised",
    )
    components: tuple[str, ...] = help_field(
        "Component names that prompt GroundingDINO (the knowledge base's components of the category).",
        default=(),
    )
    grounding_model: str = help_field(
        "GroundingDINO Hub id or local directory (grounded_sam labeler).",
        default="IDEA-Research/grounding-dino-base",
    )
    sam_model: str = help_field(
        "SAM Hub id or local directory (grounded_sam labeler).", default="facebook/sam-vit-huge"
    )
    box_threshold: float = help_field("GroundingDINO box score threshold.", default=0.25)
    text_threshold: float = help_field("GroundingDINO text score threshold.", default=0.25)
    sam_points: int = help_field("Points per side of SAM's automatic-mask grid.", default=16)
    sam_iou: float = help_field("Lowest predicted IoU of an automatic SAM mask that is kept.", default=0.8)
    background_overlap: float = help_field(
        "Filter 1: drop a SAM mask with more than this share of its pixels outside every object box.",
        default=0.5,
    )
    object_overlap: float = help_field(
        "Filter 2: keep a SAM mask only if at least this share of it lies inside the objects' masks.",
        default=0.5,
    )
    colour_clusters: int = help_field("k of the unsupervised labeler's colour/position k-means.", default=6)
    position_weight: float = help_field(
        "Weight of pixel position against Lab colour in that k-means.", default=0.2
    )
    label_images: int | None = help_field(
        "Most training images given pseudo-labels (a seeded random subset; the rest join D_U); None: all.",
        default=40,
    )
    min_component_area: float = help_field("Smallest component, as a share of the image.", default=0.002)
    max_components: int = help_field("Most components kept per image (largest first).", default=12)
    crop_size: int = help_field(
        "Side of the square component crops that are embedded (thesis: 64).", default=32
    )
    crop_variants: int = help_field(
        "Rotation/flip variants averaged per crop embedding: 1, 2, 4 or 8 (4 rotations x 2 flips).", default=2
    )
    meanshift_quantile: float = help_field(
        "Quantile of pairwise distances for MeanShift's bandwidth.", default=0.3
    )
    max_classes: int = help_field(
        "Most component classes (background excluded); rarer ones merge.", default=8
    )
    hdbscan_min_cluster_size: int = help_field("HDBSCAN min_cluster_size on per-image histograms.", default=5)
    min_labeled_share: float = help_field(
        "Least share of images in D_L; when HDBSCAN keeps fewer, the most typical histograms are added.",
        default=0.3,
    )
    # -------------------------------------------------------------------------------------- segmentation
    seg_channels: int = help_field(
        "Channels of the ASPP and the DeepLabV3+ decoder (thesis: 256).", default=64
    )
    aspp_rates: tuple[int, ...] = help_field(
        "Atrous rates of the ASPP branches on layer 3.", default=(1, 2, 3)
    )
    seg_epochs: int = help_field("Segmentation epochs over D_L.", default=10)
    unlabeled_start: int = help_field("First epoch (0-based) with the D_U losses.", default=5)
    seg_batch_size: int = help_field("Images per segmentation step.", default=8)
    seg_lr: float = help_field("Adam learning rate of the segmentation decoder.", default=2e-3)
    ce_weight: float = help_field("Weight of the cross-entropy loss on D_L.", default=1.0)
    dice_weight: float = help_field("Weight of the Dice loss on D_L.", default=1.0)
    focal_weight: float = help_field("Weight of the focal loss on D_L.", default=1.0)
    focal_gamma: float = help_field("Focusing parameter of the focal loss.", default=2.0)
    hist_weight: float = help_field("Weight of the histogram-matching loss on D_U.", default=1.0)
    entropy_weight: float = help_field("Weight of the entropy loss on D_U.", default=0.1)
    lsa_prob: float = help_field(
        "Chance that a D_L item gets LSA (components pasted elsewhere).", default=0.3
    )
    lsa_components: int = help_field("Most components pasted per LSA item.", default=2)
    cache_features: bool = help_field(
        "Keep the frozen teacher features of unaugmented training images in memory.", default=True
    )
    # ----------------------------------------------------------------------------------------- histogram
    hist_grid: int = help_field("P of the P x P patch histogram.", default=4)
    hist_shrinkage: float = help_field(
        "Covariance shrinkage toward its mean variance (0: none, 1: diagonal) before Mahalanobis.",
        default=0.1,
    )
    # ---------------------------------------------------------------------------------------------- LGST
    feature_dim: int = help_field(
        "Teacher channels after the fixed 1x1 projection (thesis: 512).", default=64
    )
    local_width: int = help_field("Base width of the local student (the thesis's size: 256).", default=16)
    global_width: int = help_field("Base width of the global student (the thesis's size: 64).", default=32)
    attention: bool = help_field(
        "Self-attention in the global student (AeCSAD); False gives CSAD's convolutional autoencoder.",
        default=True,
    )
    lgst_steps: int = help_field("Student training steps.", default=200)
    lgst_batch_size: int = help_field("Images per student step.", default=4)
    lgst_lr: float = help_field("Adam learning rate of the students (decayed x0.1 at 95%).", default=1e-3)
    local_weight: float = help_field("Weight of the local (hard-feature) loss.", default=1.0)
    global_weight: float = help_field("Weight of the global student's loss.", default=1.0)
    fusion_weight: float = help_field("Weight of the local student's global-imitation loss.", default=1.0)
    hard_quantile: float = help_field(
        "Only distances above this quantile enter the local loss.", default=0.999
    )
    global_augment: bool = help_field("Colour-jitter the images of the global branch.", default=False)
    map_weights: tuple[float, float, float] = help_field(
        "Weights of A_local, A_global and A_global-local in the anomaly map.", default=(1.0, 1.0, 1.0)
    )
    map_quantiles: tuple[float, float] = help_field(
        "Validation quantiles of each map sent to 0 and 0.1 (EfficientAD's normalisation).",
        default=(0.9, 0.995),
    )
    # -------------------------------------------------------------------------------------------- fusion
    trim: float = help_field("Share trimmed from each side for the trimmed z-normalisation.", default=0.2)
    fusion_weights: str = help_field(
        "equal: histogram + LGST; calibrated: their ratio chosen on the synthetic calibration set.",
        default="equal",
    )
    calibration_draws: int = help_field(
        "Anomalies drawn per held-out normal from a stage's draw function, for calibration.", default=2
    )
    save_teacher: bool = help_field(
        "Write the teacher's weights with the detector (275 MB); otherwise save rebuilds them from the seed "
        "or reloads teacher_weights.",
        default=False,
    )

    def __post_init__(self) -> None:
        self.wrn_blocks = tuple(int(v) for v in self.wrn_blocks)  # type: ignore[assignment]
        self.aspp_rates = tuple(int(v) for v in self.aspp_rates)
        self.components = tuple(str(v) for v in self.components)
        self.map_weights = tuple(float(v) for v in self.map_weights)  # type: ignore[assignment]
        self.map_quantiles = tuple(float(v) for v in self.map_quantiles)  # type: ignore[assignment]
        check_config(
            self.image_size >= 64 and self.image_size % STRIDE == 0,
            f"aecsad.image_size must be a multiple of {STRIDE}, at least 64, got {self.image_size}",
        )
        check_config(
            0.05 <= self.val_share <= 0.5, f"aecsad.val_share must be in [0.05, 0.5], got {self.val_share}"
        )
        check_config(bool(self.device), "aecsad.device must name a torch device")
        check_config(
            self.eval_batch_size >= 1, f"aecsad.eval_batch_size must be >= 1, got {self.eval_batch_size}"
        )
        check_config(self.wrn_base >= 1, f"aecsad.wrn_base must be >= 1, got {self.wrn_base}")
        check_config(
            len(self.wrn_blocks) == 4 and min(self.wrn_blocks) >= 1,
            f"aecsad.wrn_blocks must be four positive counts, got {self.wrn_blocks}",
        )
        refused = refused_weights(self.teacher_weights or "")
        check_config(refused is None, f"aecsad.teacher_weights {refused}")
        check_config(
            self.teacher_weights is None or self.wrn_base == 64,
            "aecsad.teacher_weights needs the full-size teacher (wrn_base 64)",
        )
        check_config(
            self.labeler in LABELERS, f"aecsad.labeler must be one of {LABELERS}, got {self.labeler!r}"
        )
        for name in ("box_threshold", "text_threshold", "sam_iou", "background_overlap", "object_overlap"):
            value = getattr(self, name)
            check_config(0.0 <= value <= 1.0, f"aecsad.{name} must be in [0, 1], got {value}")
        check_config(self.sam_points >= 1, f"aecsad.sam_points must be >= 1, got {self.sam_points}")
        check_config(
            self.colour_clusters >= 2, f"aecsad.colour_clusters must be >= 2, got {self.colour_clusters}"
        )
        check_config(
            self.position_weight >= 0, f"aecsad.position_weight must be >= 0, got {self.position_weight}"
        )
        check_config(
            0.0 < self.min_component_area < 1.0,
            f"aecsad.min_component_area must be in (0, 1), got {self.min_component_area}",
        )
        check_config(
            self.max_components >= 1, f"aecsad.max_components must be >= 1, got {self.max_components}"
        )
        check_config(
            self.label_images is None or self.label_images >= 2,
            f"aecsad.label_images must be None or >= 2, got {self.label_images}",
        )
        check_config(self.crop_size >= 32, f"aecsad.crop_size must be >= 32, got {self.crop_size}")
        check_config(
            self.crop_variants in (1, 2, 4, 8),
            f"aecsad.crop_variants must be 1, 2, 4 or 8, got {self.crop_variants}",
        )
        check_config(
            0.0 < self.meanshift_quantile <= 1.0,
            f"aecsad.meanshift_quantile must be in (0, 1], got {self.meanshift_quantile}",
        )
        check_config(
            1 <= self.max_classes <= 254, f"aecsad.max_classes must be in [1, 254], got {self.max_classes}"
        )
        check_config(
            self.hdbscan_min_cluster_size >= 2,
            f"aecsad.hdbscan_min_cluster_size must be >= 2, got {self.hdbscan_min_cluster_size}",
        )
        check_config(
            0.0 < self.min_labeled_share <= 1.0,
            f"aecsad.min_labeled_share must be in (0, 1], got {self.min_labeled_share}",
        )
        check_config(self.seg_channels >= 4, f"aecsad.seg_channels must be >= 4, got {self.seg_channels}")
        check_config(
            bool(self.aspp_rates) and min(self.aspp_rates) >= 1,
            f"aecsad.aspp_rates must be positive, got {self.aspp_rates}",
        )
        check_config(self.seg_epochs >= 1, f"aecsad.seg_epochs must be >= 1, got {self.seg_epochs}")
        check_config(
            self.unlabeled_start >= 0, f"aecsad.unlabeled_start must be >= 0, got {self.unlabeled_start}"
        )
        for name in ("seg_batch_size", "lgst_batch_size"):
            check_config(getattr(self, name) >= 2, f"aecsad.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("seg_lr", "lgst_lr"):
            check_config(
                0.0 < getattr(self, name) < 1.0, f"aecsad.{name} must be in (0, 1), got {getattr(self, name)}"
            )
        for name in (
            "ce_weight",
            "dice_weight",
            "focal_weight",
            "focal_gamma",
            "hist_weight",
            "entropy_weight",
            "local_weight",
            "global_weight",
            "fusion_weight",
        ):
            check_config(getattr(self, name) >= 0.0, f"aecsad.{name} must be >= 0, got {getattr(self, name)}")
        check_config(0.0 <= self.lsa_prob <= 1.0, f"aecsad.lsa_prob must be in [0, 1], got {self.lsa_prob}")
        check_config(
            self.lsa_components >= 1, f"aecsad.lsa_components must be >= 1, got {self.lsa_components}"
        )
        check_config(self.hist_grid >= 1, f"aecsad.hist_grid must be >= 1, got {self.hist_grid}")
        check_config(
            0.0 <= self.hist_shrinkage <= 1.0,
            f"aecsad.hist_shrinkage must be in [0, 1], got {self.hist_shrinkage}",
        )
        for name in ("feature_dim", "local_width", "global_width"):
            check_config(getattr(self, name) >= 4, f"aecsad.{name} must be >= 4, got {getattr(self, name)}")
        check_config(self.lgst_steps >= 1, f"aecsad.lgst_steps must be >= 1, got {self.lgst_steps}")
        check_config(
            0.0 < self.hard_quantile < 1.0,
            f"aecsad.hard_quantile must be in (0, 1), got {self.hard_quantile}",
        )
        check_config(
            len(self.map_weights) == 3 and min(self.map_weights) >= 0 and sum(self.map_weights) > 0,
            f"aecsad.map_weights must be three weights >= 0, not all 0, got {self.map_weights}",
        )
        low, high = (self.map_quantiles + (0.0, 0.0))[:2]
        check_config(
            len(self.map_quantiles) == 2 and 0.0 <= low < high <= 1.0,
            f"aecsad.map_quantiles must be two increasing quantiles in [0, 1], got {self.map_quantiles}",
        )
        check_config(0.0 <= self.trim < 0.5, f"aecsad.trim must be in [0, 0.5), got {self.trim}")
        check_config(
            self.fusion_weights in FUSION_WEIGHTS,
            f"aecsad.fusion_weights must be one of {FUSION_WEIGHTS}, got {self.fusion_weights!r}",
        )
        check_config(
            self.calibration_draws >= 0,
            f"aecsad.calibration_draws must be >= 0, got {self.calibration_draws}",
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in data.items()}


def refused_weights(source: str) -> str | None:
    """Why ``source`` may not name teacher weights (a URL or a pickle checkpoint), or None when it may.

    Weights are safetensors only: a pickle (``.pth``, ``.pt``, ``.bin``, ...) can run code when loaded, and
    URLs are not fetched (torchvision's weight URLs are such pickles); Hub ids go through the HF cache. The
    reason reads after the field's name.
    """
    if source.strip().lower().startswith(("http://", "https://")):
        return (
            f"{source!r} is a URL, which kka-synth does not fetch: give a Hub id (such as "
            f"{WRN50_2_WEIGHTS!r}) or a local .safetensors file"
        )
    if PurePath(source).suffix.lower() in PICKLE_SUFFIXES:
        return (
            f"{source!r} is a pickle checkpoint, which kka-synth never loads because it can run code: use "
            f"the Hub id {WRN50_2_WEIGHTS!r}, or convert a file you trust to .safetensors "
            "(safetensors.torch.save_file)"
        )
    return None


PROFILES: dict[str, dict[str, Any]] = {
    "offline": {
        "image_size": 128,
        "labeler": "unsupervised",
        "teacher_weights": None,
        "label_images": 40,
        "feature_dim": 64,
        "local_width": 16,
        "global_width": 32,
        "lgst_steps": 200,
    },
    "hub": {
        "image_size": 256,
        "labeler": "grounded_sam",
        "teacher_weights": WRN50_2_WEIGHTS,
        "label_images": None,
        "max_components": 24,
        "crop_size": 64,
        "crop_variants": 8,
        "feature_dim": 512,
        "local_width": 256,
        "global_width": 64,
        "seg_channels": 256,
        "aspp_rates": [2, 4, 6],
        "seg_epochs": 60,
        "unlabeled_start": 20,
        "seg_lr": 1e-3,
        "lsa_prob": 0.5,
        "lgst_steps": 20000,
        "lgst_batch_size": 8,
        "lgst_lr": 2e-4,
        "global_augment": True,
        "cache_features": False,
    },
}
"""Field overrides per profile. ``offline`` repeats the defaults: 128 px, random teacher, unsupervised labels
of 40 images, 64 teacher channels, small students and 200 student steps (about 2 minutes per category of the
demo on one CPU thread). ``hub`` is the thesis's setting: 256 px, torchvision's ImageNet weights (as
safetensors from the Hub, :data:`WRN50_2_WEIGHTS`), Grounded-SAM labels of every image, 64 px crops with all
8 rotations/flips, 512 x 64 x 64 teacher features, CSAD's student widths and learning rate; it wants a GPU
(set ``device``)."""

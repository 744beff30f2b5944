"""Dataset loaders (MVTec AD, MVTec LOCO AD, VisA, generic folders) and the built-in demo dataset.

``load_samples(dataset, root, categories)`` lists a dataset as :class:`~kka_synth.types.Sample` records;
``load_sample(sample, size)`` reads its pixels as RGB uint8 and a bool mask.
"""

from __future__ import annotations

from kka_synth.data.demo import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, DEMO_VERSION, build_demo, demo_root
from kka_synth.data.folder import load_folder
from kka_synth.data.images import (
    IMAGE_EXTENSIONS,
    DataError,
    image_size,
    load_mask,
    load_rgb,
    resize_mask,
    resize_rgb,
    save_mask,
    save_rgb,
)
from kka_synth.data.mvtec import load_mvtec_ad, load_mvtec_loco, loco_defects_config
from kka_synth.data.samples import (
    DATASET_NAMES,
    LOADERS,
    list_categories,
    load_batch,
    load_sample,
    load_samples,
    sample_id,
    validate_pair,
)
from kka_synth.data.visa import load_visa

__all__ = [
    "DATASET_NAMES",
    "DEMO_CATEGORIES",
    "DEMO_DEFECT_TYPES",
    "DEMO_VERSION",
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "DataError",
    "build_demo",
    "demo_root",
    "image_size",
    "list_categories",
    "load_batch",
    "load_folder",
    "load_mask",
    "load_mvtec_ad",
    "load_mvtec_loco",
    "load_rgb",
    "load_sample",
    "load_samples",
    "load_visa",
    "loco_defects_config",
    "resize_mask",
    "resize_rgb",
    "sample_id",
    "save_mask",
    "save_rgb",
    "validate_pair",
]

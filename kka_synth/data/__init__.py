"""Dataset loaders (MVTec AD, MVTec LOCO AD, VisA, generic folders, Hugging Face mirrors), the built-in demo
dataset, the MVTec AD download, and the export of a run's synthetic set in MVTec AD layout.

``load_samples(dataset, root, categories)`` lists a dataset as :class:`~kka_synth.types.Sample` records;
``load_sample(sample, size)`` reads its pixels as RGB uint8 and a bool mask.
"""

from __future__ import annotations

from kka_synth.data.demo import DEMO_CATEGORIES, DEMO_DEFECT_TYPES, DEMO_VERSION, build_demo, demo_root
from kka_synth.data.download import (
    MVTEC_AD_NOTICE,
    DownloadError,
    MVTecDownload,
    download_mvtec_ad,
    ensure_mvtec_ad,
)
from kka_synth.data.export import ExportError, ExportResult, export_run
from kka_synth.data.folder import load_folder
from kka_synth.data.hf_mirror import hf_mirror_categories, load_hf_mirror
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
    HF_LOADER,
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
    "HF_LOADER",
    "DEMO_CATEGORIES",
    "DEMO_DEFECT_TYPES",
    "DEMO_VERSION",
    "IMAGE_EXTENSIONS",
    "LOADERS",
    "DataError",
    "DownloadError",
    "ExportError",
    "ExportResult",
    "MVTEC_AD_NOTICE",
    "MVTecDownload",
    "build_demo",
    "download_mvtec_ad",
    "ensure_mvtec_ad",
    "export_run",
    "hf_mirror_categories",
    "demo_root",
    "image_size",
    "list_categories",
    "load_batch",
    "load_folder",
    "load_hf_mirror",
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

"""The evaluation protocol: what a synthetic set adds to a detector on the dataset's real test split.

For each category of a run, each detector and each synthetic-set variant, a detector is trained on the
category's normal training images plus that variant's synthetic anomalies, then scored on the real test
split. Real test anomalies are only ever predicted, never trained on.

The variants (``kka_synth.config.VARIANTS``) follow the ablation of "Anomaly Detection by Effectively
Leveraging Synthetic Images" (arXiv 2512.23227), with the run's curated KKA set as the generative set:

    none       normal images only
    rule       rule-based Perlin anomalies drawn on the fly (DRAEM's own augmentation)
    kka        the run's curated hard set (generative-only)
    two-stage  rule-based anomalies first, then the curated set (the paper's recipe)
    reverse    the curated set first, then rule-based anomalies (the paper's order ablation)

Every (category, detector, variant, seed) writes ``eval/<category>/<detector>/<variant>/seed<k>/`` with
``result.json`` (metrics, ROC curves, timings, overlay captions, and the ``notes`` a detector states about
itself, such as random backbone weights), ``overlays/`` (a few test images with their
anomaly maps) and ``model/`` (the trained weights). A finished result is kept and reused when the command is
run again with the same ``eval.options`` for its detector (result.json records them), so an interrupted
evaluation loses nothing. Image and mask paths read from the run's curated index must stay inside the run
directory. ``metrics.json`` (mean and std over seeds) and
``metrics.md`` (a table per category) are rebuilt from the results at the end. On MVTec LOCO AD the metrics
also hold ``logical_auroc`` and ``structural_auroc`` (each anomaly kind against all normal test images).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from kka_synth.config import VARIANTS, ConfigError, EvalConfig
from kka_synth.data import DataError, load_mask, load_rgb, load_samples, save_rgb
from kka_synth.data.mvtec import loco_defects_config, loco_regions
from kka_synth.eval.metrics import PixelScores, anomaly_metrics, image_auroc, roc_points
from kka_synth.prompts.knowledge import load_knowledge, read_user_knowledge
from kka_synth.runs import RunDir, atomic_dir, atomic_write_json, atomic_write_text, inside, read_jsonl
from kka_synth.synth.perlin import PerlinAnomalies
from kka_synth.types import Sample, SyntheticStage

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""Called as ``progress(task, done, total)``; the CLI draws bars from it."""

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max", "spro")
METRIC_TITLES = {
    "image_auroc": "image AUROC",
    "pixel_auroc": "pixel AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "image F1-max",
    "pixel_f1_max": "pixel F1-max",
    "spro": "sPRO",
    "logical_auroc": "logical AUROC",
    "structural_auroc": "structural AUROC",
}
LOCO_METRICS = ("logical_auroc", "structural_auroc")
"""MVTec LOCO AD's image AUROC per anomaly kind (its test folders ``logical_anomalies`` and
``structural_anomalies``), each against all normal test images; only results on such splits have them."""


def _silent(task: str, done: int, total: int) -> None:
    return None


@dataclass
class TestSplit:
    """A category's real test images at the evaluation size, with what the metrics need."""

    samples: list[Sample]
    images: list[np.ndarray]
    labels: np.ndarray
    """(N,) int, 1 for anomalous."""
    masks: np.ndarray | None
    """(N, H, W) bool, or None when an anomalous image has no mask (pixel metrics are then skipped)."""
    regions: list[list[tuple[np.ndarray, float]]] | None
    """MVTec LOCO regions with saturations per image (for sPRO), or None."""


def variant_stages(
    variant: str, rule: SyntheticStage | None, kka: SyntheticStage | None, rule_share: float
) -> list[SyntheticStage] | None:
    """The training schedule of a variant (None for "none"); ValueError when a set it needs is empty."""
    if variant == "none":
        return None
    if variant in ("kka", "two-stage", "reverse") and kka is None:
        raise ValueError("the run has no curated anomalies for this category")
    if variant in ("rule", "two-stage", "reverse") and rule is None:
        raise ValueError("no rule-based anomalies for this category")
    if variant == "rule":
        return [_with_share(rule, 1.0)]
    if variant == "kka":
        return [_with_share(kka, 1.0)]
    if variant == "two-stage":
        return [_with_share(rule, rule_share), _with_share(kka, 1.0 - rule_share)]
    if variant == "reverse":
        return [_with_share(kka, 1.0 - rule_share), _with_share(rule, rule_share)]
    raise ConfigError(f"unknown eval variant {variant!r} (known: {', '.join(VARIANTS)})")


def _with_share(stage: SyntheticStage | None, share: float) -> SyntheticStage:
    assert stage is not None
    return SyntheticStage(stage.name, anomalies=stage.anomalies, draw=stage.draw, share=share)


class Evaluation:
    """Trains and tests every configured detector and variant on every category of a run."""

    def __init__(self, run: RunDir, config: EvalConfig, progress: Progress | None = None):
        from kka_synth.detectors import DETECTORS

        unknown = [name for name in config.detectors if name not in DETECTORS]
        if unknown:
            raise ConfigError(f"unknown detector {unknown[0]!r} (known: {', '.join(DETECTORS)})")
        self.run = run
        self.run_config = run.config
        self.user_knowledge = read_user_knowledge(self.run_config.data.knowledge)
        self.config = config
        self.progress = progress or _silent
        self.size = config.image_size or self.run_config.data.image_size
        self.folder = run.path / "eval"
        check_detector_options(config.options)
        for name in config.detectors:  # bad options fail here, before any data is read or model trained
            self._detector_config(name, self.run_config.seed)

    # data --------------------------------------------------------------------------------------------
    def _samples(self) -> dict[str, list[Sample]]:
        data = self.run_config.data
        samples = load_samples(data.dataset, data.root, data.categories or None, columns=data.hf_columns)
        by_category: dict[str, list[Sample]] = {}
        for s in samples:
            by_category.setdefault(s.category, []).append(s)
        return by_category

    def _test_split(self, category: str, samples: list[Sample]) -> TestSplit:
        test = [s for s in samples if s.split == "test"]
        if not test or not any(s.label == 1 for s in test) or not any(s.label == 0 for s in test):
            raise DataError(f"category {category!r} needs normal and anomalous test images to be evaluated")
        images = [load_rgb(s.image_path, self.size) for s in test]
        labels = np.array([s.label for s in test], dtype=np.int64)
        masks = None
        if all(s.mask_path is not None for s in test if s.label == 1):
            masks = np.zeros((len(test), self.size, self.size), dtype=bool)
            for i, s in enumerate(test):
                if s.mask_path is not None:
                    masks[i] = load_mask(s.mask_path, self.size)
        else:
            logger.warning("%s: some anomalous test images have no mask; pixel metrics are skipped", category)
        regions = None
        if self.run_config.data.dataset == "mvtec_loco" and self.run_config.data.root:
            defects = loco_defects_config(self.run_config.data.root, category)
            if defects:
                regions = [
                    [] if s.mask_path is None else loco_regions(s.mask_path, defects, self.size) for s in test
                ]
        return TestSplit(test, images, labels, masks, regions)

    def _rule_stage(self, category: str) -> SyntheticStage:
        dataset = self.run_config.data.dataset
        knowledge = load_knowledge(
            category, None if dataset == "folder" else dataset, extra=self.user_knowledge
        )
        return SyntheticStage("rule", draw=PerlinAnomalies(category, list(knowledge.defect_types)))

    def _kka_stage(self, category: str, normal: dict[str, np.ndarray]) -> SyntheticStage | None:
        """The run's curated anomalies of ``category`` with their clean source images."""
        curated = self.run.curated_dir
        index = curated / "index.jsonl"
        if not index.is_file():
            return None
        anomalies = []
        for row in read_jsonl(index):
            if row["category"] != category:
                continue
            # paths read from the run's own file: a tampered one may not lead out of the run directory
            image = load_rgb(inside(curated, str(row["image"])), self.size)
            # a text-to-image anomaly may have no mask; detectors that need one skip it (and say so)
            mask = None
            if row.get("mask") is not None:
                mask = load_mask(inside(curated, str(row["mask"])), self.size)
            clean = normal.get(str(row.get("source_id", "")).split("/")[-1])
            anomalies.append((image, mask, clean))
        return SyntheticStage("kka", anomalies=anomalies) if anomalies else None

    # one result --------------------------------------------------------------------------------------
    def result_dir(self, category: str, detector: str, variant: str, seed: int) -> Path:
        return self.folder / category / detector / variant / f"seed{seed}"

    def _detector_config(self, name: str, seed: int, category: str | None = None) -> Any:
        """The config of detector ``name``: its profile's defaults, then ``eval.options``, then ``seed``;
        a field it lacks or a bad value is a one-line ConfigError naming ``eval.options.<name>``."""
        from kka_synth.detectors import DETECTORS

        cls = DETECTORS[name]
        options = {**cls.profiles.get(self.run_config.profile, {}), **self.config.options.get(name, {})}
        options["seed"] = seed
        fields = getattr(cls.config_class, "__dataclass_fields__", {})
        if category is not None and "components" in fields and not options.get("components"):
            # a detector prompted with the category's parts (AeCSAD's GroundingDINO) gets the knowledge base's
            dataset = self.run_config.data.dataset
            options["components"] = list(
                load_knowledge(
                    category, None if dataset == "folder" else dataset, extra=self.user_knowledge
                ).components
            )
        try:
            return cls.config_class(**options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"eval.options.{name}: {error}") from None

    def _detector(self, name: str, seed: int, task: str, category: str | None = None) -> Any:
        from kka_synth.detectors import DETECTORS

        config = self._detector_config(name, seed, category)
        return DETECTORS[name](config, progress=lambda done, total: self.progress(task, done, total))

    def _options_of(self, name: str) -> dict[str, Any]:
        """``eval.options`` of detector ``name`` as result.json stores them (JSON types)."""
        return json.loads(json.dumps(self.config.options.get(name, {}), default=str))

    def _finished(self, category: str, detector: str, variant: str, seed: int) -> bool:
        """Whether a result of this combination exists and was trained with the current ``eval.options``."""
        result = _read_result(self.result_dir(category, detector, variant, seed))
        return result is not None and result.get("options", {}) == self._options_of(detector)

    def _evaluate_one(
        self,
        category: str,
        detector_name: str,
        variant: str,
        seed: int,
        normal: list[np.ndarray],
        stages: list[SyntheticStage] | None,
        test: TestSplit,
    ) -> dict[str, Any]:
        task = f"{category} {detector_name} {variant} seed {seed}"
        detector = self._detector(detector_name, seed, task, category)
        started = time.perf_counter()
        detector.fit(normal, stages)
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        output = detector.predict(test.images)
        predict_seconds = time.perf_counter() - started
        scores = np.asarray(output.pred_score, dtype=np.float64)
        maps = np.asarray(output.anomaly_map, dtype=np.float32)
        metrics = anomaly_metrics(test.labels, scores, test.masks, maps, test.regions)
        metrics.update(loco_aurocs(test, scores))
        curves: dict[str, Any] = {"image_roc": _curve(*roc_points(test.labels, scores)), "pixel_roc": None}
        if test.masks is not None and test.masks.any() and not test.masks.all():
            curves["pixel_roc"] = _curve(*PixelScores(test.masks, maps).roc_points())
        folder = self.result_dir(category, detector_name, variant, seed)
        with atomic_dir(folder) as tmp:
            overlays = self._overlays(tmp, test, scores, maps)
            detector.save(tmp / "model")
            result = {
                "category": category,
                "detector": detector_name,
                "variant": variant,
                "seed": seed,
                "metrics": metrics,
                "train_seconds": round(train_seconds, 3),
                "predict_seconds": round(predict_seconds, 3),
                "images_per_second": round(len(test.images) / max(predict_seconds, 1e-9), 2),
                "synthetic": {
                    stage.name: (len(stage.anomalies) if stage.anomalies else "on the fly")
                    for stage in stages or []
                },
                "test_images": {"normal": int((test.labels == 0).sum()), "anomalous": int(test.labels.sum())},
                "image_size": self.size,
                "options": self._options_of(detector_name),
                "curves": curves,
                "overlays": overlays,
                "notes": [str(note) for note in getattr(detector, "notes", [])],
            }
            atomic_write_json(tmp / "result.json", result)
        return result

    def _overlays(
        self, folder: Path, test: TestSplit, scores: np.ndarray, maps: np.ndarray
    ) -> list[dict[str, Any]]:
        """Write a few test images with their anomaly maps: anomalous ones spread over the split, then one
        normal one. The colour scale is shared by all of them (the map's 1st to 99.9th percentile)."""
        count = self.config.overlays
        if count == 0:
            return []
        anomalous = np.flatnonzero(test.labels == 1)
        normal = np.flatnonzero(test.labels == 0)
        n_anomalous = min(len(anomalous), max(count - 1, 1))
        chosen = list(anomalous[np.linspace(0, len(anomalous) - 1, n_anomalous).round().astype(int)])
        chosen += list(normal[: max(0, count - n_anomalous)])
        low, high = np.percentile(maps, [1.0, 99.9])
        rows = []
        for j, i in enumerate(dict.fromkeys(int(i) for i in chosen)):
            heat = np.clip((maps[i] - low) / max(high - low, 1e-12), 0.0, 1.0)
            coloured = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)[..., ::-1]
            image = test.images[i]
            if coloured.shape[:2] != image.shape[:2]:
                coloured = cv2.resize(coloured, image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
            blend = (0.5 * image.astype(np.float32) + 0.5 * coloured.astype(np.float32)).astype(np.uint8)
            if test.masks is not None and test.masks[i].any():
                contours, _ = cv2.findContours(
                    test.masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
                )
                cv2.drawContours(blend, contours, -1, (0, 255, 0), 1)
            name = f"overlays/{j:03d}.png"
            save_rgb(folder / name, np.concatenate([image, blend], axis=1))
            sample = test.samples[i]
            rows.append(
                {
                    "file": name,
                    "image": f"{sample.split}/{sample.defect_type}/{Path(sample.image_path).name}",
                    "label": int(test.labels[i]),
                    "score": float(scores[i]),
                }
            )
        return rows

    # the whole evaluation ----------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        """Evaluate everything not evaluated yet, then rebuild metrics.json and metrics.md."""
        by_category = self._samples()
        seeds = [self.run_config.seed + i for i in range(self.config.seeds)]
        for category, samples in by_category.items():
            todo = [
                (d, v, s)
                for d in self.config.detectors
                for v in self.config.variants
                for s in seeds
                if not self._finished(category, d, v, s)
            ]
            if not todo:
                continue
            train = [s for s in samples if s.split == "train" and s.label == 0]
            if not train:
                raise DataError(f"category {category!r} has no normal training images")
            self.progress(f"loading {category}", 0, 1)
            normal_by_stem = {Path(s.image_path).stem: load_rgb(s.image_path, self.size) for s in train}
            normal = list(normal_by_stem.values())
            test = self._test_split(category, samples)
            rule = self._rule_stage(category)
            kka = self._kka_stage(category, normal_by_stem)
            self.progress(f"loading {category}", 1, 1)
            for detector, variant, seed in todo:
                try:
                    stages = variant_stages(variant, rule, kka, self.config.rule_share)
                except ValueError as error:
                    logger.warning("%s: variant %s skipped: %s", category, variant, error)
                    continue
                result = self._evaluate_one(category, detector, variant, seed, normal, stages, test)
                logger.info(
                    "%s %s %s seed %d: image AUROC %s, %.1f s",
                    category,
                    detector,
                    variant,
                    seed,
                    _fmt(result["metrics"]["image_auroc"]),
                    result["train_seconds"],
                )
        summary = self.summarise(seeds)
        atomic_write_json(self.run.path / "metrics.json", summary)
        atomic_write_text(self.run.path / "metrics.md", metrics_markdown(summary))
        return summary

    def summarise(self, seeds: list[int]) -> dict[str, Any]:
        """Mean and std over seeds of every finished result of the configured detectors and variants."""
        categories: dict[str, Any] = {}
        for category_dir in sorted(p for p in self.folder.glob("*") if p.is_dir()):
            for detector in self.config.detectors:
                for variant in self.config.variants:
                    results = [
                        _read_result(self.result_dir(category_dir.name, detector, variant, s)) for s in seeds
                    ]
                    results = [r for r in results if r is not None]
                    if not results:
                        continue
                    entry = {
                        "mean": {},
                        "std": {},
                        "n": len(results),
                        "train_seconds": round(float(np.mean([r["train_seconds"] for r in results])), 3),
                    }
                    for metric in (*METRICS, *LOCO_METRICS):
                        values = [r["metrics"].get(metric) for r in results]
                        values = [v for v in values if v is not None and math.isfinite(v)]
                        entry["mean"][metric] = float(np.mean(values)) if values else None
                        entry["std"][metric] = float(np.std(values)) if values else None
                    categories.setdefault(category_dir.name, {}).setdefault(detector, {})[variant] = entry
        return {
            "dataset": self.run_config.data.dataset,
            "image_size": self.size,
            "detectors": list(self.config.detectors),
            "variants": list(self.config.variants),
            "seeds": seeds,
            "categories": categories,
        }


def loco_aurocs(test: TestSplit, scores: np.ndarray) -> dict[str, float]:
    """``logical_auroc`` and ``structural_auroc`` of a split holding MVTec LOCO's anomaly kinds (each kind
    against all normal test images); an empty dict for other datasets."""
    kinds = np.array([sample.defect_type for sample in test.samples])
    out = {}
    for metric, kind in zip(LOCO_METRICS, ("logical_anomalies", "structural_anomalies"), strict=True):
        chosen = (test.labels == 0) | (kinds == kind)
        if (kinds == kind).any() and (test.labels == 0).any():
            out[metric] = image_auroc(test.labels[chosen], np.asarray(scores)[chosen])
    return out


def shown_metrics(summary: dict[str, Any]) -> tuple[str, ...]:
    """The metrics a table of ``summary`` shows: :data:`METRICS`, plus the :data:`LOCO_METRICS` that some
    result has."""
    present = {
        metric
        for detectors in summary["categories"].values()
        for variants in detectors.values()
        for entry in variants.values()
        for metric in LOCO_METRICS
        if entry["mean"].get(metric) is not None
    }
    return (*METRICS, *(metric for metric in LOCO_METRICS if metric in present))


def _read_result(folder: Path) -> dict[str, Any] | None:
    path = folder / "result.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _curve(fpr: np.ndarray, tpr: np.ndarray) -> dict[str, list[float]]:
    return {"fpr": [round(float(x), 5) for x in fpr], "tpr": [round(float(y), 5) for y in tpr]}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def format_cell(entry: dict[str, Any], metric: str) -> str:
    """ "mean ± std" of one metric (just the mean for one seed), or "–"."""
    mean, std = entry["mean"].get(metric), entry["std"].get(metric)
    if mean is None:
        return "–"
    return f"{mean:.3f}" if entry["n"] == 1 else f"{mean:.3f} ± {std:.3f}"


def metrics_markdown(summary: dict[str, Any]) -> str:
    """A markdown table per category: one row per detector and variant."""
    lines = [f"# Metrics on the real test split of {summary['dataset']} ({summary['image_size']} px)", ""]
    lines.append(f"Seeds: {', '.join(str(s) for s in summary['seeds'])}; mean ± std over seeds.")
    shown = shown_metrics(summary)
    for category, detectors in summary["categories"].items():
        lines += ["", f"## {category}", ""]
        header = ["detector", "variant", *(METRIC_TITLES[m] for m in shown), "train s"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for detector, variants in detectors.items():
            for variant, entry in variants.items():
                cells = [detector, variant, *(format_cell(entry, m) for m in shown)]
                cells.append(f"{entry['train_seconds']:.0f}")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_detector_options(options: Any, where: str = "eval.options") -> None:
    """Check that ``options`` has the shape of ``eval.options``: known detector names mapped to mappings
    of field names; a one-line ConfigError otherwise. The fields themselves are checked by each detector's
    config class (see :meth:`Evaluation._detector_config`)."""
    from kka_synth.detectors import DETECTORS

    if not isinstance(options, dict):
        raise ConfigError(f"{where} must map detector names to their options, got {type(options).__name__}")
    for name, fields in options.items():
        if name not in DETECTORS:
            raise ConfigError(f"{where} names unknown detector {name!r} (known: {', '.join(DETECTORS)})")
        if not isinstance(fields, dict) or not all(isinstance(key, str) for key in fields):
            raise ConfigError(f"{where}.{name} must map field names to values, got {fields!r:.80}")


def evaluate_run(
    run_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    progress: Progress | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run directory; ``overrides`` replace fields of the run's eval config.

    ``options`` (the shape of ``eval.options``) are laid over the run's ``eval.options`` detector by
    detector: ``{"draem": {"steps": 10}}`` changes ``steps`` and keeps the run's other draem options.
    """
    run = RunDir.load(run_dir)
    config = run.config.eval
    overrides = dict(overrides or {})
    if options is not None:
        check_detector_options(options, "options")
        merged = dict(overrides.get("options", config.options))
        for name, fields in options.items():
            merged[name] = {**merged.get(name, {}), **fields}
        overrides["options"] = merged
    if overrides:
        data = {**config.__dict__, **overrides}
        try:
            config = EvalConfig(**data)
        except TypeError as error:
            raise ConfigError(f"bad eval option: {error}") from None
    return Evaluation(run, config, progress).run_all()


__all__ = [
    "LOCO_METRICS",
    "METRICS",
    "METRIC_TITLES",
    "Evaluation",
    "TestSplit",
    "check_detector_options",
    "evaluate_run",
    "format_cell",
    "loco_aurocs",
    "metrics_markdown",
    "shown_metrics",
    "variant_stages",
]

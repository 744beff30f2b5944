"""Run configuration: one dataclass per stage, gathered in :class:`RunConfig`, loaded from YAML.

Fields carry help text and are checked in ``__post_init__``; a bad value raises :class:`ConfigError` with
one line naming the field. TRL's ``DPOConfig`` and PEFT's ``LoraConfig`` are not wrapped: ``dpo`` and
``lora`` hold their keyword arguments and are handed to them unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("demo", "mvtec_ad", "mvtec_loco", "visa", "folder")
HF_PREFIX = "hf:"
"""``data.dataset`` of the form ``hf:<Hub repo id or local path>`` reads a Hugging Face dataset mirror."""
HF_COLUMNS = {
    "image": "image",
    "mask": "mask",
    "label": "label",
    "category": "category",
    "split": "split",
    "defect_type": "defect_type",
}
"""Our field name -> the mirror's column name (the defaults follow anomalib's and MVTec AD's names)."""
PROFILES = ("offline", "hub")
MODES = ("add", "rep")
VARIANTS = ("none", "rule", "kka", "two-stage", "reverse")
"""Synthetic-set variants of the evaluation: none (normal images only), rule (Perlin anomalies), kka (the
run's curated set), two-stage (rule, then kka) and reverse (kka, then rule)."""


class ConfigError(ValueError):
    """A configuration value is wrong; the message is one line naming the field."""


def help_field(text: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its help text (shown by docs and the CLI)."""
    return field(metadata={"help": text}, **kwargs)


def check_config(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


@dataclass
class DataConfig:
    dataset: str = help_field(
        "Dataset layout: " + ", ".join(DATASETS) + ", or hf:<Hub repo id or local path> for a Hugging Face "
        "dataset mirror.",
        default="demo",
    )
    root: str | None = help_field(
        "Dataset root folder (not needed for demo; for hf: where images are unpacked, default the cache).",
        default=None,
    )
    categories: list[str] = help_field("Categories to use; empty means all.", default_factory=list)
    image_size: int = help_field("Side in pixels that images are resized to for the loop.", default=128)
    knowledge: str | None = help_field(
        "A YAML file of your own category knowledge (the format of prompts/knowledge/*.yaml); its categories "
        "take precedence over the shipped ones, and the compact proposer learns them too.",
        default=None,
    )
    holdout: float = help_field(
        "Share of train/good held out to calibrate the hard rule and the filters.", default=0.25
    )
    hf_columns: dict[str, str] = help_field(
        "hf: mirrors: our field (" + ", ".join(HF_COLUMNS) + ") -> the mirror's column name. Splits come "
        "from the split column when the mirror has one, else from its own train/test splits.",
        default_factory=lambda: dict(HF_COLUMNS),
    )

    def __post_init__(self) -> None:
        is_hf = isinstance(self.dataset, str) and self.dataset.startswith(HF_PREFIX)
        check_config(
            self.dataset in DATASETS or (is_hf and len(self.dataset) > len(HF_PREFIX)),
            f"data.dataset must be one of {', '.join(DATASETS)} or hf:<repo id or path>, "
            f"got {self.dataset!r}",
        )
        check_config(
            self.dataset == "demo" or is_hf or self.root is not None,
            f"data.root is required for dataset {self.dataset!r} (pass --data-root)",
        )
        check_config(
            isinstance(self.hf_columns, dict), "data.hf_columns must be a mapping of field -> column name"
        )
        unknown = sorted(set(self.hf_columns) - set(HF_COLUMNS))
        check_config(
            not unknown,
            f"data.hf_columns has unknown field {unknown[0] if unknown else ''!r} "
            f"(known: {', '.join(HF_COLUMNS)})",
        )
        bad = [key for key, value in self.hf_columns.items() if not isinstance(value, str) or not value]
        check_config(not bad, f"data.hf_columns.{bad[0] if bad else ''} must be a non-empty column name")
        check_config(
            16 <= self.image_size <= 4096, f"data.image_size must be in [16, 4096], got {self.image_size}"
        )
        check_config(0.05 <= self.holdout <= 0.5, f"data.holdout must be in [0.05, 0.5], got {self.holdout}")


PROPOSER_BACKENDS = ("compact", "transformers", "vllm", "openai")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ProposerConfig:
    backend: str = help_field(
        "Proposer backend: compact (offline LM), transformers (any causal LM), vllm (the vllm extra) or "
        "openai (any OpenAI-compatible endpoint: OpenAI, a vLLM server, Ollama).",
        default="compact",
    )
    model: str | None = help_field(
        "Hub id or local path of the model (the model name for openai); None builds the compact LM.",
        default=None,
    )
    temperature: float = help_field("Sampling temperature.", default=1.0)
    top_p: float = help_field("Nucleus sampling mass.", default=1.0)
    max_new_tokens: int = help_field("Longest completion in tokens.", default=64)
    batch_size: int = help_field("Completions sampled per generate call.", default=64)
    constrained: bool = help_field(
        "Constrain decoding to the spec: the spec grammar (compact), JSON-schema guided decoding (vllm), "
        "structured output (openai). transformers samples freely and relies on parsing and retries.",
        default=True,
    )
    pretrain_steps: int = help_field(
        "Pretraining steps of the compact LM on the knowledge corpus.", default=300
    )
    max_retries: int = help_field(
        "LLM backends: times a failed reply is asked again, with the parser's error fed back.", default=2
    )
    examples: int = help_field(
        "LLM backends: earlier hard specs of this run shown as few-shot examples.", default=4
    )
    device: str = help_field(
        "transformers: auto (cuda when available), cpu, cuda, cuda:N or mps.", default="auto"
    )
    dtype: str = help_field(
        "transformers and vllm: auto (bfloat16 on cuda, float32 on cpu), float32, float16 or bfloat16.",
        default="auto",
    )
    base_url: str | None = help_field(
        "openai: base URL of the endpoint, e.g. http://localhost:8000/v1; None is OpenAI's.", default=None
    )
    api_key_env: str = help_field(
        "openai: environment variable that holds the API key (the key itself is never stored).",
        default="OPENAI_API_KEY",
    )
    timeout: float = help_field("openai: seconds per request.", default=60.0)
    concurrency: int = help_field("openai: requests in flight at once.", default=8)
    tensor_parallel_size: int = help_field("vllm: GPUs the model is split over.", default=1)
    gpu_memory_utilization: float = help_field(
        "vllm: share of GPU memory vLLM may take (DPO needs the rest).", default=0.5
    )
    max_lora_rank: int = help_field("vllm: largest LoRA rank it serves (>= alignment.lora.r).", default=64)
    caption: bool = help_field(
        "LLM backends: describe a normal image of each category with a vision-language model and put the "
        "caption in the prompt.",
        default=False,
    )
    caption_model: str = help_field(
        "Hub id or local path of the image-text-to-text model that writes the caption.",
        default="HuggingFaceTB/SmolVLM-256M-Instruct",
    )

    def __post_init__(self) -> None:
        check_config(
            self.backend in PROPOSER_BACKENDS,
            f"proposer.backend must be one of {', '.join(PROPOSER_BACKENDS)}, got {self.backend!r}",
        )
        check_config(
            self.backend == "compact" or bool(self.model),
            f"proposer.model is required for backend {self.backend!r} (a hub id, local path or model name)",
        )
        check_config(
            0.0 < self.temperature <= 5.0, f"proposer.temperature must be in (0, 5], got {self.temperature}"
        )
        check_config(0.0 < self.top_p <= 1.0, f"proposer.top_p must be in (0, 1], got {self.top_p}")
        check_config(self.max_new_tokens > 0, "proposer.max_new_tokens must be positive")
        check_config(self.batch_size > 0, "proposer.batch_size must be positive")
        check_config(self.pretrain_steps >= 0, "proposer.pretrain_steps must be >= 0")
        check_config(
            0 <= self.max_retries <= 10, f"proposer.max_retries must be in [0, 10], got {self.max_retries}"
        )
        check_config(0 <= self.examples <= 32, f"proposer.examples must be in [0, 32], got {self.examples}")
        check_config(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"proposer.device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}",
        )
        check_config(
            self.dtype in DTYPES, f"proposer.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        )
        check_config(
            self.base_url is None or self.base_url.startswith(("http://", "https://")),
            f"proposer.base_url must start with http:// or https://, got {self.base_url!r}",
        )
        check_config(self.timeout > 0, "proposer.timeout must be positive")
        check_config(self.concurrency >= 1, "proposer.concurrency must be >= 1")
        check_config(self.tensor_parallel_size >= 1, "proposer.tensor_parallel_size must be >= 1")
        check_config(
            0.05 <= self.gpu_memory_utilization <= 0.95,
            f"proposer.gpu_memory_utilization must be in [0.05, 0.95], got {self.gpu_memory_utilization}",
        )
        check_config(self.max_lora_rank >= 1, "proposer.max_lora_rank must be >= 1")


RENDERER_NAMES = ("procedural", "perlin", "inpaint", "edit", "text2img")
SCHEDULERS = ("ddim", "ddpm", "pndm", "lms", "euler", "euler_ancestral", "dpm_solver", "unipc")
OFFLOAD = ("none", "model", "sequential")


@dataclass
class DiffusionConfig:
    """One diffusion renderer's pipeline and sampling (``render.inpaint``, ``render.edit``, ...)."""

    model: str = help_field("Hub id or local directory of the diffusers pipeline.", default="")
    device: str = help_field(
        "auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps.", default="auto"
    )
    dtype: str = help_field(
        "auto (float16 on cuda, else float32), float32, float16 or bfloat16.", default="auto"
    )
    scheduler: str | None = help_field(
        "Sampler: " + ", ".join(SCHEDULERS) + "; None keeps the pipeline's own.", default=None
    )
    steps: int = help_field("Denoising steps.", default=30)
    guidance_scale: float = help_field("Text guidance (classifier-free) scale.", default=7.5)
    image_guidance_scale: float = help_field(
        "Image guidance scale of instruction editing (how closely the edit keeps the source).", default=1.5
    )
    strength: float = help_field("Inpainting strength: 1 repaints the masked region from noise.", default=1.0)
    resolution: int | None = help_field(
        "Side the pipeline works at (a multiple of 8); None uses the image's side rounded to 8.", default=512
    )
    batch_size: int = help_field("Candidates per pipeline call.", default=8)
    attention_slicing: bool = help_field("Slice attention to save GPU memory (slower).", default=False)
    offload: str = help_field(
        "CPU offload for small GPUs: none, model (whole models) or sequential (submodules).", default="none"
    )
    feather: float = help_field(
        "Width of the blend between render and source, as a share of the image side.", default=0.01
    )
    change_threshold: float = help_field(
        "Grey-level change that counts a pixel as changed when the mask is read from the difference.",
        default=12.0,
    )

    def __post_init__(self) -> None:
        check_config(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}",
        )
        check_config(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_config(
            self.scheduler is None or self.scheduler in SCHEDULERS,
            f"scheduler must be one of {', '.join(SCHEDULERS)} or null, got {self.scheduler!r}",
        )
        check_config(1 <= self.steps <= 1000, f"steps must be in [1, 1000], got {self.steps}")
        check_config(self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}")
        check_config(
            self.image_guidance_scale >= 0,
            f"image_guidance_scale must be >= 0, got {self.image_guidance_scale}",
        )
        check_config(0.0 < self.strength <= 1.0, f"strength must be in (0, 1], got {self.strength}")
        check_config(
            self.resolution is None or (self.resolution % 8 == 0 and 64 <= self.resolution <= 4096),
            f"resolution must be None or a multiple of 8 in [64, 4096], got {self.resolution}",
        )
        check_config(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check_config(
            self.offload in OFFLOAD, f"offload must be one of {', '.join(OFFLOAD)}, got {self.offload!r}"
        )
        check_config(0.0 <= self.feather <= 0.25, f"feather must be in [0, 0.25], got {self.feather}")
        check_config(
            0.0 < self.change_threshold < 255.0,
            f"change_threshold must be in (0, 255), got {self.change_threshold}",
        )


@dataclass
class RenderConfig:
    renderers: list[str] = help_field(
        "Renderers: " + ", ".join(RENDERER_NAMES) + ". Without weights the first renders and the rest are "
        "fallbacks, in order, when it fails.",
        default_factory=lambda: ["procedural"],
    )
    weights: list[float] | None = help_field(
        "Mix: each candidate draws its renderer with these relative weights (one per renderer); the others "
        "remain fallbacks.",
        default=None,
    )
    foreground_masks: dict[str, str] = help_field(
        "Category -> image file of its object's foreground (white = object); overrides the estimate that "
        "places defects of the inpaint and edit renderers.",
        default_factory=dict,
    )
    inpaint: DiffusionConfig = help_field(
        "Diffusion inpainting at the spec's region (StableDiffusion, SDXL or FLUX inpaint pipelines).",
        default_factory=lambda: DiffusionConfig(model="stable-diffusion-v1-5/stable-diffusion-inpainting"),
    )
    edit: DiffusionConfig = help_field(
        "Instruction editing (InstructPix2Pix; MagicBrush checkpoints load the same way).",
        default_factory=lambda: DiffusionConfig(model="timbrooks/instruct-pix2pix", guidance_scale=7.5),
    )
    text2img: DiffusionConfig = help_field(
        "Text-to-image (KKA's renderer): a whole image from the description.",
        default_factory=lambda: DiffusionConfig(model="stable-diffusion-v1-5/stable-diffusion-v1-5"),
    )

    def __post_init__(self) -> None:
        check_config(len(self.renderers) > 0, "render.renderers must name at least one renderer")
        unknown = [name for name in self.renderers if name not in RENDERER_NAMES]
        check_config(
            not unknown,
            f"render.renderers: unknown renderer {unknown[0] if unknown else ''!r} "
            f"(known: {', '.join(RENDERER_NAMES)})",
        )
        check_config(
            len(set(self.renderers)) == len(self.renderers), "render.renderers lists a renderer twice"
        )
        if self.weights is not None:
            check_config(
                len(self.weights) == len(self.renderers),
                f"render.weights needs one weight per renderer "
                f"({len(self.renderers)}), got {len(self.weights)}",
            )
            check_config(
                all(w >= 0 for w in self.weights) and sum(self.weights) > 0,
                "render.weights must be >= 0 with a positive sum",
            )


@dataclass
class FilterConfig:
    match_band: bool = help_field("Reject renders outside the keypoint match-count band.", default=True)
    band_quantiles: tuple[float, float] = help_field(
        "Band edges as quantiles of calibration scores (see synth.filters).", default=(0.02, 0.98)
    )
    locality: bool = help_field("Reject renders that change pixels outside their mask.", default=True)
    locality_min_inside: float = help_field(
        "Least share of the change that must lie inside the mask.", default=0.9
    )
    matcher: str = help_field(
        "Keypoint matcher of the match band: sift (OpenCV) or lightglue (SuperPoint + LightGlue).",
        default="sift",
    )
    matcher_model: str = help_field(
        "Hub id or local directory of the LightGlue matcher.", default="ETH-CVG/lightglue_superpoint"
    )
    matcher_device: str = help_field(
        "Device of the LightGlue matcher: auto, cpu, cuda, cuda:N.", default="auto"
    )
    batch_band: bool = help_field(
        "Also narrow the band to the current batch's own match-score quantiles (band_quantiles), as "
        "arXiv 2512.23227 sets its thresholds from the generated set.",
        default=False,
    )

    def __post_init__(self) -> None:
        low, high = self.band_quantiles
        check_config(
            0.0 <= low < high <= 1.0,
            f"filters.band_quantiles must satisfy 0 <= low < high <= 1, got {low, high}",
        )
        check_config(0.0 < self.locality_min_inside <= 1.0, "filters.locality_min_inside must be in (0, 1]")
        check_config(
            self.matcher in ("sift", "lightglue"),
            f"filters.matcher must be sift or lightglue, got {self.matcher!r}",
        )


EVALUATORS = ("deepsad-cnn", "deepsad-dinov2")
DINOV2_PATCH = 14
"""Patch side of the released DINOv2 backbones; ``evaluator.feature_size`` must be a multiple of it."""


@dataclass
class EvaluatorConfig:
    name: str = help_field(
        "Confusion evaluator: deepsad-cnn (a small CNN trained from scratch) or deepsad-dinov2 (a Deep SAD "
        "head on frozen DINOv2 features).",
        default="deepsad-cnn",
    )
    model: str = help_field(
        "deepsad-dinov2: Hub id or local directory of the DINOv2 backbone.", default="facebook/dinov2-small"
    )
    device: str = help_field(
        "deepsad-dinov2: device of the backbone: auto, cpu, cuda, cuda:N.", default="auto"
    )
    batch_size: int = help_field("deepsad-dinov2: images per backbone forward pass.", default=16)
    feature_size: int = help_field(
        "deepsad-dinov2: side in pixels the backbone sees images at (a multiple of DINOv2's patch size 14).",
        default=224,
    )
    dtype: str = help_field(
        "deepsad-dinov2: backbone dtype: auto (bfloat16 on a CUDA GPU that supports it, else float32), "
        "float32, float16 (not on cpu) or bfloat16; features come out as float32 either way.",
        default="auto",
    )
    eta: float = help_field("Weight of the labelled-anomaly term of Deep SAD.", default=1.0)
    pretrain_epochs: int = help_field("Autoencoder pretraining epochs.", default=20)
    epochs: int = help_field("Deep SAD training epochs.", default=50)
    size: int = help_field(
        "deepsad-cnn: side in pixels the CNN sees images at (a multiple of 4); deepsad-dinov2 uses "
        "feature_size.",
        default=128,
    )
    crop: int | None = help_field(
        "Train on random crops of this side (full resolution at a fraction of the "
        "cost); None trains on whole images.",
        default=64,
    )
    folds: int = help_field("Cross-fitting folds: no candidate is scored by a model that saw it.", default=2)
    hard_quantile: float = help_field(
        "A kept candidate is hard when it scores below this quantile of held-out normal scores.", default=0.95
    )

    def __post_init__(self) -> None:
        check_config(
            self.name in EVALUATORS,
            f"evaluator.name must be one of {', '.join(EVALUATORS)}, got {self.name!r}",
        )
        check_config(
            self.device in DEVICES or self.device.startswith("cuda:"),
            f"evaluator.device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}",
        )
        check_config(self.batch_size >= 1, f"evaluator.batch_size must be >= 1, got {self.batch_size}")
        check_config(
            self.feature_size >= DINOV2_PATCH and self.feature_size % DINOV2_PATCH == 0,
            f"evaluator.feature_size must be a positive multiple of {DINOV2_PATCH} (DINOv2's patch size), "
            f"got {self.feature_size}",
        )
        check_config(
            self.dtype in DTYPES, f"evaluator.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
        )
        check_config(self.eta > 0, "evaluator.eta must be positive")
        check_config(
            self.size % 4 == 0 and self.size >= 16,
            f"evaluator.size must be a multiple of 4 >= 16, got {self.size}",
        )
        check_config(
            self.crop is None or (self.crop % 4 == 0 and 16 <= self.crop <= self.size),
            f"evaluator.crop must be None or a multiple of 4 in [16, evaluator.size], got {self.crop}",
        )
        check_config(self.folds >= 2, "evaluator.folds must be >= 2")
        check_config(0.5 <= self.hard_quantile < 1.0, "evaluator.hard_quantile must be in [0.5, 1)")


def _default_dpo() -> dict[str, Any]:
    return {
        "learning_rate": 5e-4,
        "beta": 0.1,
        "num_train_epochs": 4,
        "per_device_train_batch_size": 16,
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 1.0],
    }


def _default_lora() -> dict[str, Any]:
    return {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class AlignmentConfig:
    enabled: bool = help_field("Run DPO after each iteration (off gives the no-DPO control).", default=True)
    pairs_per_prompt: int = help_field("Hardest x easiest pairs taken per prompt.", default=16)
    max_pairs: int = help_field("Cap on preference pairs per round.", default=128)
    dpo: dict[str, Any] = help_field("Keyword arguments for trl.DPOConfig.", default_factory=_default_dpo)
    lora: dict[str, Any] = help_field("Keyword arguments for peft.LoraConfig.", default_factory=_default_lora)
    processes: int = help_field(
        "0 trains DPO in the run's own process; N >= 1 runs it in N workers with `accelerate launch` (one "
        "per GPU; TRL shards the batches).",
        default=0,
    )

    def __post_init__(self) -> None:
        check_config(
            0 <= self.processes <= 1024, f"alignment.processes must be in [0, 1024], got {self.processes}"
        )
        check_config(self.pairs_per_prompt > 0, "alignment.pairs_per_prompt must be positive")
        check_config(self.max_pairs > 0, "alignment.max_pairs must be positive")


@dataclass
class EvalConfig:
    detectors: list[str] = help_field(
        "Detectors to train and test (see kka_synth.detectors).", default_factory=lambda: ["draem"]
    )
    variants: list[str] = help_field(
        "Synthetic-set variants: none, rule, kka, two-stage, reverse.", default_factory=lambda: list(VARIANTS)
    )
    seeds: int = help_field("Seeds per detector and variant; tables show mean and std over them.", default=1)
    image_size: int | None = help_field(
        "Side detectors work at (None: the run's data.image_size).", default=None
    )
    rule_share: float = help_field(
        "Share of training steps on rule-based anomalies in two-stage and reverse (the rest is the kka set).",
        default=0.5,
    )
    overlays: int = help_field(
        "Test images per category shown with their anomaly maps in the report.", default=4
    )
    options: dict[str, dict[str, Any]] = help_field(
        "Per-detector config overrides, e.g. {draem: {steps: 400}}.", default_factory=dict
    )

    def __post_init__(self) -> None:
        check_config(bool(self.detectors), "eval.detectors must name at least one detector")
        check_config(bool(self.variants), "eval.variants must name at least one variant")
        unknown = [v for v in self.variants if v not in VARIANTS]
        check_config(
            not unknown,
            f"unknown eval variant {unknown[0] if unknown else ''!r} (known: {', '.join(VARIANTS)})",
        )
        check_config(len(set(self.variants)) == len(self.variants), "eval.variants lists a variant twice")
        check_config(1 <= self.seeds <= 100, f"eval.seeds must be in [1, 100], got {self.seeds}")
        check_config(
            self.image_size is None or 16 <= self.image_size <= 4096,
            f"eval.image_size must be in [16, 4096], got {self.image_size}",
        )
        check_config(0.0 < self.rule_share < 1.0, f"eval.rule_share must be in (0, 1), got {self.rule_share}")
        check_config(0 <= self.overlays <= 64, f"eval.overlays must be in [0, 64], got {self.overlays}")
        check_config(isinstance(self.options, dict), "eval.options must map detector names to mappings")


@dataclass
class RunConfig:
    name: str = help_field("Run name; the run directory is OUT/NAME.", default="demo")
    out: str = help_field("Folder that holds run directories.", default="runs")
    profile: str = help_field("offline (CPU, no downloads) or hub (pretrained weights).", default="offline")
    iterations: int = help_field("KKA iterations.", default=3)
    proposals_per_iteration: int = help_field("Proposals sampled per category per iteration.", default=64)
    mode: str = help_field(
        "Curation: add = union of hard sets, rep = the latest hard set (KKA).", default="add"
    )
    seed: int = help_field("Seed of every random choice in the run.", default=0)
    prompts: str | None = help_field(
        "Prompt set saved by `kka-synth chat` (constraints and approved examples per category).", default=None
    )
    data: DataConfig = field(default_factory=DataConfig)
    proposer: ProposerConfig = field(default_factory=ProposerConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        check_config(
            self.profile in PROFILES, f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}"
        )
        check_config(self.mode in MODES, f"mode must be add or rep, got {self.mode!r}")
        check_config(1 <= self.iterations <= 100, f"iterations must be in [1, 100], got {self.iterations}")
        check_config(
            self.proposals_per_iteration >= 2,
            f"proposals_per_iteration must be >= 2, got {self.proposals_per_iteration}",
        )
        check_config(
            bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
            f"name must be a plain folder name, got {self.name!r}",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, "")

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config fields")
        return cls.from_dict(data)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build a config dataclass from a plain dict, refusing unknown keys and recursing into sections."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]} (known: {', '.join(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = (
            fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        )
        sample = default() if default is not None else None
        if dataclasses.is_dataclass(sample):
            if not isinstance(value, dict):
                raise ConfigError(f"config field {prefix}{name} must be a mapping")
            kwargs[name] = _build(type(sample), {**dataclasses.asdict(sample), **value}, f"{prefix}{name}.")
        elif isinstance(sample, dict) and isinstance(value, dict):
            kwargs[name] = {**sample, **value}
        elif name == "band_quantiles" and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"bad config section {prefix or 'run'}: {error}") from None
    except ConfigError as error:
        if prefix and not str(error).startswith(prefix.split(".")[0]):
            raise ConfigError(f"{prefix}{error}") from None
        raise


def profile_defaults(profile: str) -> dict[str, Any]:
    """Field overrides a profile brings, applied before the config file and the CLI flags."""
    if profile == "offline":
        return {}
    if profile == "hub":
        return {
            "data": {"image_size": 512},
            "proposer": {
                "backend": "transformers",
                "model": "Qwen/Qwen2.5-1.5B-Instruct",
                "constrained": False,
                "max_new_tokens": 256,
                "batch_size": 16,
                "temperature": 0.9,
            },
            # LoRA on the LLM's attention and MLP projections, at a learning rate for billion-sized models
            "alignment": {
                "dpo": {"learning_rate": 5e-5, "per_device_train_batch_size": 4, "num_train_epochs": 2},
                "lora": {
                    "target_modules": [
                        "q_proj",
                        "k_proj",
                        "v_proj",
                        "o_proj",
                        "gate_proj",
                        "up_proj",
                        "down_proj",
                    ]
                },
            },
            "render": {"renderers": ["inpaint"]},
            "filters": {"matcher": "lightglue"},
            "evaluator": {"name": "deepsad-dinov2"},
        }
    raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")

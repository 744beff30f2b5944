"""The VFM detector's modules: a DINOv2 backbone with LoRA, the anomaly head, and normal-patch statistics.

- Backbone: DINOv2 (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR
  2024), with or without registers (Darcet et al., "Vision Transformers Need Registers", ICLR 2024), through
  ``transformers``. Patch tokens of the chosen layers pass through the model's final layer norm, as
  DINOv2's own ``get_intermediate_layers(norm=True)`` does.
- Adaptation: LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) through
  ``peft`` on the attention projections. LoRA's B matrices start at zero, so before training the adapted
  model is the pretrained one.
- Statistics: one Gaussian per layer over all normal patches, scored by Mahalanobis distance (Rippel et al.,
  "Modeling the Distribution of Normal Data in Pre-Trained Deep Features for Anomaly Detection", ICPR 2020,
  applied to patches as in PaDiM, Defard et al., 2021, but with one covariance per layer rather than per
  position). The covariance is shrunk towards a scaled identity with the Ledoit-Wolf coefficient (Ledoit
  and Wolf, "A well-conditioned estimator for large-dimensional covariance matrices", 2004), computed from
  streamed moments so that no feature is kept.
- Patch memory: the k-nearest-neighbour cosine distance to a random subset of normal patches, as in
  PatchCore (Roth et al., CVPR 2022) and AnomalyDINO (Damm et al., WACV 2025).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

RANDOM_ARCHS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3, "patch_size": 8},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "patch_size": 14},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14},
}
"""Shapes of the randomly initialised backbones: ``small``, ``base`` and ``large`` match dinov2-small, -base
and -large; ``tiny`` is a CPU-sized model for the offline profile."""

DINOV2_TYPES = ("dinov2", "dinov2_with_registers")
"""``model_type`` values of the configs the backbone accepts."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def random_dinov2(arch: str, seed: int) -> nn.Module:
    """A ``Dinov2Model`` of one of :data:`RANDOM_ARCHS`, weights drawn from ``seed`` (global RNG kept)."""
    from transformers import Dinov2Config, Dinov2Model

    if arch not in RANDOM_ARCHS:
        raise ValueError(f"unknown random architecture {arch!r} (known: {', '.join(RANDOM_ARCHS)})")
    shape = RANDOM_ARCHS[arch]
    config = Dinov2Config(**shape, intermediate_size=4 * shape["hidden_size"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Dinov2Model(config)


def load_dinov2(
    name_or_path: str, trust_remote_code: bool = False, use_safetensors: bool = True
) -> nn.Module:
    """``Dinov2Model`` or ``Dinov2WithRegistersModel`` from a Hub id or local directory, by its config.

    Call it through :func:`kka_synth.utils.hub.load_pretrained`, which reads the two policy arguments from
    this signature: a local folder with only pickle weights is then refused before anything is read, and
    ``trust_remote_code`` is what the user allowed. Both are passed on to transformers as given.
    """
    from transformers import AutoConfig, Dinov2Model, Dinov2WithRegistersModel

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type not in DINOV2_TYPES:
        raise ValueError(
            f"model_type {config.model_type!r} is not a DINOv2 model ({', '.join(DINOV2_TYPES)})"
        )
    cls = Dinov2Model if config.model_type == "dinov2" else Dinov2WithRegistersModel
    return cls.from_pretrained(
        name_or_path, config=config, trust_remote_code=trust_remote_code, use_safetensors=use_safetensors
    )


class Backbone(nn.Module):
    """A frozen DINOv2 model, optionally with LoRA adapters: (B, 3, H, W) in [0, 1] -> patch tokens per layer.

    H and W must be multiples of ``patch_size``. Only the LoRA parameters (when added) require gradients.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.model = model.eval()
        config = model.config
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # CLS + registers
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.has_lora = False

    def add_lora(self, rank: int, alpha: float, targets: list[str], dropout: float, seed: int) -> None:
        """Wrap the model with PEFT LoRA on the modules named ``targets``; A is drawn from ``seed``."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout)
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            torch.manual_seed(seed)
            try:
                self.model = get_peft_model(self.model, config)
            except ValueError as error:
                raise ValueError(f"LoRA targets {targets} do not fit the backbone: {error}") from None
        self.model.eval()
        self.has_lora = True

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The LoRA weights only (empty without LoRA)."""
        if not self.has_lora:
            return {}
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.model))

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"saved LoRA weights do not fit the backbone: {unexpected[0]} is unexpected")

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        """Run the pretrained (unadapted) model inside the block."""
        if not self.has_lora:
            yield
            return
        with self.model.disable_adapter():
            yield

    def _final_norm(self) -> nn.Module:
        base = self.model.get_base_model() if self.has_lora else self.model
        return base.layernorm

    def resolve(self, layers: list[int]) -> list[int]:
        """Hidden-state indices (1 = first block, -1 = last) as sorted unique positive indices."""
        resolved = []
        for layer in layers:
            index = layer if layer > 0 else self.num_layers + 1 + layer
            if not 1 <= index <= self.num_layers:
                raise ValueError(f"layer {layer} is outside the backbone's {self.num_layers} blocks")
            resolved.append(index)
        return sorted(set(resolved))

    def forward(self, images: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """(B, 3, H, W) in [0, 1] -> [(B, h * w, D)] normed patch tokens of each hidden-state index in
        ``layers`` (positive, from :meth:`resolve`), with h = H / patch and w = W / patch."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image sides {(height, width)} must be multiples of the patch {self.patch_size}"
            )
        x = (images - self.mean) / self.std
        hidden = self.model(pixel_values=x, output_hidden_states=True).hidden_states  # L + 1 x (B, T, D)
        norm = self._final_norm()
        return [norm(hidden[index][:, self.prefix_tokens :]) for index in layers]


class AnomalyHead(nn.Module):
    """(..., D) patch tokens -> (...) anomaly logits: an MLP with GELU between its linear layers."""

    def __init__(self, in_dim: int, widths: list[int]):
        super().__init__()
        dims = [in_dim, *widths]
        layers: list[nn.Module] = []
        for cin, cout in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(cin, cout), nn.GELU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens).squeeze(-1)


class MomentAccumulator:
    """Streamed moments of (M, D) feature rows, enough for the mean, covariance and Ledoit-Wolf shrinkage.

    Sums are float64: ``n``, sum x, sum x x^T, sum |x|^4 and sum |x|^2 x.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        options = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.sum = torch.zeros(dim, **options)
        self.outer = torch.zeros(dim, dim, **options)
        self.fourth = torch.zeros((), **options)
        self.weighted = torch.zeros(dim, **options)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64).reshape(-1, self.sum.shape[0])  # (M, D)
        squared = (x * x).sum(dim=1)  # (M,)
        self.n += x.shape[0]
        self.sum += x.sum(dim=0)
        self.outer += x.T @ x
        self.fourth += (squared * squared).sum()
        self.weighted += squared @ x

    def gaussian(self, shrinkage: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(mean (D,), shrunk covariance (D, D), shrinkage used), float64.

        The covariance is the maximum-likelihood one (divided by n), shrunk as ``(1 - s) S + s mu I`` with
        ``mu = tr(S) / D``; ``shrinkage=None`` takes the Ledoit-Wolf ``s``.
        """
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.n}")
        n, dim = self.n, self.sum.shape[0]
        mean = self.sum / n
        cov = self.outer / n - torch.outer(mean, mean)
        mu = torch.trace(cov) / dim
        if shrinkage is None:
            c = mean @ mean
            # sum_i |x_i - mean|^4, expanded in the streamed sums
            fourth = (
                self.fourth
                + 4 * mean @ self.outer @ mean
                - 4 * mean @ self.weighted
                + 2 * c * torch.trace(self.outer)
                - 3 * n * c * c
            )
            frobenius = (cov * cov).sum()
            delta = (frobenius - 2 * mu * torch.trace(cov) + dim * mu * mu) / dim
            beta = ((fourth / n - frobenius) / (dim * n)).clamp_min(0.0)
            shrinkage = 0.0 if delta <= 0 else float(torch.minimum(beta, delta) / delta)
        identity = torch.eye(dim, dtype=cov.dtype, device=cov.device)
        return mean, (1.0 - shrinkage) * cov + shrinkage * mu * identity, float(shrinkage)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(..., D) features -> (...) squared Mahalanobis distances ``(x - m)^T P (x - m)``."""
    centred = x.float() - mean
    return ((centred @ precision) * centred).sum(dim=-1).clamp_min(0.0)


def knn_distance(x: torch.Tensor, memory: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """(..., D) features -> (...) mean cosine distance to their ``k`` nearest rows of ``memory`` (M, D).

    ``memory`` rows must be L2-normalised.
    """
    flat = F.normalize(x.float().reshape(-1, x.shape[-1]), dim=-1)  # (Q, D)
    out = []
    for start in range(0, flat.shape[0], chunk):
        similarity = flat[start : start + chunk] @ memory.T  # (q, M)
        top = similarity.topk(min(k, memory.shape[0]), dim=1).values  # (q, k)
        out.append((1.0 - top).mean(dim=1))
    return torch.cat(out).reshape(x.shape[:-1])


def memory_indices(total: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``min(size, total)`` patches drawn without replacement for the k-NN memory."""
    if size >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, size=size, replace=False))


class PatchDistance:
    """Distance of patch tokens to the normal patches, averaged over the scoring blocks.

    ``mahalanobis``: per block ``sqrt(d^2 / D)``, the squared Mahalanobis distance to the block's Gaussian
    divided by the dimension (about 1 for a typical normal patch); ``knn``: the mean cosine distance to the
    ``knn_k`` nearest rows of a random memory of normal patches. ``tensors`` holds what :meth:`fit` learned
    (``mean.<block>`` and ``precision.<block>``, or ``memory.<block>``).
    """

    def __init__(self, scorer: str, layers: list[int], knn_k: int = 1):
        self.scorer, self.layers, self.knn_k = scorer, list(layers), knn_k
        self.tensors: dict[str, torch.Tensor] = {}
        self.shrinkage: list[float] = []

    def fit(
        self,
        batches: Iterable[dict[int, torch.Tensor]],
        total: int,
        shrinkage: float | None = None,
        memory_size: int = 16384,
        rng: np.random.Generator | None = None,
    ) -> None:
        """Learn from ``batches`` of block -> (B, N, D) normal tokens, ``total`` patches (B * N) in all.

        Only moments (D x D per block) or the chosen memory rows are kept, never a batch.
        """
        self.tensors, self.shrinkage = {}, []
        if self.scorer == "mahalanobis":
            moments: dict[int, MomentAccumulator] = {}
            for tokens in batches:
                for block in self.layers:
                    x = tokens[block]
                    moments.setdefault(block, MomentAccumulator(x.shape[-1], x.device)).update(x)
            for block, accumulator in moments.items():
                mean, cov, used = accumulator.gaussian(shrinkage)
                factor, info = torch.linalg.cholesky_ex(cov)
                if int(info) != 0:
                    raise ValueError(
                        f"the covariance of block {block} is singular: set vfm.shrinkage above 0"
                    )
                self.tensors[f"mean.{block}"] = mean.float()
                self.tensors[f"precision.{block}"] = torch.cholesky_inverse(factor).float()
                self.shrinkage.append(used)
            return
        chosen = memory_indices(total, memory_size, rng or np.random.default_rng(0))
        rows: dict[int, list[torch.Tensor]] = {block: [] for block in self.layers}
        offset = 0
        for tokens in batches:
            first = tokens[self.layers[0]]
            count = first.shape[0] * first.shape[1]
            local = torch.from_numpy(chosen[(chosen >= offset) & (chosen < offset + count)] - offset)
            for block in self.layers:
                flat = tokens[block].reshape(count, -1)  # (B * N, D)
                rows[block].append(F.normalize(flat[local.to(flat.device)], dim=-1))
            offset += count
        for block in self.layers:
            self.tensors[f"memory.{block}"] = torch.cat(rows[block])

    def __call__(self, tokens: dict[int, torch.Tensor]) -> torch.Tensor:
        """Block -> (B, N, D) tokens to (B, N) distances."""
        parts = []
        for block in self.layers:
            if self.scorer == "mahalanobis":
                mean, precision = self.tensors[f"mean.{block}"], self.tensors[f"precision.{block}"]
                parts.append((mahalanobis(tokens[block], mean, precision) / mean.shape[0]).sqrt())
            else:
                parts.append(knn_distance(tokens[block], self.tensors[f"memory.{block}"], self.knn_k))
        return torch.stack(parts).mean(dim=0)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, 1, H, W) -> same shape, separable Gaussian of ``sigma`` pixels with reflected borders."""
    if sigma <= 0:
        return maps
    radius = min(int(math.ceil(3 * sigma)), min(maps.shape[-2:]) - 1)
    if radius < 1:
        return maps
    coords = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


__all__ = [
    "RANDOM_ARCHS",
    "AnomalyHead",
    "Backbone",
    "MomentAccumulator",
    "PatchDistance",
    "gaussian_blur",
    "knn_distance",
    "load_dinov2",
    "mahalanobis",
    "memory_indices",
    "random_dinov2",
]

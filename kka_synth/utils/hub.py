"""Loading pretrained weights by Hub id or local directory: safely, and with one clear error when it fails.

Every ``from_pretrained`` of the hub profile goes through :func:`load_pretrained`, so a missing model reads
the same everywhere: one line naming what was asked for, the config field that names it, and the offline
profile that needs no weights. It also applies the loading policy:

- **Weights are safetensors only.** Pickle checkpoints (``pytorch_model.bin``, ``*.pt``, ``*.ckpt``) can run
  code when loaded. Loaders of weights get ``use_safetensors=True``, and a local folder whose weights are
  only pickles is refused before anything is read.
- **No remote code.** Loaders get ``trust_remote_code=False``, unless the environment variable
  ``KKA_SYNTH_TRUST_REMOTE_CODE`` is ``1`` (the CLI's ``--trust-remote-code`` sets it, so it reaches
  ``accelerate`` workers too). A model that needs its own code then fails with one line naming the flag.

A loader gets these arguments when its signature names them, or when it is the ``from_pretrained`` of a
transformers or diffusers class (whose signatures hide them in ``**kwargs``); ``use_safetensors`` only goes
to classes that load weights (models and pipelines, not tokenizers, processors or configs). A loader of the
project's own (:func:`kka_synth.detectors.vfm.model.load_dinov2`, the vLLM engine) names both in its
signature and passes them on, so it gets the same checks.

PEFT adapters follow the same rule through :func:`load_adapter` (or :func:`check_adapter_dir` where another
engine, such as vLLM, reads the folder): an adapter saved only as ``adapter_model.bin`` is refused before
anything reads it. PEFT itself loads ``adapter_model.safetensors`` whenever it is present.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRUST_REMOTE_CODE_ENV = "KKA_SYNTH_TRUST_REMOTE_CODE"
"""Set to ``1`` to let models run the Python code that ships with them (``--trust-remote-code``)."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
"""File endings of pickle-based checkpoints, which are never loaded."""

_LIBRARIES = ("transformers", "diffusers")
_WEIGHT_CLASSES = ("PreTrainedModel", "_BaseAutoModelClass", "ModelMixin", "DiffusionPipeline")
"""Base classes (by name, so nothing heavy is imported here) whose ``from_pretrained`` loads weights."""
_POLICY = ("trust_remote_code", "use_safetensors")

ADAPTER_CONFIG = "adapter_config.json"
MODEL_NAME_ATTR = "kka_synth_model_name"
"""Attribute of a loaded model that names it for the adapters trained on it, where its ``name_or_path`` is a
local folder of this machine (the compact proposer's cache). ``name_or_path`` itself stays the folder: PEFT
reads the base model's config from it when it saves an adapter."""
ADAPTER_WEIGHT_STEMS = ("adapter_model", "new_embeddings")
"""Names (without ending) of the weight files in a PEFT adapter folder that PEFT or vLLM read."""


class ModelLoadError(RuntimeError):
    """Pretrained weights could not be loaded; the message is one line that says what to do."""


class AdapterError(ValueError):
    """A LoRA adapter cannot be loaded or applied as asked; the message is one line."""


def trust_remote_code() -> bool:
    """Whether the user allowed models to run their own code (``KKA_SYNTH_TRUST_REMOTE_CODE=1``)."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip() == "1"


def _library_class(loader: Callable[..., Any]) -> type | None:
    """The transformers or diffusers class whose ``from_pretrained`` ``loader`` is, else None."""
    owner = getattr(loader, "__self__", None)
    if not isinstance(owner, type) or getattr(loader, "__name__", "") != "from_pretrained":
        return None
    return owner if owner.__module__.split(".")[0] in _LIBRARIES else None


def _parameters(loader: Callable[..., Any]) -> set[str]:
    try:
        return set(inspect.signature(loader).parameters)
    except (TypeError, ValueError):
        return set()


def policy_kwargs(loader: Callable[..., Any]) -> dict[str, bool]:
    """The safety arguments ``loader`` takes: ``trust_remote_code`` and, for weights, ``use_safetensors``."""
    owner, named = _library_class(loader), _parameters(loader)
    kwargs: dict[str, bool] = {}
    if owner is not None or "trust_remote_code" in named:
        kwargs["trust_remote_code"] = trust_remote_code()
    loads_weights = owner is not None and (
        any(base.__name__ in _WEIGHT_CLASSES for base in owner.__mro__)
        or owner.__name__.startswith("AutoPipeline")
    )
    if loads_weights or "use_safetensors" in named:
        kwargs["use_safetensors"] = True
    return kwargs


def pickle_only_weights(folder: Path) -> Path | None:
    """A pickle checkpoint in ``folder`` (or, for a diffusers pipeline, in a component's subfolder such as
    ``unet/``) that has no ``.safetensors`` file beside it, else None."""
    places = [folder]
    if (folder / "model_index.json").is_file():
        places += sorted(p for p in folder.iterdir() if p.is_dir())
    for place in places:
        files = [p for p in place.iterdir() if p.is_file()]
        pickles = sorted(p for p in files if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles and not any(p.suffix == ".safetensors" for p in files):
            return pickles[0]
    return None


def load_pretrained(loader: Callable[..., T], name_or_path: str, what: str, field: str, **kwargs: Any) -> T:
    """Call ``loader(name_or_path, **kwargs)`` (a ``from_pretrained``) under the module's loading policy,
    and turn a failure into ModelLoadError.

    ``what`` names the model in words ("the inpainting pipeline"); ``field`` is the config field that holds
    ``name_or_path`` ("render.inpaint.model"). The policy's own arguments (``trust_remote_code``,
    ``use_safetensors``) are set here and may not be passed.
    """
    given = [key for key in _POLICY if key in kwargs]
    if given:
        raise TypeError(f"load_pretrained sets {', '.join(given)} itself (see kka_synth.utils.hub)")
    if not name_or_path:
        raise ModelLoadError(f"{field} is empty: give a Hub id or a local directory for {what}")
    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{field} {name_or_path!r} is a file; {what} needs a model directory")
    policy = policy_kwargs(loader)
    if policy.get("use_safetensors") and local.is_dir():
        pickled = pickle_only_weights(local)
        if pickled is not None:
            raise ModelLoadError(
                f"{what} in {name_or_path!r} has only pickle weights ({pickled.relative_to(local)}); "
                "kka-synth loads safetensors only, because pickle files can run code: convert them "
                f"(load and save_pretrained with a recent transformers or diffusers) or set {field} to "
                "another model"
            )
    try:
        return loader(str(local) if local.is_dir() else name_or_path, **policy, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        logger.debug("loading %s from %s failed", what, name_or_path, exc_info=True)
        if "trust_remote_code" in str(error) and not policy.get("trust_remote_code", True):
            raise ModelLoadError(
                f"{what} {name_or_path!r} ships its own Python code, which kka-synth does not run by "
                f"default; rerun with --trust-remote-code (or {TRUST_REMOTE_CODE_ENV}=1) if you trust it, "
                f"or set {field} to another model"
            ) from None
        if policy.get("use_safetensors") and "safetensors" in first:
            raise ModelLoadError(
                f"cannot load {what} from {name_or_path!r}: safetensors weights are required and none were "
                f"found ({first[:160]}); set {field} to a model published as safetensors"
            ) from None
        where = (
            "local directory" if local.is_dir() else "Hub id (not found locally, and the Hub is unreachable?)"
        )
        raise ModelLoadError(
            f"cannot load {what} from {where} {name_or_path!r} ({first[:160]}); set {field} to a local "
            "directory with the weights, or run with --profile offline"
        ) from None


def check_adapter_dir(path: str | Path) -> Path:
    """``path`` as a Path when it is a folder holding a PEFT adapter that may be loaded, else AdapterError.

    Refused, in one line and before any file is read: a folder without ``adapter_config.json``, and one whose
    weights are only pickles (``adapter_model.bin`` without ``adapter_model.safetensors``; the same for
    ``new_embeddings``, which vLLM reads).
    """
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"no LoRA adapter at {path} ({ADAPTER_CONFIG} missing)")
    for stem in ADAPTER_WEIGHT_STEMS:
        if (path / f"{stem}.safetensors").is_file():
            continue
        pickles = sorted(p.name for p in path.glob(f"{stem}.*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(
                f"the LoRA adapter at {path} has only pickle weights ({pickles[0]}); kka-synth loads "
                "safetensors only, because pickle files can run code: save the adapter again with a recent "
                "peft (save_pretrained writes adapter_model.safetensors)"
            )
    return path


def load_adapter(model: Any, path: str | Path, **kwargs: Any) -> Any:
    """``peft.PeftModel.from_pretrained(model, path, **kwargs)`` after :func:`check_adapter_dir`.

    The one place the package loads a PEFT adapter, so the safetensors-only rule holds for every backend.
    ``kwargs`` go to PEFT (``is_trainable=True``, say).
    """
    path = check_adapter_dir(path)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), **kwargs)

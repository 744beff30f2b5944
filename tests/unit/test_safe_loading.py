"""The loading policy of kka_synth.utils.hub: safetensors only, no remote code unless asked, no pickle.

Tiny models are built from configs in the test; nothing is downloaded (HF_HUB_OFFLINE is set in conftest).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from kka_synth.utils.hub import (
    TRUST_REMOTE_CODE_ENV,
    ModelLoadError,
    load_pretrained,
    pickle_only_weights,
    policy_kwargs,
    trust_remote_code,
)

PACKAGE = Path(__file__).resolve().parents[2] / "kka_synth"


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=40,
    )
    return LlamaForCausalLM(config)


class _Trap:
    """Unpickling this makes a folder: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def safe_model(tmp_path: Path) -> Path:
    folder = tmp_path / "safe"
    _tiny_llama().save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture
def pickle_model(tmp_path: Path) -> Path:
    """A model folder as ``save_pretrained(safe_serialization=False)`` wrote it: config + pytorch_model.bin.

    The .bin file is a pickle that would create ``tmp_path / "pwned"`` when loaded.
    """
    folder = tmp_path / "pickled"
    model = _tiny_llama()
    model.config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"state": model.state_dict(), "trap": _Trap(tmp_path / "pwned")}, handle)
    return folder


def test_safetensors_model_loads(safe_model: Path):
    model = load_pretrained(
        AutoModelForCausalLM.from_pretrained, str(safe_model), "the test model", "x.model"
    )
    reference = _tiny_llama().state_dict()
    loaded = model.state_dict()
    assert list(loaded) == list(reference)
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


@pytest.mark.parametrize("loader", [AutoModelForCausalLM.from_pretrained, LlamaForCausalLM.from_pretrained])
def test_pickle_weights_are_refused_unread(pickle_model: Path, loader):
    with pytest.raises(ModelLoadError) as raised:
        load_pretrained(loader, str(pickle_model), "the test model", "proposer.model")
    message = str(raised.value)
    assert "\n" not in message and "safetensors only" in message and "pytorch_model.bin" in message
    assert "proposer.model" in message
    assert not (pickle_model.parent / "pwned").exists()


def test_the_library_refusal_reads_the_same(pickle_model: Path, monkeypatch: pytest.MonkeyPatch):
    """Without the folder check (a Hub id), use_safetensors=True makes transformers refuse, and we say so."""
    monkeypatch.setattr("kka_synth.utils.hub.pickle_only_weights", lambda folder: None)
    with pytest.raises(ModelLoadError, match="safetensors weights are required") as raised:
        load_pretrained(AutoModelForCausalLM.from_pretrained, str(pickle_model), "the test model", "m")
    assert "\n" not in str(raised.value)
    assert not (pickle_model.parent / "pwned").exists()


def test_pickle_only_weights_looks_at_pipeline_components(tmp_path: Path):
    pipeline = tmp_path / "pipe"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "vae").mkdir()
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (pipeline / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert pickle_only_weights(pipeline) == pipeline / "unet" / "diffusion_pytorch_model.bin"
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    assert pickle_only_weights(pipeline) is None
    model = tmp_path / "model"
    (model / "checkpoint-10").mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"")
    (model / "training_args.bin").write_bytes(b"")
    (model / "checkpoint-10" / "pytorch_model.bin").write_bytes(b"")
    assert pickle_only_weights(model) is None  # safetensors beside it; subfolders only for pipelines


def test_diffusion_pipeline_with_pickle_unet_is_refused(tmp_path: Path):
    pytest.importorskip("diffusers")
    import diffusers
    from safetensors.torch import load_file
    from tiny_diffusion import save_tiny_pipeline

    folder = save_tiny_pipeline("inpaint", tmp_path / "inpaint")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(unet.diffusion_pytorch_model.bin\)"):
        load_pretrained(
            diffusers.AutoPipelineForInpainting.from_pretrained, str(folder), "the pipeline", "render.model"
        )


def test_policy_arguments_by_loader(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    both = {"trust_remote_code": False, "use_safetensors": True}
    assert policy_kwargs(AutoModelForCausalLM.from_pretrained) == both
    assert policy_kwargs(LlamaForCausalLM.from_pretrained) == both
    assert policy_kwargs(AutoTokenizer.from_pretrained) == {"trust_remote_code": False}
    assert policy_kwargs(AutoConfig.from_pretrained) == {"trust_remote_code": False}

    def plain(path: str) -> str:
        return path

    def explicit(path: str, trust_remote_code: bool = True, use_safetensors: bool = False) -> str:
        return path

    assert policy_kwargs(plain) == {}
    assert policy_kwargs(explicit) == both
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    assert trust_remote_code() and policy_kwargs(explicit)["trust_remote_code"] is True
    for value in ("0", "true", "", "yes"):
        monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, value)
        assert not trust_remote_code()


def test_diffusers_loaders_get_the_policy():
    diffusers = pytest.importorskip("diffusers")
    for cls in (
        diffusers.AutoPipelineForInpainting,
        diffusers.StableDiffusionPipeline,
        diffusers.UNet2DModel,
    ):
        assert policy_kwargs(cls.from_pretrained) == {"trust_remote_code": False, "use_safetensors": True}
    assert policy_kwargs(diffusers.DiffusionPipeline.load_config) == {}


def test_load_pretrained_passes_the_policy_and_refuses_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    seen = {}

    def loader(path: str, trust_remote_code: bool = True, use_safetensors: bool = False, **kwargs) -> str:
        seen.update(trust_remote_code=trust_remote_code, use_safetensors=use_safetensors, **kwargs)
        return path

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    assert load_pretrained(loader, "org/name", "m", "f", dtype="x") == "org/name"
    assert seen == {"trust_remote_code": False, "use_safetensors": True, "dtype": "x"}
    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "1")
    load_pretrained(loader, "org/name", "m", "f")
    assert seen["trust_remote_code"] is True
    for key in ("trust_remote_code", "use_safetensors"):
        with pytest.raises(TypeError, match=key):
            load_pretrained(loader, "org/name", "m", "f", **{key: True})


@pytest.fixture
def remote_code_model(safe_model: Path, tmp_path: Path) -> Path:
    """A model folder whose config asks for its own Python code (``auto_map``), which would make a folder."""
    folder = tmp_path / "remote"
    folder.mkdir()
    config = json.loads((safe_model / "config.json").read_text())
    config["model_type"] = "kkatrap"
    config["auto_map"] = {"AutoConfig": "configuration_kkatrap.TrapConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_kkatrap.py").write_text(
        f"import os\nos.mkdir({str(tmp_path / 'pwned')!r})\n"
        "from transformers import LlamaConfig\n\nclass TrapConfig(LlamaConfig):\n    model_type = 'kkatrap'\n"
    )
    return folder


@pytest.mark.parametrize("loader", [AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_remote_code_is_refused_with_the_flag_named(
    remote_code_model: Path, monkeypatch: pytest.MonkeyPatch, loader
):
    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    with pytest.raises(ModelLoadError) as raised:
        load_pretrained(loader, str(remote_code_model), "the chat model", "proposer.model")
    message = str(raised.value)
    assert "\n" not in message and "--trust-remote-code" in message and "proposer.model" in message
    assert not (remote_code_model.parent / "pwned").exists()


# -------------------------------------------------------------------------------------------- the audit
def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "not a constant"
    return "absent"


def test_the_package_never_unpickles():
    """No pickle, joblib or dill; torch.load only with weights_only=True; np.load never with allow_pickle;
    no literal trust_remote_code=True; yaml only through safe_load."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                bad = [
                    n
                    for n in names
                    if n and n.split(".")[0] in ("pickle", "cPickle", "joblib", "dill", "cloudpickle")
                ]
                problems += [f"{where}:{node.lineno} imports {n}" for n in bad]
        for call in _calls(tree):
            func = ast.unparse(call.func)
            line = f"{where}:{call.lineno} {func}"
            if func == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{line} without weights_only=True")
            if func in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (False, "absent"):
                problems.append(f"{line} with allow_pickle")
            if func.endswith("read_pickle") or func in ("torch.hub.load", "yaml.load", "yaml.unsafe_load"):
                problems.append(line)
            if _keyword(call, "trust_remote_code") is True:
                problems.append(f"{line} with trust_remote_code=True")
    assert problems == []

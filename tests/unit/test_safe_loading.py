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
    AdapterError,
    ModelLoadError,
    check_adapter_dir,
    load_adapter,
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


# ------------------------------------------------------------------------------------------- adapters
def _lora(model: LlamaForCausalLM):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.fixture
def safe_adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    _lora(_tiny_llama()).save_pretrained(folder)
    assert (folder / "adapter_model.safetensors").is_file()
    return folder


@pytest.fixture
def pickle_adapter(safe_adapter: Path, tmp_path: Path) -> Path:
    """The same adapter with its weights as ``adapter_model.bin``, a pickle that would make ``pwned``."""
    from safetensors.torch import load_file

    weights = safe_adapter / "adapter_model.safetensors"
    with open(safe_adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({**load_file(weights), "trap": _Trap(tmp_path / "pwned")}, handle)
    weights.unlink()
    return safe_adapter


def test_safetensors_adapter_loads(safe_adapter: Path):
    trained = _lora(_tiny_llama()).state_dict()
    loaded = load_adapter(_tiny_llama(), safe_adapter).state_dict()
    lora = [name for name in trained if "lora_" in name]
    assert lora and all(torch.equal(loaded[name], trained[name]) for name in lora)


def test_pickle_only_adapter_is_refused_unread(pickle_adapter: Path, monkeypatch: pytest.MonkeyPatch):
    import peft.utils.save_and_load

    read = []
    monkeypatch.setattr(peft.utils.save_and_load, "torch_load", lambda *a, **k: read.append(a))
    with pytest.raises(AdapterError) as raised:
        load_adapter(_tiny_llama(), pickle_adapter, is_trainable=True)
    message = str(raised.value)
    assert "\n" not in message and "adapter_model.bin" in message and "safetensors only" in message
    assert read == [] and not (pickle_adapter.parent / "pwned").exists()
    assert isinstance(raised.value, ValueError)  # callers that caught ValueError still do


def test_check_adapter_dir_rules(tmp_path: Path):
    folder = tmp_path / "a"
    folder.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        check_adapter_dir(folder)
    (folder / "adapter_config.json").write_text("{}")
    assert check_adapter_dir(str(folder)) == folder  # no weights yet: PEFT or vLLM says what is missing
    (folder / "new_embeddings.bin").write_bytes(b"")
    with pytest.raises(AdapterError, match=r"only pickle weights \(new_embeddings.bin\)"):
        check_adapter_dir(folder)
    (folder / "new_embeddings.safetensors").write_bytes(b"")
    (folder / "adapter_model.pt").write_bytes(b"")
    with pytest.raises(AdapterError, match="adapter_model.pt"):
        check_adapter_dir(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "training_args.bin").write_bytes(b"")  # never read by PEFT or vLLM
    assert check_adapter_dir(folder) == folder  # PEFT prefers the safetensors file beside the pickle


# -------------------------------------------------------------------------------------------- DINOv2
@pytest.fixture
def pickle_dinov2(tmp_path: Path) -> Path:
    from safetensors.torch import load_file
    from tiny_dinov2 import save_tiny_dinov2

    folder = save_tiny_dinov2(tmp_path / "dinov2")
    weights = folder / "model.safetensors"
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({**load_file(weights), "trap": _Trap(tmp_path / "pwned")}, handle)
    weights.unlink()
    return folder


def _vfm_backbone(path: str) -> object:
    from kka_synth.detectors.vfm import VfmConfig, VfmDetector

    return VfmDetector(VfmConfig(model=path))._build_backbone()


def _evaluator_backbone(path: str) -> object:
    from kka_synth.alignment.feature_sad import clear_feature_cache, dinov2_features
    from kka_synth.config import EvaluatorConfig

    clear_feature_cache()
    try:
        return dinov2_features(EvaluatorConfig(name="deepsad-dinov2", model=path, device="cpu"))
    finally:
        clear_feature_cache()


@pytest.mark.parametrize(
    ("build", "field"), [(_vfm_backbone, "vfm.model"), (_evaluator_backbone, "evaluator.model")]
)
def test_pickle_only_dinov2_is_refused_unread(pickle_dinov2: Path, build, field: str):
    with pytest.raises(ModelLoadError) as raised:
        build(str(pickle_dinov2))
    message = str(raised.value)
    assert "\n" not in message and "pytorch_model.bin" in message and "safetensors only" in message
    assert field in message and not (pickle_dinov2.parent / "pwned").exists()


def test_load_dinov2_takes_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from tiny_dinov2 import save_tiny_dinov2
    from transformers import Dinov2Model

    from kka_synth.detectors.vfm.model import load_dinov2

    monkeypatch.delenv(TRUST_REMOTE_CODE_ENV, raising=False)
    assert policy_kwargs(load_dinov2) == {"trust_remote_code": False, "use_safetensors": True}
    folder = save_tiny_dinov2(tmp_path / "safe")
    model = load_pretrained(load_dinov2, str(folder), "the DINOv2 backbone", "vfm.model")
    assert isinstance(model, Dinov2Model) and model.config.hidden_size == 32


def test_vllm_engine_starter_takes_the_policy():
    import functools

    from kka_synth.agents.vllm import start_engine

    seen = {}

    def engine(model: str, **kwargs):
        seen.update(model=model, **kwargs)

    starter = functools.partial(start_engine, engine)
    assert policy_kwargs(starter) == {"trust_remote_code": False, "use_safetensors": True}
    load_pretrained(starter, "org/name", "the engine", "proposer.model", seed=3)
    assert seen == {"model": "org/name", "trust_remote_code": False, "load_format": "safetensors", "seed": 3}


# -------------------------------------------------------------------------------------------- the audit
def _calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else "not a constant"
    return "absent"


def test_the_package_never_unpickles():
    """No pickle, joblib or dill; no torch.hub (its downloads unpickle); torch.load never in detectors/ (their
    weights are safetensors) and elsewhere only with weights_only=True; np.load never with allow_pickle;
    no literal trust_remote_code=True; yaml only through safe_load."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text("utf-8"))
        where = path.relative_to(PACKAGE.parent)
        in_detectors = where.parts[1] == "detectors"
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
                if isinstance(node, ast.ImportFrom) and node.module == "torch":
                    bad += [
                        f"torch.{a.name}"
                        for a in node.names
                        if a.name == "hub" or (in_detectors and a.name == "load")
                    ]
                bad += [n for n in names if n and (n == "torch.hub" or n.startswith("torch.hub."))]
                problems += [f"{where}:{node.lineno} imports {n}" for n in bad]
            if isinstance(node, ast.Attribute) and ast.unparse(node) == "torch.hub":
                problems.append(f"{where}:{node.lineno} uses torch.hub")
        for call in _calls(tree):
            func = ast.unparse(call.func)
            line = f"{where}:{call.lineno} {func}"
            if func == "torch.load" and in_detectors:
                problems.append(f"{line} in detectors/ (load weights with safetensors)")
            elif func == "torch.load" and _keyword(call, "weights_only") is not True:
                problems.append(f"{line} without weights_only=True")
            if func in ("np.load", "numpy.load") and _keyword(call, "allow_pickle") not in (False, "absent"):
                problems.append(f"{line} with allow_pickle")
            if func.endswith("read_pickle") or func in ("torch.hub.load", "yaml.load", "yaml.unsafe_load"):
                problems.append(line)
            if _keyword(call, "trust_remote_code") is True:
                problems.append(f"{line} with trust_remote_code=True")
    assert problems == []


def test_the_unpickling_scan_catches_torch_hub_and_torch_load_in_detectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fake = tmp_path / "kka_synth"
    (fake / "detectors" / "wrn").mkdir(parents=True)
    (fake / "synth").mkdir()
    safe_elsewhere = "import torch\n\ndef f(p):\n    return torch.load(p, weights_only=True)\n"
    (fake / "synth" / "ok.py").write_text(safe_elsewhere)
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    test_the_package_never_unpickles()  # torch.load with weights_only=True outside detectors/ passes
    for source in (
        safe_elsewhere,
        "from torch import load\n",
        "import torch\n\ndef f(u):\n    return torch.hub.load_state_dict_from_url(u, weights_only=True)\n",
        "from torch.hub import load_state_dict_from_url\n",
        "from torch import hub\n",
        "import torch.hub\n",
    ):
        (fake / "detectors" / "wrn" / "bad.py").write_text(source)
        with pytest.raises(AssertionError):
            test_the_package_never_unpickles()


HUB = "kka_synth/utils/hub.py"

FROM_PRETRAINED_ALLOWED: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {
    ("kka_synth/agents/__init__.py", "cls.from_pretrained"): (
        "CompactProposer.from_pretrained, the project's own loader; it loads through load_pretrained",
        (),
    ),
    ("kka_synth/agents/chat_agent.py", "TransformersChatModel.from_pretrained"): (
        "the project's own chat model (agents/hf_chat.py); it loads through load_pretrained",
        (),
    ),
    ("kka_synth/detectors/vfm/model.py", "AutoConfig.from_pretrained"): (
        "inside load_dinov2, which load_pretrained calls with the policy; it passes trust_remote_code on",
        ("trust_remote_code",),
    ),
    ("kka_synth/detectors/vfm/model.py", "cls.from_pretrained"): (
        "inside load_dinov2, which load_pretrained calls with the policy; it passes both arguments on",
        ("trust_remote_code", "use_safetensors"),
    ),
}
"""``.from_pretrained`` calls outside utils/hub.py that may stay, with why, and the policy keywords each must
pass on (as variables, never as constants)."""

_LOADERS = ("from_pretrained", "from_single_file")

OTHER_LOADERS = {
    "load_dinov2": "names trust_remote_code and use_safetensors in its signature and passes them on",
    "functools.partial(start_engine, vllm.LLM)": "start_engine names both; vLLM gets load_format=safetensors",
    "diffusers.DiffusionPipeline.load_config": "reads model_index.json only, no weights and no code",
}
"""Loaders other than a ``from_pretrained`` that load_pretrained may be handed, with why each is safe."""


def _loader_arguments(tree: ast.AST) -> set[int]:
    """ids of the expressions handed to load_pretrained as its loader (its first argument)."""
    return {
        id(call.args[0])
        for call in _calls(tree)
        if ast.unparse(call.func).split(".")[-1] == "load_pretrained" and call.args
    }


def test_every_loader_goes_through_the_policy():
    """Outside utils/hub.py, a ``from_pretrained`` (or ``from_single_file``) is only ever handed to
    load_pretrained, never called, unless FROM_PRETRAINED_ALLOWED names it; PEFT adapters load only
    through load_adapter; the vLLM engine only through start_engine."""
    problems, found = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE.parent).as_posix()
        if where == HUB:
            continue
        tree = ast.parse(path.read_text("utf-8"))
        handed = _loader_arguments(tree)
        called = {id(call.func): call for call in _calls(tree)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and node.attr in _LOADERS):
                continue
            name = ast.unparse(node)
            line = f"{where}:{node.lineno} {name}"
            if name.split(".")[-2] == "PeftModel":
                problems.append(f"{line}: load adapters with kka_synth.utils.hub.load_adapter")
            elif id(node) in handed:
                continue
            elif (where, name) not in FROM_PRETRAINED_ALLOWED:
                problems.append(f"{line}: pass it to load_pretrained (or allow-list it with a reason)")
            elif id(node) not in called:
                problems.append(f"{line}: allow-listed as a call, but used as a value")
            else:
                found.add((where, name))
                for key in FROM_PRETRAINED_ALLOWED[(where, name)][1]:
                    value = _keyword(called[id(node)], key)
                    if value != "not a constant":
                        problems.append(f"{line}: must pass {key} on from the policy, got {value}")
        for call in _calls(tree):
            func = ast.unparse(call.func)
            if func.split(".")[-1] == "load_pretrained" and call.args:
                loader = ast.unparse(call.args[0])
                if loader.split(".")[-1] not in _LOADERS and loader not in OTHER_LOADERS:
                    problems.append(
                        f"{where}:{call.lineno} load_pretrained({loader}, ...): not a known loader"
                    )
            if func in ("vllm.LLM", "LLM"):
                problems.append(
                    f"{where}:{call.lineno} {func}: start the engine with agents.vllm.start_engine"
                )
    stale = sorted(set(FROM_PRETRAINED_ALLOWED) - found)
    assert problems == [] and stale == []


def test_the_audit_catches_a_bare_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A new bare ``from_pretrained`` call or ``PeftModel.from_pretrained`` makes the audit fail."""
    fake = tmp_path / "kka_synth"
    for relative in {where for where, _ in FROM_PRETRAINED_ALLOWED}:
        target = fake / relative.removeprefix("kka_synth/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((PACKAGE.parent / relative).read_text("utf-8"))
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    test_every_loader_goes_through_the_policy()  # the copies alone pass
    for source in (
        "from peft import PeftModel\n\ndef f(m, p):\n    return PeftModel.from_pretrained(m, p)\n",
        "from transformers import AutoModel\n\ndef f(p):\n    return AutoModel.from_pretrained(p)\n",
        "from transformers import AutoModel\n\nLOADER = AutoModel.from_pretrained\n",
        "import vllm\n\ndef f(p):\n    return vllm.LLM(p)\n",
        "from kka_synth.utils.hub import load_pretrained\n\nX = load_pretrained(open, 'p', 'w', 'f')\n",
    ):
        (fake / "bad.py").write_text(source)
        with pytest.raises(AssertionError):
            test_every_loader_goes_through_the_policy()

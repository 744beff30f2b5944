"""AeCSAD's WRN-50-2 teacher: torchvision's names, and ImageNet weights as safetensors only (a Hub id
through the HF cache, a local file or folder); pickles, URLs, wrong keys and missing weights are one-line
errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kka_synth.config import ConfigError
from kka_synth.detectors.aecsad import AecsadConfig, AecsadDetector
from kka_synth.detectors.aecsad.config import WRN50_2_WEIGHTS
from kka_synth.detectors.aecsad.wrn import WEIGHTS_FILE, WideResNet, load_torchvision_weights
from kka_synth.utils.hub import ModelLoadError


def test_wrn_has_torchvision_names():
    full = WideResNet()
    names = full.state_dict()
    assert sum(p.numel() for p in full.parameters()) == 68_883_240  # torchvision's wide_resnet50_2
    for key in ("conv1.weight", "layer1.0.downsample.0.weight", "layer3.5.bn3.running_var", "fc.bias"):
        assert key in names
    assert names["layer2.0.conv2.weight"].shape == (256, 256, 3, 3)
    features = full.features(torch.rand(1, 3, 64, 64), ("layer1", "layer3"))
    assert features["layer1"].shape == (1, 256, 16, 16) and features["layer3"].shape == (1, 1024, 4, 4)


# ----------------------------------------------------------------------------------- teacher weights
class _Trap:
    """Unpickling this makes a folder: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _wrn(seed: int, base: int = 4) -> WideResNet:
    """A tiny WideResNet (one block per stage) with seeded random weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return WideResNet(base=base, blocks=(1, 1, 1, 1))


def _backbone(model: WideResNet) -> dict[str, torch.Tensor]:
    return {key: value for key, value in model.state_dict().items() if not key.startswith("fc.")}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test, with the Hub offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _cache_repo(cache: Path, repo_id: str, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``model.safetensors`` of ``repo_id`` into ``cache`` where hf_hub_download finds it offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file(
        {key: value.contiguous() for key, value in tensors.items()},
        repo / "snapshots" / commit / WEIGHTS_FILE,
    )


def test_teacher_weights_come_from_the_hub_cache(hub_cache: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub

    source, target = _wrn(1), _wrn(2)
    classifier = target.fc.weight.detach().clone()
    extra = {"fc.weight": torch.ones(10, source.fc.in_features)}  # another classifier: ignored
    _cache_repo(hub_cache, "kka-synth-test/wrn", _backbone(source) | extra)
    asked = []
    download = huggingface_hub.hf_hub_download
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda *a, **k: asked.append(a) or download(*a, **k)
    )
    load_torchvision_weights(target, "kka-synth-test/wrn")
    assert asked == [("kka-synth-test/wrn", WEIGHTS_FILE)]
    assert _equal(_backbone(target), _backbone(source)) and not _equal(_backbone(_wrn(2)), _backbone(source))
    assert torch.equal(target.fc.weight, classifier)


def test_hub_profile_loads_its_default_id_full_size_from_the_cache(hub_cache: Path):
    with torch.random.fork_rng():
        torch.manual_seed(1)
        source = WideResNet()
    source_state = {key: value for key, value in source.state_dict().items() if "num_batches" not in key}
    _cache_repo(hub_cache, WRN50_2_WEIGHTS, source_state)  # a file without BN counters still loads
    del source
    config = AecsadConfig(**AecsadDetector.profiles["hub"])
    assert config.teacher_weights == WRN50_2_WEIGHTS
    teacher = AecsadDetector(config)._build_teacher()
    loaded = teacher.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in source_state.items())


def test_teacher_weights_from_a_folder_or_a_file(tmp_path: Path):
    source = _wrn(1)
    folder = tmp_path / "wrn"
    folder.mkdir()
    save_file(source.state_dict(), folder / WEIGHTS_FILE)
    for given in (folder, folder / WEIGHTS_FILE):
        target = _wrn(2)
        load_torchvision_weights(target, str(given))
        assert _equal(target.state_dict(), source.state_dict())  # a fitting classifier loads too


def _one_line_error(model: WideResNet, source: str) -> str:
    with pytest.raises(ModelLoadError) as raised:
        load_torchvision_weights(model, source)
    message = str(raised.value)
    assert "\n" not in message and "aecsad.teacher_weights" in message
    return message


def test_pickles_and_urls_are_refused_unread(tmp_path: Path):
    target = _wrn(2)
    before = target.state_dict()
    pickled = tmp_path / "wide_resnet50_2.pth"
    with open(pickled, "wb") as handle:
        pickle.dump({**target.state_dict(), "trap": _Trap(tmp_path / "pwned")}, handle)
    for source in (pickled, tmp_path / "w.bin", tmp_path / "w.pt"):
        message = _one_line_error(target, str(source))
        assert "pickle checkpoint" in message and WRN50_2_WEIGHTS in message and ".safetensors" in message
    url = "https://download.pytorch.org/models/wide_resnet50_2-9ba9bcbe.pth"
    assert "is a URL" in _one_line_error(target, url) and WRN50_2_WEIGHTS in _one_line_error(target, url)
    assert not (tmp_path / "pwned").exists() and _equal(target.state_dict(), before)
    for source in (str(pickled), url):
        with pytest.raises(ConfigError, match="aecsad.teacher_weights") as raised:
            AecsadConfig(teacher_weights=source)
        assert "\n" not in str(raised.value)
    (tmp_path / "pickle-only").mkdir()
    (tmp_path / "pickle-only" / "pytorch_model.bin").write_bytes(b"")
    assert "folder without model.safetensors" in _one_line_error(target, str(tmp_path / "pickle-only"))


def test_wrong_keys_or_shapes_are_one_line_errors(tmp_path: Path):
    state = _wrn(1).state_dict()
    renamed = {
        ("backbone." + key if key.startswith("layer1.") else key): value for key, value in state.items()
    }
    save_file(renamed, tmp_path / "renamed.safetensors")
    message = _one_line_error(_wrn(2), str(tmp_path / "renamed.safetensors"))
    assert "missing layer1.0.bn1.bias" in message and "unexpected backbone.layer1.0.bn1.bias" in message
    assert "in all)" in message  # a few keys are named, with the count
    save_file(state, tmp_path / "tiny.safetensors")
    message = _one_line_error(_wrn(2, base=8), str(tmp_path / "tiny.safetensors"))
    assert "conv1.weight has shape (4, 3, 7, 7), the teacher wants (8, 3, 7, 7) (85 keys differ" in message
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read" in _one_line_error(_wrn(2), str(tmp_path / "junk.safetensors"))
    assert "no file or folder" in _one_line_error(_wrn(2), str(tmp_path / "missing.safetensors"))
    assert "is empty" in _one_line_error(_wrn(2), "")


def test_offline_without_cached_weights_is_a_one_line_error(hub_cache: Path):
    message = _one_line_error(_wrn(2), "kka-synth-test/not-cached")
    assert "--profile offline" in message and "HF_HUB_OFFLINE" in message and "not-cached" in message


# ----------------------------------------------------------------------------------------- histogram

"""Bad input ends with one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kka_synth.cli import main


def _folder_dataset(root: Path, corrupt: bool) -> Path:
    good = root / "part" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good / f"{i:03d}.png")
    if corrupt:
        (good / "010.png").write_bytes(b"\x89PNG not really")
    return root


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--dataset", "mvtec_ad"], "data.root"),
        (["--dataset", "demo", "--category", "teapot"], "teapot"),
        (["--dataset", "demo", "--iterations", "0"], "iterations"),
        (["--dataset", "demo", "--profile", "hub"], "--profile offline"),
    ],
)
def test_bad_flags_give_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, needle):
    code = main(["run", *flags, "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err


def test_corrupt_image_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = _folder_dataset(tmp_path / "data", corrupt=True)
    code = main(
        [
            "run",
            "--dataset",
            "folder",
            "--data-root",
            str(root),
            "--out",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "010.png" in err


def test_core_imports_without_optional_stacks():
    """The core and the whole offline loop import with diffusers, vllm, langchain and kornia missing."""
    code = (
        "import sys\n"
        "for name in ('diffusers', 'vllm', 'langchain', 'langchain_openai', 'kornia'):\n"
        "    sys.modules[name] = None\n"
        "import kka_synth, kka_synth.loop, kka_synth.cli, kka_synth.alignment.dpo\n"
        "from kka_synth.utils.imports import require\n"
        "try:\n"
        "    require('vllm')\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install "kka-synth[vllm]"' in result.stdout

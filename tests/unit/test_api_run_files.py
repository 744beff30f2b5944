"""The Python API on hand-written run directories: paths read back from run files stay inside the run,
and ``evaluate`` passes detector options through (tests/integration/test_api.py runs the whole loop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kka_synth
from kka_synth import detectors
from kka_synth.config import ConfigError, RunConfig
from kka_synth.data import save_mask, save_rgb
from kka_synth.runs import RunDir, RunError, atomic_write_json, read_candidates, write_candidates, write_jsonl
from kka_synth.types import DetectorOutput

SIZE = 16


def _row(cid: str, label: str, mask: str | None) -> dict:
    return {
        "id": cid,
        "iteration": 1,
        "category": "washer",
        "prompt": "p",
        "text": "t",
        "spec": {"category": "washer", "defect_type": "stain"},
        "source_id": "washer/000",
        "renderer": "procedural",
        "image": f"images/{cid}.png",
        "mask": mask,
        "verdicts": {},
        "hardness": 0.5 if label == "hard" else -1.0,
        "label": label,
        "render_info": {},
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with one iteration of two candidates (hard with a mask, easy without) and a curated index."""
    config = RunConfig.from_dict(
        {
            "name": "r",
            "out": str(tmp_path / "runs"),
            "iterations": 1,
            "data": {"dataset": "demo", "image_size": SIZE, "categories": ["washer"]},
            "eval": {"detectors": ["fake"], "variants": ["none"], "overlays": 0},
        }
    )
    run = RunDir.open(config)
    folder = run.iteration_dir(1)
    image = np.full((SIZE, SIZE, 3), 90, dtype=np.uint8)
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[2:6, 2:6] = True
    for cid in ("1-washer-0000", "1-washer-0001"):
        save_rgb(folder / "images" / f"{cid}.png", image)
    save_mask(folder / "masks" / "1-washer-0000.png", mask)
    rows = [_row("1-washer-0000", "hard", "masks/1-washer-0000.png"), _row("1-washer-0001", "easy", None)]
    write_candidates(folder, rows)
    atomic_write_json(folder / "stats.json", {"iteration": 1, "hard_share": 0.5})
    save_rgb(run.curated_dir / "washer" / "test" / "stain" / "a.png", image)
    write_jsonl(
        run.curated_dir / "index.jsonl",
        [{"id": "1-washer-0000", "category": "washer", "image": "washer/test/stain/a.png", "mask": None}],
    )
    return run.path


def test_paths_are_those_of_the_run_files(run_dir: Path) -> None:
    run = kka_synth.open_run(run_dir)
    hard, easy = run.candidates()
    assert Path(hard["image"]) == run_dir / "iterations" / "1" / "images" / "1-washer-0000.png"
    assert Path(hard["mask"]).is_file() and easy["mask"] is None
    assert [r["id"] for r in run.candidates(label="easy")] == ["1-washer-0001"]
    (curated,) = run.curated()
    assert Path(curated["image"]) == run_dir / "curated" / "washer" / "test" / "stain" / "a.png"
    assert curated["mask"] is None


@pytest.mark.parametrize("value", ["../../../secret.png", "/SECRET", "images/link.png"])
def test_candidate_paths_leading_out_of_the_run_are_refused(run_dir: Path, value: str) -> None:
    secret = run_dir.parent / "secret.png"
    secret.write_bytes(b"not the run's")
    (run_dir / "iterations" / "1" / "images" / "link.png").symlink_to(secret)
    folder = run_dir / "iterations" / "1"
    rows = read_candidates(folder)
    rows[1]["mask"] = value.replace("/SECRET", str(secret))
    write_candidates(folder, rows)
    run = kka_synth.open_run(run_dir)
    with pytest.raises(RunError, match="lies outside") as error:
        run.candidates()
    assert "\n" not in str(error.value)
    assert len(run.candidates(label="hard")) == 1  # the tampered row is not among these


def test_curated_paths_leading_out_of_the_run_are_refused(run_dir: Path) -> None:
    index = run_dir / "curated" / "index.jsonl"
    row = json.loads(index.read_text())
    write_jsonl(index, [{**row, "image": "../../secret.png"}])
    with pytest.raises(RunError, match="lies outside") as error:
        kka_synth.open_run(run_dir).curated()
    assert "\n" not in str(error.value)


class FakeConfig:
    def __init__(self, seed: int = 0, gain: float = 1.0):
        self.seed, self.gain = seed, gain


class GainDetector:
    """Scores every image by ``gain``; records the gains it was built with."""

    config_class = FakeConfig
    profiles: dict = {}
    gains: list[float] = []

    def __init__(self, config: FakeConfig, progress=None) -> None:
        self.config = config
        GainDetector.gains.append(config.gain)

    def fit(self, normal, synthetic=None) -> None:
        return None

    def predict(self, images) -> DetectorOutput:
        scores = np.full(len(images), self.config.gain, dtype=np.float32)
        return DetectorOutput(scores, np.zeros((len(images), SIZE, SIZE), dtype=np.float32))

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)


def test_evaluate_passes_detector_options(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    GainDetector.gains = []
    monkeypatch.setitem(detectors.DETECTORS, "fake", GainDetector)
    kka_synth.evaluate(run_dir, options={"fake": {"gain": 4.0}})
    assert GainDetector.gains[-1] == 4.0
    result = json.loads((run_dir / "eval/washer/fake/none/seed0/result.json").read_text())
    assert result["options"] == {"gain": 4.0}
    for options, message in (
        ({"fake": {"gains": 1.0}}, "eval.options.fake"),
        ({"draem": {"steps": -1}}, "eval.options.draem"),
        ({"fake": ["gain"]}, "options.fake must map field names"),
        ("gain=2", "options must map detector names"),
    ):
        built = len(GainDetector.gains)
        with pytest.raises(ConfigError, match=message) as error:
            kka_synth.evaluate(run_dir, detectors=["fake", "draem"], options=options)
        assert "\n" not in str(error.value) and len(GainDetector.gains) == built  # checked first

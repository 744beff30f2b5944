"""The evaluation protocol with a recording fake detector: what each variant trains on, what it is tested on,
resuming, and the summary files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kka_synth import detectors
from kka_synth.config import ConfigError, RunConfig
from kka_synth.data import load_rgb, load_samples, save_mask, save_rgb
from kka_synth.eval.protocol import evaluate_run, metrics_markdown, variant_stages
from kka_synth.runs import RunDir, RunError, write_jsonl
from kka_synth.types import DetectorOutput, SyntheticStage

SIZE = 32


class FakeConfig:
    def __init__(self, seed: int = 0, gain: float = 1.0, offset: float = 0.0):
        self.seed = seed
        self.gain = gain
        self.offset = offset


class RecordingDetector:
    """Scores by the distance to the mean normal image, and records what it was given."""

    name = "fake"
    config_class = FakeConfig
    profiles = {"offline": {"gain": 2.0}}
    calls: list[dict] = []

    def __init__(self, config: FakeConfig, progress=None):
        self.config = config
        self.mean: np.ndarray | None = None

    def fit(self, normal, synthetic=None):
        self.mean = np.mean([image.astype(np.float32) for image in normal], axis=0)
        RecordingDetector.calls.append(
            {
                "normal": [image.copy() for image in normal],
                "stages": synthetic,
                "seed": self.config.seed,
                "options": (self.config.gain, self.config.offset),
            }
        )

    def predict(self, images):
        maps = np.stack([np.abs(image.astype(np.float32) - self.mean).mean(axis=2) for image in images])
        maps *= self.config.gain
        return DetectorOutput(maps.reshape(len(images), -1).max(axis=1).astype(np.float32), maps)

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "mean.npy").write_bytes(self.mean.tobytes())


@pytest.fixture
def fake_detector(monkeypatch: pytest.MonkeyPatch):
    RecordingDetector.calls = []
    monkeypatch.setitem(detectors.DETECTORS, "fake", RecordingDetector)
    return RecordingDetector


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished-looking demo run: a manifest and a curated set of two anomalies per category."""
    config = RunConfig.from_dict(
        {
            "name": "r",
            "out": str(tmp_path),
            "data": {"dataset": "demo", "image_size": SIZE},
            "eval": {"detectors": ["fake"], "overlays": 2},
        }
    )
    run = RunDir.open(config)
    rows = []
    for category in ("brick", "washer"):
        train = [s for s in load_samples("demo", None, [category]) if s.split == "train"]
        for i, sample in enumerate(train[:2]):
            image = load_rgb(sample.image_path, SIZE)
            mask = np.zeros((SIZE, SIZE), dtype=bool)
            mask[8:14, 8 + i : 16 + i] = True
            image[mask] = 255
            stem = f"1-{category}-{i:04d}"
            save_rgb(run.curated_dir / category / "test" / "spot" / f"{stem}.png", image)
            save_mask(run.curated_dir / category / "ground_truth" / "spot" / f"{stem}_mask.png", mask)
            rows.append(
                {
                    "id": stem,
                    "category": category,
                    "source_id": f"{category}/{Path(sample.image_path).stem}",
                    "image": f"{category}/test/spot/{stem}.png",
                    "mask": f"{category}/ground_truth/spot/{stem}_mask.png",
                }
            )
    write_jsonl(run.curated_dir / "index.jsonl", rows)
    return run.path


def test_variant_schedules():
    rule = SyntheticStage("rule", draw=lambda image, rng: (image, np.ones(image.shape[:2], bool)))
    kka = SyntheticStage("kka", anomalies=[(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4), bool), None)])
    assert variant_stages("none", rule, kka, 0.5) is None
    assert [(s.name, s.share) for s in variant_stages("rule", rule, kka, 0.3)] == [("rule", 1.0)]
    assert [(s.name, s.share) for s in variant_stages("kka", rule, kka, 0.3)] == [("kka", 1.0)]
    assert [(s.name, s.share) for s in variant_stages("two-stage", rule, kka, 0.3)] == [
        ("rule", 0.3),
        ("kka", 0.7),
    ]
    assert [(s.name, s.share) for s in variant_stages("reverse", rule, kka, 0.3)] == [
        ("kka", 0.7),
        ("rule", 0.3),
    ]
    with pytest.raises(ValueError, match="no curated anomalies"):
        variant_stages("two-stage", rule, None, 0.5)


def test_every_variant_trains_on_train_normals_and_never_on_test_images(run_dir: Path, fake_detector):
    summary = evaluate_run(run_dir, {"seeds": 2})
    samples = load_samples("demo", None, None)
    tests = [load_rgb(s.image_path, SIZE) for s in samples if s.split == "test"]
    n_train = {c: sum(s.split == "train" and s.category == c for s in samples) for c in ("brick", "washer")}
    assert len(fake_detector.calls) == 2 * 5 * 2  # categories x variants x seeds
    for call in fake_detector.calls:
        assert len(call["normal"]) in n_train.values()
        trained = list(call["normal"])
        for stage in call["stages"] or []:
            trained += [image for image, _, _ in stage.anomalies]
            assert all(clean is not None for _, _, clean in stage.anomalies)
            if stage.name == "rule":
                assert stage.draw is not None and not stage.anomalies
        for image in trained:
            assert not any(np.array_equal(image, test) for test in tests)
    assert sorted({c["seed"] for c in fake_detector.calls}) == [0, 1]
    names = [[s.name for s in c["stages"]] if c["stages"] else [] for c in fake_detector.calls[:10]]
    assert names[::2] == [[], ["rule"], ["kka"], ["rule", "kka"], ["kka", "rule"]]

    entry = summary["categories"]["brick"]["fake"]["two-stage"]
    assert entry["n"] == 2 and 0.0 <= entry["mean"]["image_auroc"] <= 1.0
    assert entry["std"]["image_auroc"] == pytest.approx(0.0)  # the fake detector ignores its seed
    assert entry["mean"]["aupro"] is not None and entry["mean"]["spro"] is None
    assert json.loads((run_dir / "metrics.json").read_text()) == summary
    assert "| fake | two-stage |" in (run_dir / "metrics.md").read_text()

    result = json.loads((run_dir / "eval/brick/fake/kka/seed0/result.json").read_text())
    assert result["synthetic"] == {"kka": 2} and result["image_size"] == SIZE
    assert result["curves"]["image_roc"]["fpr"][0] == 0.0 and result["curves"]["image_roc"]["tpr"][-1] == 1.0
    assert [o["label"] for o in result["overlays"]] == [1, 0]
    for overlay in result["overlays"]:
        image = load_rgb(run_dir / "eval/brick/fake/kka/seed0" / overlay["file"])
        assert image.shape == (SIZE, 2 * SIZE, 3)
    assert (run_dir / "eval/brick/fake/kka/seed0/model/mean.npy").is_file()


def test_finished_results_are_reused(run_dir: Path, fake_detector):
    evaluate_run(run_dir, {"variants": ["none", "rule"]})
    assert len(fake_detector.calls) == 4
    evaluate_run(run_dir, {"variants": ["none", "rule", "kka"]})
    assert len(fake_detector.calls) == 6  # only kka is new
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert set(summary["categories"]["washer"]["fake"]) == {"none", "rule", "kka"}


def test_variants_needing_the_curated_set_are_skipped_without_it(run_dir: Path, fake_detector, caplog):
    (run_dir / "curated" / "index.jsonl").unlink()
    summary = evaluate_run(run_dir, {"variants": ["rule", "kka"]})
    assert set(summary["categories"]["brick"]["fake"]) == {"rule"}
    assert "variant kka skipped" in caplog.text


def test_bad_requests_are_one_line_errors(run_dir: Path, tmp_path: Path, fake_detector):
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        evaluate_run(run_dir, {"detectors": ["nope"]})
    with pytest.raises(ConfigError, match="unknown eval variant"):
        evaluate_run(run_dir, {"variants": ["best"]})
    with pytest.raises(RunError, match="not a run directory"):
        evaluate_run(tmp_path / "missing")


def test_markdown_shows_mean_and_std():
    entry = {"mean": {"image_auroc": 0.9}, "std": {"image_auroc": 0.05}, "n": 3, "train_seconds": 12.0}
    summary = {
        "dataset": "demo",
        "image_size": 64,
        "seeds": [0, 1, 2],
        "categories": {"brick": {"draem": {"rule": entry}}},
    }
    text = metrics_markdown(summary)
    assert "| draem | rule | 0.900 ± 0.050 | – |" in text


def test_curated_paths_leading_out_of_the_run_are_refused(run_dir: Path, tmp_path: Path, fake_detector):
    secret = tmp_path / "secret.png"
    save_rgb(secret, np.zeros((SIZE, SIZE, 3), dtype=np.uint8))  # readable: only the check stops it
    index = run_dir / "curated" / "index.jsonl"
    rows = [json.loads(line) for line in index.read_text().splitlines()]
    for key, value in (("image", "../../secret.png"), ("mask", str(secret))):
        changed = [dict(row) for row in rows]
        changed[0][key] = value
        write_jsonl(index, changed)
        with pytest.raises(RunError, match="lies outside") as error:
            evaluate_run(run_dir, {"variants": ["kka"]})
        assert "\n" not in str(error.value) and fake_detector.calls == []


def test_options_reach_the_detector_and_are_checked_first(run_dir: Path, fake_detector):
    evaluate_run(run_dir, {"variants": ["none"]}, options={"fake": {"gain": 3.0}})
    assert len(fake_detector.calls) == 2  # brick and washer
    result = json.loads((run_dir / "eval/brick/fake/none/seed0/result.json").read_text())
    assert result["options"] == {"gain": 3.0}
    evaluate_run(run_dir, {"variants": ["none"]}, options={"fake": {"gain": 3.0}})
    assert len(fake_detector.calls) == 2  # same options: the results are reused
    evaluate_run(run_dir, {"variants": ["none"]})
    assert len(fake_detector.calls) == 4  # the run's own options (none): trained again
    cases = [
        ({"fake": {"gian": 1.0}}, "eval.options.fake: .*gian"),
        ({"nope": {}}, "unknown detector 'nope'"),
        ({"fake": 3}, "options.fake must map field names"),
        (["fake"], "options must map detector names"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            evaluate_run(run_dir, {"variants": ["none"]}, options=options)
        assert "\n" not in str(error.value)
    assert len(fake_detector.calls) == 4  # nothing was trained for a bad request


def test_options_are_laid_over_the_run_options(run_dir: Path, fake_detector):
    """A detector's given fields replace the run's; the run's other fields stay; the profile's come first."""
    run = RunDir.load(run_dir)
    run.manifest["config"]["eval"]["options"] = {"fake": {"offset": 2.0}}
    run.save_manifest()
    evaluate_run(run_dir, {"variants": ["none"]})
    assert fake_detector.calls[-1]["options"] == (2.0, 2.0)  # gain 2.0 from the offline profile
    evaluate_run(run_dir, {"variants": ["none"]}, options={"fake": {"gain": 0.5}})
    assert fake_detector.calls[-1]["options"] == (0.5, 2.0)
    result = json.loads((run_dir / "eval/washer/fake/none/seed0/result.json").read_text())
    assert result["options"] == {"offset": 2.0, "gain": 0.5}

"""The hub profile end to end: diffusion inpainting and the LightGlue band, from local tiny models.

The pipeline and the matcher are tiny random models saved to folders and handed over as model paths, so the
real ``from_pretrained`` loading runs. The proposer stays the compact one (the hub LLM backends are separate).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tiny_diffusion import save_tiny_pipeline
from tiny_dinov2 import save_tiny_dinov2
from tiny_lightglue import save_tiny_lightglue

from kka_synth.cli import main
from kka_synth.loop import read_candidates


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "inpaint": save_tiny_pipeline("inpaint", folder / "inpaint"),
        "text2img": save_tiny_pipeline("text2img", folder / "text2img"),
        "lightglue": save_tiny_lightglue(folder / "lightglue"),
    }


def _config(tmp_path: Path, models: dict[str, Path], **overrides) -> Path:
    sampling = {"steps": 2, "resolution": 64, "batch_size": 4, "feather": 0.02}
    config = {
        "name": "hub",
        "out": str(tmp_path / "runs"),
        "iterations": 1,
        "proposals_per_iteration": 8,
        "data": {"dataset": "demo", "image_size": 64},
        "proposer": {"backend": "compact", "model": None, "constrained": True, "pretrain_steps": 150},
        "render": {
            "inpaint": {"model": str(models["inpaint"]), **sampling},
            "text2img": {"model": str(models["text2img"]), **sampling},
        },
        "filters": {
            "matcher_model": str(models["lightglue"]),
            "matcher_device": "cpu",
            "band_quantiles": [0.0, 1.0],
        },
        "evaluator": {"name": "deepsad-cnn", "pretrain_epochs": 1, "epochs": 2, "size": 64, "crop": 32},
        "alignment": {"enabled": False},
        **overrides,
    }
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_hub_profile_inpaints_and_filters_with_lightglue(tmp_path: Path, models: dict[str, Path]):
    dinov2 = save_tiny_dinov2(tmp_path / "dinov2")  # the hub profile's evaluator: Deep SAD on DINOv2 features
    evaluator = {"model": str(dinov2), "device": "cpu", "pretrain_epochs": 1, "epochs": 2}
    config = _config(tmp_path, models, evaluator=evaluator)
    code = main(
        ["run", "--profile", "hub", "--renderer", "inpaint", "--config", str(config), "--no-progress"]
    )
    assert code == 0
    run = tmp_path / "runs" / "hub"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["profile"] == "hub"
    assert manifest["config"]["filters"]["matcher"] == "lightglue"
    assert manifest["config"]["evaluator"]["name"] == "deepsad-dinov2"
    assert json.loads((run / "judges" / "brick" / "judge.json").read_text())["evaluator"] == "deepsad-dinov2"
    assert json.loads((run / "calibration.json").read_text())["brick"]["matcher"] == "lightglue"
    stats = json.loads((run / "iterations" / "1" / "stats.json").read_text())
    rows = read_candidates(run / "iterations" / "1")
    rendered = [r for r in rows if r["image"] is not None]
    assert rendered and {r["renderer"] for r in rendered} == {"inpaint"}
    assert stats["renderers"] == {"inpaint": len(rendered)}
    assert stats["match_scores"]["count"] == len(rendered)
    for r in rendered:
        assert "match_band" in r["verdicts"] and "locality" in r["verdicts"]
        assert r["render_info"]["changed_area"] > 0 and "seed" in r["render_info"]
        image = np.asarray(Image.open(run / "iterations" / "1" / r["image"]))
        mask = np.asarray(Image.open(run / "iterations" / "1" / r["mask"])) > 0
        assert image.shape == (64, 64, 3) and mask.shape == (64, 64) and mask.any()
    page = (run / "report.html").read_text()
    assert "Match band" in page
    assert "Renders by renderer: iteration 1: inpaint" in page


def test_a_renderer_mix_and_text2img_without_masks(tmp_path: Path, models: dict[str, Path]):
    config = _config(tmp_path, models)
    flags = ["--renderer", "text2img=1,procedural=1", "--matcher", "sift", "--no-progress"]
    assert main(["run", "--profile", "hub", "--config", str(config), *flags]) == 0
    run = tmp_path / "runs" / "hub"
    rows = read_candidates(run / "iterations" / "1")
    used = {r["renderer"] for r in rows if r["image"] is not None}
    assert used <= {"text2img", "procedural"} and "text2img" in used
    stats = json.loads((run / "iterations" / "1" / "stats.json").read_text())
    absent = [r for r in rows if r["image"] is not None and r["mask"] is None]
    assert stats["masks_absent"] == len(absent)
    for r in absent:
        assert r["renderer"] == "text2img" and "locality" not in r["verdicts"]


def test_a_missing_pipeline_is_one_line_naming_the_offline_profile(tmp_path: Path, models, capsys):
    config = _config(tmp_path, models)
    data = yaml.safe_load(config.read_text())
    data["render"]["inpaint"]["model"] = str(tmp_path / "no-such-model")
    config.write_text(yaml.safe_dump(data))
    assert main(["run", "--profile", "hub", "--config", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "render.inpaint.model" in err[0] and "--profile offline" in err[0]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_llm import save_tiny_chat_model, teach_specs

    path = save_tiny_chat_model(tmp_path_factory.mktemp("models") / "chat")
    return teach_specs(path, categories=("brick", "washer"))


def test_hub_profile_with_the_transformers_proposer_and_dpo(tmp_path: Path, chat_model: Path):
    """`run --profile hub` with an instruct LM through TransformersProposer: chat-template prompts, retries,
    and two DPO rounds whose LoRA adapter (attention and MLP projections) continues from round to round."""
    from peft import PeftConfig

    from kka_synth.runs import read_jsonl

    config = tmp_path / "llm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "llm",
                "out": str(tmp_path / "runs"),
                "iterations": 2,
                "proposals_per_iteration": 16,
                "data": {"dataset": "demo", "image_size": 64},
                # no few-shot block: the tiny model was taught on requests without one
                "proposer": {"model": str(chat_model), "max_new_tokens": 96, "max_retries": 1, "examples": 0},
                "render": {"renderers": ["procedural"]},
                "filters": {"matcher": "sift", "band_quantiles": [0.0, 1.0]},
                "evaluator": {
                    "name": "deepsad-cnn",
                    "pretrain_epochs": 1,
                    "epochs": 2,
                    "size": 64,
                    "crop": 32,
                },
                "alignment": {
                    "pairs_per_prompt": 4,
                    "max_pairs": 8,
                    "dpo": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 5e-4},
                },
            }
        )
    )
    assert main(["run", "--profile", "hub", "--config", str(config), "--no-progress"]) == 0
    run = tmp_path / "runs" / "llm"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["proposer"]["backend"] == "transformers"
    for k in (1, 2):
        stats = json.loads((run / "iterations" / str(k) / "stats.json").read_text())
        proposals = read_jsonl(run / "iterations" / str(k) / "proposals.jsonl")
        assert len(proposals) == 32 and all(p["prompt"].startswith("<|im_start|>system\n") for p in proposals)
        assert stats["kept"] > 0 and stats["dpo"]["steps"] >= 1
        retried = [p for p in proposals if p["retries"]]
        assert stats["parse_retries"] == sum(len(p["retries"]) for p in proposals) == len(retried) > 0
        assert stats["parse_failures"] == sum(p["spec"] is None for p in proposals)
        adapter = PeftConfig.from_pretrained(str(run / "adapters" / str(k)))
        assert set(adapter.target_modules) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    # round 2 continued round 1's adapter: it starts from round 1's policy, not from the base model
    first, second = (manifest["stages"][f"{k}/align"] for k in (1, 2))
    assert first["margin_after"] > first["margin_before"] and second["steps"] >= 1

"""Time the alignment stage at the offline loop's sizes: cross-fitted Deep SAD hardness and one DPO round.

Sizes per call: 60 training normals, 20 held-out normals, 64 kept candidates (128 x 128, with masks),
2 folds, the default EvaluatorConfig; DPO on a 2-layer, hidden-64 Llama with 128 pairs and the default
AlignmentConfig. Run with ``OMP_NUM_THREADS=1 python benchmarks/bench_evaluator.py``.

``--evaluator deepsad-dinov2`` times the hub profile's evaluator instead (a Deep SAD head on frozen DINOv2
features at 224 px): ``--model`` names a Hub id or local folder, or, by default, a random backbone of
dinov2-small's shape is saved to a temporary folder (timings only: its hard shares mean nothing). Each
repeat is one loop iteration: the first encodes the normals, the later ones only their new candidates.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import cv2
import numpy as np
import skimage.data
import torch

from kka_synth.alignment.hardness import JudgeEvaluator, cross_fit_hardness
from kka_synth.config import EVALUATORS, AlignmentConfig, EvaluatorConfig
from kka_synth.types import PreferencePair

CROP = 128


def _crops(
    texture: np.ndarray, count: int, rows: tuple[int, int], rng: np.random.Generator
) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        y = int(rng.integers(rows[0], rows[1] - CROP))
        x = int(rng.integers(0, texture.shape[1] - CROP))
        out.append(np.ascontiguousarray(texture[y : y + CROP, x : x + CROP]))
    return out


def _defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A disc of random radius and contrast: from invisible to obvious."""
    radius = int(rng.integers(2, 16))
    tone = int(rng.choice([-1, 1]) * rng.integers(5, 120))
    mask = np.zeros(image.shape[:2], np.uint8)
    cy, cx = (int(v) for v in rng.integers(radius + 1, CROP - radius - 1, size=2))
    cv2.circle(mask, (cx, cy), radius, 1, -1)
    painted = image.astype(np.int16)
    painted[mask > 0] += tone
    return np.clip(painted, 0, 255).astype(np.uint8), mask.astype(bool)


def bench_hardness(repeats: int, config: EvaluatorConfig) -> None:
    texture = np.stack([skimage.data.brick()] * 3, axis=-1)
    rng = np.random.default_rng(0)
    normals = _crops(texture, 60, (0, 300), rng)
    holdout = _crops(texture, 20, (300, 512), rng)
    times, shares = [], []
    for seed in range(repeats):
        rendered = [_defect(image, rng) for image in _crops(texture, 64, (0, 512), rng)]
        start = time.perf_counter()
        result = cross_fit_hardness(
            normals, holdout, [r[0] for r in rendered], [r[1] for r in rendered], config, seed=seed
        )
        times.append(time.perf_counter() - start)
        shares.append(result.hard_share)
    print(
        f"cross_fit_hardness [{config.name}] (60 normals, 20 holdout, 64 candidates, {config.folds} folds, "
        f"{config.pretrain_epochs}+{config.epochs} epochs): "
        f"per call {np.round(times, 2).tolist()} s (mean {np.mean(times):.2f}); "
        f"hard share {np.round(shares, 2).tolist()}"
    )
    rule_based = [_defect(image, rng) for image in _crops(texture, 64, (0, 300), rng)]
    start = time.perf_counter()
    judge = JudgeEvaluator(config, seed=0)
    judge.fit(normals, [r[0] for r in rule_based], [r[1] for r in rule_based], holdout)
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    judge.hardness([r[0] for r in rendered])
    print(
        f"judge fit (60 normals + 64 anomalies): {fit_time:.2f} s; "
        f"assess 64 candidates: {time.perf_counter() - start:.3f} s"
    )


def bench_dpo(pairs_count: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from kka_synth.alignment.dpo import train_dpo

    rng = np.random.default_rng(0)

    def spec(severity: float) -> str:
        return json.dumps(
            {
                "defect_type": str(rng.choice(["scratch", "crack", "stain", "dent"])),
                "description": "a defect",
                "region": str(rng.choice(["top", "left", "center"])),
                "size": float(rng.choice([0.01, 0.05, 0.2])),
                "shape": "blob",
                "tone": "darker",
                "severity": severity,
            }
        )

    prompts = [f"Propose a defect for category {i}:" for i in range(2)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [spec(0.5) for _ in range(500)] + prompts,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=["<pad>", "<eos>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    pairs = [PreferencePair(prompts[i % 2], spec(0.1), spec(0.9)) for i in range(pairs_count)]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train_dpo(model, tokenizer, pairs, AlignmentConfig(), out, seed=0)
        elapsed = time.perf_counter() - start
    print(
        f"train_dpo ({pairs_count} pairs, default AlignmentConfig, tiny Llama): {elapsed:.2f} s, "
        f"{result.steps} steps, margin {result.margin_before:.2f} -> {result.margin_after:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cross_fit_hardness calls to time")
    parser.add_argument("--pairs", type=int, default=128, help="preference pairs in the DPO round")
    parser.add_argument("--evaluator", choices=EVALUATORS, default="deepsad-cnn", help="evaluator to time")
    parser.add_argument("--model", default=None, help="deepsad-dinov2: Hub id or folder (default: random)")
    parser.add_argument("--device", default="auto", help="deepsad-dinov2: backbone device")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO round")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        config = EvaluatorConfig(name=args.evaluator, device=args.device)
        if args.evaluator == "deepsad-dinov2":
            if args.model is None:
                from kka_synth.detectors.vfm.model import random_dinov2

                random_dinov2("small", seed=0).save_pretrained(folder)
                args.model = folder
            config.model = args.model
            print(f"backbone: {args.model}, device {args.device}, batch {config.batch_size}")
        bench_hardness(args.repeats, config)
    if not args.no_dpo:
        bench_dpo(args.pairs)


if __name__ == "__main__":
    main()

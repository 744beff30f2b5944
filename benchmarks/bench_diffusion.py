"""Cost of the diffusion renderers: per-candidate overhead around the model, and GPU throughput.

CPU part (default): tiny random pipelines (Stable Diffusion layout, 8x latent grid) render N random specs on
512x512 images with the inpaint, edit and text2img renderers. The pipeline call is wrapped and timed on its
own; everything else a candidate costs (foreground, placing, resizing, masks, compositing, mask extraction)
is the overhead, printed per candidate next to the filters' cost (EditLocality and the SIFT MatchCountBand)
and a breakdown of the overhead's pieces. The target is an overhead under 50 ms per candidate.

GPU part (``--gpu``): an inpainting pipeline of Stable Diffusion 1.5's size with random weights, built from
configs (UNet 320/640/1280/1280 with 9 input channels and cross-attention 768, the full VAE, a CLIP ViT-L
text encoder), runs through InpaintRenderer at 512x512, 30 steps, batch 8, in float16 and bfloat16. It
prints images/s, the peak allocated memory and the UNet's share of the hardware's bound: UNet FLOPs per
step (torch.utils.flop_counter) * steps * 2 (classifier-free guidance) * images / (peak TFLOPs * time).

    python benchmarks/bench_diffusion.py                        # CPU overhead, 24 candidates per renderer
    python benchmarks/bench_diffusion.py --gpu                  # H100 throughput (--peak-tflops 989)
    python benchmarks/bench_diffusion.py --gpu --device cpu --dtypes float32 --steps 1 --batch 1 --side 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from skimage import data

from kka_synth.config import DiffusionConfig
from kka_synth.synth import EditRenderer, InpaintRenderer, RenderError, Text2ImageRenderer
from kka_synth.synth.diffusion import (
    DiffusionRenderer,
    SpecPlacer,
    change_mask,
    composite,
    feathered_alpha,
    prepare_pipeline,
    resize_rgb,
    working_size,
)
from kka_synth.synth.filters import EditLocality, MatchCountBand
from kka_synth.synth.foreground import estimate_foreground
from kka_synth.synth.procedural import ProceduralRenderer
from kka_synth.types import REGIONS, SHAPES, SIZE_RANGE, TONES, Candidate, DefectSpec, Proposal

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "unit" / "synth"))
from tiny_diffusion import save_tiny_pipeline, write_clip_tokenizer  # noqa: E402


def normals(side: int) -> list[np.ndarray]:
    """Six RGB images at side x side: three bundled textures and three photographs."""
    images = [np.repeat(getattr(data, name)()[..., None], 3, axis=2) for name in ("brick", "grass", "gravel")]
    images += [data.astronaut(), data.coffee(), data.chelsea()]
    return [cv2.resize(np.ascontiguousarray(i), (side, side), interpolation=cv2.INTER_AREA) for i in images]


def random_spec(category: str, rng: np.random.Generator) -> DefectSpec:
    low, high = np.log(SIZE_RANGE[0] * 4), np.log(0.1)
    return DefectSpec(
        category=category,
        defect_type="defect",
        description=str(rng.choice(["", "thin", "wide", "several", "long"])),
        region=REGIONS[str(rng.choice(list(REGIONS)))],
        size=float(np.exp(rng.uniform(low, high))),
        shape=str(rng.choice(SHAPES)),
        tone=str(rng.choice(TONES)),
        severity=float(rng.uniform(0.2, 1.0)),
    )


def time_pipeline(renderer: DiffusionRenderer) -> list[float]:
    """Wrap the renderer's pipeline call; the returned list accumulates its seconds."""
    spent = [0.0]
    call = renderer.call_pipeline

    def timed(kwargs: dict[str, Any]) -> np.ndarray:
        start = time.perf_counter()
        out = call(kwargs)
        if renderer.device.type == "cuda":
            import torch

            torch.cuda.synchronize(renderer.device)
        spent[0] += time.perf_counter() - start
        return out

    renderer.call_pipeline = timed  # type: ignore[method-assign]
    return spent


def mean_ms(function: Callable[[], object], repeats: int = 20) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1000.0


def overhead_breakdown(image: np.ndarray, resolution: int, feather: float, threshold: float) -> None:
    """Time the pieces of one inpaint candidate's overhead on one image."""
    spec = DefectSpec("bench", "defect", "", REGIONS["center"], 0.02, "blob", "darker", 0.6)
    placer = SpecPlacer()
    foreground_ms = mean_ms(lambda: estimate_foreground(image), 5)
    full_ms = mean_ms(lambda: ProceduralRenderer().place(image, spec, np.random.default_rng(0)), 5)
    place_ms = mean_ms(lambda: placer.place(image, spec, np.random.default_rng(0)))
    requested = placer.place(image, spec, np.random.default_rng(0))
    size = working_size(*image.shape[:2], resolution)
    resize_ms = mean_ms(lambda: resize_rgb(resize_rgb(image, size), image.shape[:2]))
    alpha_ms = mean_ms(lambda: feathered_alpha(requested, feather * min(image.shape[:2])))
    alpha = feathered_alpha(requested, feather * min(image.shape[:2]))
    render = np.clip(image.astype(np.int16) - 60, 0, 255).astype(np.uint8)
    composite_ms = mean_ms(lambda: composite(image, render, alpha))
    out = composite(image, render, alpha)
    mask_ms = mean_ms(lambda: change_mask(image, out, threshold, within=alpha > 0))
    print(
        f"  pieces at {image.shape[1]}x{image.shape[0]} (working {size[1]}x{size[0]}): foreground (uncached) "
        f"{foreground_ms:.1f} ms, place {place_ms:.1f} (at full size {full_ms:.1f}), resize there and back "
        f"{resize_ms:.1f}, "
        f"feathered alpha {alpha_ms:.1f}, composite {composite_ms:.1f}, change mask {mask_ms:.1f}"
    )


def cpu_benchmark(args: argparse.Namespace) -> None:
    images = normals(args.side)
    rng = np.random.default_rng(args.seed)
    band = MatchCountBand().calibrate(images, np.random.default_rng(args.seed))
    locality = EditLocality()
    folder = Path(tempfile.mkdtemp(prefix="bench-diffusion-"))
    print(f"CPU: {args.n} candidates per renderer at {args.side}x{args.side}, working side {args.resolution}")
    for kind, cls in (("inpaint", InpaintRenderer), ("edit", EditRenderer), ("text2img", Text2ImageRenderer)):
        save_tiny_pipeline(kind, folder / kind, vae_blocks=4)
        config = DiffusionConfig(
            model=str(folder / kind),
            device="cpu",
            steps=args.steps,
            resolution=args.resolution,
            batch_size=args.batch,
        )
        renderer = cls(config, max_change_share=None) if cls is EditRenderer else cls(config)
        if isinstance(renderer, Text2ImageRenderer):
            renderer.set_references("bench", images)
        renderer.load()
        sources = [images[i % len(images)] for i in range(args.n)]
        specs = [random_spec("bench", rng) for _ in range(args.n)]
        rngs = [np.random.default_rng(args.seed * 1000 + i) for i in range(args.n)]
        renderer.render_batch(sources[: len(images)], specs[: len(images)], rngs[: len(images)])  # warm up
        spent = time_pipeline(renderer)
        start = time.perf_counter()
        results = renderer.render_batch(sources, specs, rngs)
        total = time.perf_counter() - start
        failures = Counter(r.reason for r in results if isinstance(r, RenderError))
        filter_ms = {"locality": 0.0, "match_band": 0.0}
        judged = 0
        for source, result in zip(sources, results, strict=True):
            if isinstance(result, RenderError) or result.mask is None:
                continue
            candidate = Candidate("b", 0, Proposal("", ""), "s", result.image, result.mask, kind)
            for name, judge in (("locality", locality), ("match_band", band)):
                begin = time.perf_counter()
                judge(source, candidate)
                filter_ms[name] += (time.perf_counter() - begin) * 1000.0
            judged += 1
        overhead = (total - spent[0]) / args.n * 1000.0
        print(
            f"{kind}: pipeline {spent[0] / args.n * 1000.0:.1f} ms/candidate (tiny, {args.steps} steps), "
            f"overhead {overhead:.1f} ms/candidate (target < 50), failures {dict(failures)}"
        )
        if judged:
            print(
                f"  filters on {judged} renders: locality {filter_ms['locality'] / judged:.1f} ms, "
                f"SIFT match band {filter_ms['match_band'] / judged:.1f} ms per candidate"
            )
    overhead_breakdown(images[3], args.resolution, 0.01, 12.0)


def sd15_inpaint_pipeline(device: str) -> Any:
    """A StableDiffusionInpaintPipeline of Stable Diffusion 1.5's size with random weights (no download)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="bench-tokenizer-")))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=9,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    millions = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in (("unet", unet), ("vae", vae))}
    millions["text_encoder"] = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    print("parameters (M): " + ", ".join(f"{name} {count:.0f}" for name, count in millions.items()))
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def unet_flops(unet: Any, side: int, device: Any, dtype: Any) -> int:
    """FLOPs of one UNet forward for one image (one guidance branch) at side x side pixels."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latent = side // 8
    sample = torch.randn(1, 9, latent, latent, device=device, dtype=dtype)
    text = torch.randn(1, 77, 768, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500], device=device), encoder_hidden_states=text)
    return int(counter.get_total_flops())


def gpu_benchmark(args: argparse.Namespace) -> None:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA (or pass --device cpu for a small smoke run)")
    images = normals(args.side)
    images = [images[i % len(images)] for i in range(args.batch)]
    specs = [DefectSpec("bench", "scratch", "", REGIONS["center"], 0.02, "blob", "darker", 0.6)] * args.batch
    start = time.perf_counter()
    pipeline = sd15_inpaint_pipeline(args.device)
    print(f"built the SD 1.5-size pipeline in {time.perf_counter() - start:.1f} s")
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}")
    for dtype_name in args.dtypes:
        config = DiffusionConfig(
            model="random-sd15-inpainting",
            device=args.device,
            dtype=dtype_name,
            steps=args.steps,
            batch_size=args.batch,
            resolution=args.side,
        )
        renderer = InpaintRenderer(config)
        renderer.pipeline = prepare_pipeline(pipeline, config, renderer.device, renderer.dtype)
        flops = unet_flops(renderer.pipeline.unet, args.side, renderer.device, renderer.dtype)
        rngs = [np.random.default_rng(i) for i in range(args.batch)]
        renderer.render_batch(images, specs, rngs)  # warm up (kernels, allocator)
        spent = time_pipeline(renderer)
        cuda = renderer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(renderer.device)
            torch.cuda.reset_peak_memory_stats(renderer.device)
        start = time.perf_counter()
        for repeat in range(args.repeats):
            rngs = [np.random.default_rng(1000 * repeat + i) for i in range(args.batch)]
            renderer.render_batch(images, specs, rngs)
        if cuda:
            torch.cuda.synchronize(renderer.device)
        total = time.perf_counter() - start
        count = args.batch * args.repeats
        memory = torch.cuda.max_memory_allocated(renderer.device) / 2**30 if cuda else float("nan")
        bound = flops * args.steps * 2 * count / (args.peak_tflops * 1e12)
        print(
            f"{dtype_name}: {count / total:.2f} images/s end to end, {count / spent[0]:.2f} images/s in the "
            f"pipeline ({args.side}x{args.side}, {args.steps} steps, batch {args.batch}); peak allocated "
            f"{memory:.2f} GiB; UNet {flops / 1e9:.1f} GFLOPs per image-step; UNet bound / pipeline time = "
            f"{bound / spent[0]:.1%} of {args.peak_tflops:.0f} TFLOPs"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="run the SD 1.5-size throughput benchmark")
    parser.add_argument("--n", type=int, default=16, help="CPU: candidates per renderer")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--resolution", type=int, default=512, help="CPU: working resolution of the pipeline")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (CPU 2, GPU 30)")
    parser.add_argument("--batch", type=int, default=8, help="candidates per pipeline call")
    parser.add_argument("--device", default="cuda", help="GPU part: device")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], help="GPU part: dtypes")
    parser.add_argument("--repeats", type=int, default=2, help="GPU part: timed batches per dtype")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # The tiny tokenizer spends one token per character, so long prompts are truncated: keep that quiet.
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    if args.gpu:
        args.steps = args.steps or 30
        gpu_benchmark(args)
    else:
        args.steps = args.steps or 2
        cpu_benchmark(args)


if __name__ == "__main__":
    main()

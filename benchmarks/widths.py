"""Pipelines at real transformer widths with reduced depth, and the timing loop, for benchmarks.

The text encoders and VAE are the tiny ones of `mmdit_probe.testing` (their cost is not what the
benchmarks measure); the transformers have the real widths:
SD3-M (hidden 1536, 24 heads of 64; 2 joint blocks) and Flux (hidden 3072, 24 heads of 128;
1 double-stream + 1 single-stream block). 512 px gives 1024 image tokens; text is 77 + 256 = 333
tokens for SD3 and 512 T5 tokens for Flux.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

import mmdit_probe
from mmdit_probe.testing import tiny_pipeline


def build(width: str, prompt: str | list[str], steps: int = 2, device: str = "cpu", dtype: str = "float32"):
    torch.manual_seed(0)
    if width == "sd3":
        base = tiny_pipeline("sd3")
        transformer = SD3Transformer2DModel(
            sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=base.transformer.config.joint_attention_dim,
            caption_projection_dim=1536, pooled_projection_dim=base.transformer.config.pooled_projection_dim,
            pos_embed_max_size=96)
        pipe = StableDiffusion3Pipeline(**{**base.components, "transformer": transformer})
        inputs = dict(guidance=7.0, max_sequence_length=256)
    else:
        base = tiny_pipeline("flux-dev")
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=base.transformer.config.joint_attention_dim,
            pooled_projection_dim=base.transformer.config.pooled_projection_dim, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
        pipe = FluxPipeline(**{**base.components, "transformer": transformer})
        inputs = dict(guidance=3.5, max_sequence_length=512)
    pipe.set_progress_bar_config(disable=True)
    probe = mmdit_probe.load(pipe, device=device, dtype=getattr(torch, dtype))
    return probe, probe.inputs(prompt, seed=0, steps=steps, height=512, width=512, output_type="latent", **inputs)


def machine(device: str = "cpu", dtype: str = "float32") -> dict:
    device = torch.cuda.get_device_name() if device == "cuda" else device
    return {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "device": device, "dtype": dtype}


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="e.g. cuda; results then go to files named *_cuda")
    parser.add_argument("--dtype", default="float32", help="e.g. bfloat16 on a GPU")


def results_stem(name: str, device: str, dtype: str) -> str:
    """File stem of a benchmark's results: the CPU float32 runs keep the plain name."""
    return name + "".join(f"_{part}" for part in (device, dtype) if part not in ("cpu", "float32"))


def median_seconds(modes: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each mode, timed interleaved (one of each per repeat) so that a noisy
    machine slows all modes alike; the first mode runs once beforehand as a warm-up. On a GPU each
    run is waited for, so that its time is the GPU's work and not only the launches."""
    next(iter(modes.values()))()
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, run in modes.items():
            start = time.perf_counter()
            run()
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(t) for mode, t in times.items()}

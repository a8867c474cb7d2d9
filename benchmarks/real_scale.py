"""Recording and editing at the size users run: each preset's transformer at full depth and width, 1024².

    # on a GPU (the issue's targets are read from this run):
    python benchmarks/real_scale.py --device cuda --dtype bfloat16 --presets sd3-medium flux.1-dev sd3.5-large
    # on the CPU, the same code at reduced depth and size (a smoke run):
    python benchmarks/real_scale.py --presets sd3-medium flux.1-dev --layers 2 --resolution 256 --steps 2

Each transformer has its checkpoint's real configuration (SD3-M 24 blocks x 1536; SD3.5-M with `attn2`
in blocks 0-12; SD3.5-L 38 x 2432; Flux.1-dev 19 double + 38 single x 3072) and random weights made
directly on the device in the chosen dtype: timings and memory do not depend on the values, and
nothing is downloaded. The text encoders are the one-layer ones of `mmdit_probe.testing` (only the
transformer's input projection of their embeddings is narrower than the real model's), but the token
counts are real: 1024² gives 4096 image tokens; text is 77 CLIP + 256 T5 (SD3) or 512 T5 (Flux).
Latents are returned, so the VAE is not timed either. The preset's stock scheduler and defaults.

Modes, interleaved in one process (one run of each per repeat, after a warm-up of each), each run
waited for; the peak of allocated GPU memory is read per run:

  plain         the stock pipeline (taps removed)
  plain_half    the same with half the steps: with plain, shows the per-step time is constant
  traced        the tapped pipeline under an nnsight trace, no intervention
  record        T2I + I2T of every block and step (the prompt's tokens): `generate(record=True)`
  record_top5   the same for the preset's top-5 blocks only
  record_concepts  record plus four concept tokens (`concepts=`; each block runs again on them)
  naive         what peers do: an explicit joint softmax per block and step, then the T2I / I2T slices
  plain2        the stock pipeline on a batch of two prompts
  edit          q/k injection + local blending with the preset's defaults (a batch of two)

For a 24 GB card, `--quantize int8` (torchao int8 weight-only transformer) and `--offload` (model
CPU offload) measure the peak a consumer GPU would need, on the modes chosen with `--modes`.

Writes benchmarks/results/real_scale_<device>[_<dtype>][_int8][_offload]_<preset>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from attention_overhead import CONCEPTS, PROMPT, naive
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging
from widths import machine

import mmdit_probe
from mmdit_probe.presets import preset
from mmdit_probe.testing import tiny_pipeline

RESULTS = Path(__file__).parent / "results"
TARGET = "a photo of a black dog sitting on a wooden table next to a window"
MODES = ("plain", "plain_half", "traced", "record", "record_top5", "record_concepts", "naive", "plain2", "edit")

# The checkpoints' transformer configurations (their config.json), less the text-embedding widths.
CONFIGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
    "flux.1-dev": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
}
TARGETS = {  # figure: (target, stretch, higher is better)
    "record / plain": (1.10, 1.03, False),
    "edit / plain2": (1.15, 1.05, False),
    "traced / plain": (1.02, None, False),
    "naive / record": (2.0, None, True),
    "record extra peak GPU memory / plain": (0.05, None, False),
}


def build(name: str, device: str, dtype: torch.dtype, layers: int | None, resolution: int, steps: int):
    """A probe over the preset's transformer (random weights, made on `device` in `dtype`) and its inputs."""
    family = preset(name).family
    base = tiny_pipeline("sd3" if family == "sd3" else "flux-dev")
    config = dict(CONFIGS[name])
    if layers is not None:  # reduced depth, for a CPU run
        for key in ("num_layers", "num_single_layers"):
            if key in config:
                config[key] = min(config[key], layers)
        if "dual_attention_layers" in config:
            config["dual_attention_layers"] = tuple(range(min(13, layers)))
    text = base.transformer.config
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    with torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            if family == "sd3":
                transformer = SD3Transformer2DModel(
                    sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                    joint_attention_dim=text.joint_attention_dim, pooled_projection_dim=text.pooled_projection_dim,
                    **config)
            else:
                transformer = FluxTransformer2DModel(
                    patch_size=1, in_channels=64, joint_attention_dim=text.joint_attention_dim,
                    pooled_projection_dim=text.pooled_projection_dim, **config)
        finally:
            torch.set_default_dtype(default)
    pipeline_class = StableDiffusion3Pipeline if family == "sd3" else FluxPipeline
    pipe = pipeline_class(**{**base.components, "transformer": transformer})
    pipe.set_progress_bar_config(disable=True)
    probe = mmdit_probe.load(pipe, device=device, dtype=dtype, preset=name)
    inputs = probe.inputs(PROMPT, seed=0, steps=steps, height=resolution, width=resolution, output_type="latent")
    return probe, inputs


def modes(probe, inputs) -> dict:
    generation = {k: inputs[k] for k in ("height", "width", "max_sequence_length", "output_type")}
    generation.update(steps=inputs["num_inference_steps"], guidance=inputs["guidance_scale"])
    top5 = [b for b in probe.preset.top_layers if b < probe.family.num_blocks] or [0]
    pair = probe.inputs([PROMPT, TARGET], seed=0, steps=generation["steps"], guidance=generation["guidance"],
                        height=inputs["height"], width=inputs["width"], output_type="latent")

    def stock(arguments):
        probe.family.remove_taps()
        try:
            probe.pipeline(**arguments)
        finally:
            probe.family.install_taps()

    def traced():
        with probe.model.generate(**inputs):
            probe.model.output.save()

    half = {**inputs, "num_inference_steps": max(1, inputs["num_inference_steps"] // 2)}
    return {
        "plain": lambda: stock(inputs),
        "plain_half": lambda: stock(half),
        "traced": traced,
        "record": lambda: probe.generate(PROMPT, record=True, **generation),
        "record_top5": lambda: probe.generate(PROMPT, record={"blocks": top5}, **generation),
        "record_concepts": lambda: probe.generate(PROMPT, record=True, concepts=CONCEPTS, **generation),
        "naive": lambda: naive(probe, inputs),
        "plain2": lambda: stock(pair),
        "edit": lambda: probe.edit(PROMPT, TARGET, seed=0, **generation),
    }


def measure(runs: dict, repeats: int, on_gpu: bool) -> tuple[dict, dict]:
    """Median seconds and peak GPU memory (MB) of each mode, interleaved, after one warm-up of each."""
    seconds: dict[str, list[float]] = {m: [] for m in runs}
    peak: dict[str, float] = {}
    for repeat in range(repeats + 1):
        for mode, run in runs.items():
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run()
            if on_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if repeat:  # the first round warms up
                seconds[mode].append(elapsed)
            if on_gpu:
                peak[mode] = max(peak.get(mode, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return {m: statistics.median(t) for m, t in seconds.items()}, peak


RATIOS = {"record / plain": ("record", "plain"), "record_top5 / plain": ("record_top5", "plain"),
          "edit / plain2": ("edit", "plain2"), "traced / plain": ("traced", "plain"),
          "naive / record": ("naive", "record"), "record_concepts / record": ("record_concepts", "record")}


def figures(seconds: dict, peak: dict) -> dict:
    """The issue's figures, for the modes that were run."""
    out = {f: seconds[a] / seconds[b] for f, (a, b) in RATIOS.items() if a in seconds and b in seconds}
    for mode, base in (("record", "plain"), ("edit", "plain2")):
        if mode in peak and base in peak:
            out[f"{mode} extra peak GPU memory / {base}"] = (peak[mode] - peak[base]) / peak[base]
    return out


def verdict(figure: str, value: float) -> str:
    if figure not in TARGETS:
        return ""
    target, stretch, higher = TARGETS[figure]
    met = (lambda bound: value >= bound) if higher else (lambda bound: value <= bound)
    if stretch is not None and met(stretch):
        return "stretch met"
    return "met" if met(target) else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=["sd3-medium", "flux.1-dev"], choices=list(CONFIGS))
    parser.add_argument("--device", default="cpu", help="cuda for the real measurement")
    parser.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--layers", type=int, help="cap the number of blocks (and Flux single blocks): a CPU run")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--quantize", choices=["int8"], help="torchao int8 weight-only transformer")
    parser.add_argument("--offload", action="store_true", help="model CPU offload (enable_model_cpu_offload)")
    args = parser.parse_args()
    logging.disable_progress_bar()
    dtype = getattr(torch, args.dtype)
    on_gpu = args.device.startswith("cuda")
    setting = {**machine("cuda" if on_gpu else args.device, args.dtype), "steps": args.steps,
               "resolution": args.resolution, "layers_capped_at": args.layers, "repeats": args.repeats,
               "quantize": args.quantize, "offload": args.offload}
    stem = "real_scale_" + "_".join([args.device.split(":")[0]] + [part for part in (
        "" if args.dtype == "float32" else args.dtype, args.quantize or "", "offload" if args.offload else "") if part])
    RESULTS.mkdir(exist_ok=True)
    for name in args.presets:
        probe, inputs = build(name, args.device, dtype, args.layers, args.resolution, args.steps)
        if args.quantize:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(probe.pipeline.transformer, Int8WeightOnlyConfig())
        if args.offload:
            probe.pipeline.enable_model_cpu_offload(device=args.device)
        rows, cols = probe.grid(args.resolution, args.resolution)
        runs = modes(probe, inputs)
        seconds, peak = measure({m: runs[m] for m in args.modes}, args.repeats, on_gpu)
        half = max(1, args.steps // 2)
        result = {
            **setting, "preset": name, "blocks": probe.family.num_blocks, "image_tokens": rows * cols,
            "text_tokens": probe.family.text_length(inputs["max_sequence_length"]),
            "top5": [b for b in probe.preset.top_layers if b < probe.family.num_blocks],
            "seconds": seconds, "peak_gpu_mb": peak,
            "seconds_per_step": {m: seconds[m] / (half if m == "plain_half" else args.steps) for m in seconds},
            "figures": figures(seconds, peak),
        }
        del probe, runs
        if on_gpu:
            torch.cuda.empty_cache()
        # One file pair per preset, written at once: a later preset's failure keeps the earlier results.
        (RESULTS / f"{stem}_{name}.json").write_text(json.dumps(result, indent=2))
        (RESULTS / f"{stem}_{name}.md").write_text(markdown(result))
        print(markdown(result), flush=True)


def markdown(r: dict) -> str:
    lines = [f"# {r['preset']}: {r['blocks']} blocks, {r['image_tokens']} image + {r['text_tokens']} text tokens", "",
             f"{r['device']}, torch {r['torch']}, {r['dtype']}, {r['resolution']}², {r['steps']} steps, "
             f"median of {r['repeats']}"
             + (f", blocks capped at {r['layers_capped_at']}" if r["layers_capped_at"] else "")
             + (", int8 weight-only transformer" if r["quantize"] else "")
             + (", model CPU offload" if r["offload"] else "") + ".", "",
             "| mode | seconds | s / step | peak GPU MB |", "|---|---|---|---|"]
    for mode, seconds in r["seconds"].items():
        memory = f"{r['peak_gpu_mb'][mode]:.0f}" if r["peak_gpu_mb"] else "-"
        lines.append(f"| {mode} | {seconds:.3f} | {r['seconds_per_step'][mode]:.4f} | {memory} |")
    lines += ["", "| figure | value | target |", "|---|---|---|"]
    lines += [f"| {f} | {v:.3f} | {verdict(f, v)} |" for f, v in r["figures"].items()]
    return "\n".join(lines) + "\n"

if __name__ == "__main__":
    main()

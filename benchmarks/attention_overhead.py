"""Cost of recording T2I + I2T maps for every block and step, against the plain pipeline.

    python benchmarks/attention_overhead.py                 # writes benchmarks/results/attention_overhead.{json,md}

Real transformer widths with reduced depth and tiny text encoders / VAE (their cost is not what is
measured): SD3-M width (hidden 1536, 24 heads of 64; 2 joint blocks) and Flux width (hidden 3072,
24 heads of 128; 1 double + 1 single block), 512 px images = 1024 image tokens, 333 (SD3) or 512
(Flux) text tokens, 2 denoising steps. Modes, timed interleaved in one process (median of repeats):

  plain     the stock pipeline (taps removed)
  traced    the tapped pipeline under an nnsight trace, no intervention
  record    `probe.generate(record=True)`: T2I + I2T, all blocks and steps, real text positions
  record_all  the same over all text positions (padding included)
  record_concepts  `record` plus four concept tokens (`concepts=`): each block runs a second time on them
  naive     what peers do: softmax over the full joint attention matrix, then slice T2I / I2T

Peak memory is measured per mode: on the CPU as max RSS in a child process, on a GPU as the peak
of allocated GPU memory (`--device cuda`, results in attention_overhead_cuda*).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch
from diffusers.utils import logging
from widths import add_device_arguments, build, machine, median_seconds, results_stem

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photo of a red cat sitting on a wooden table next to a window"
MODES = ("plain", "traced", "record", "record_all", "record_concepts", "naive")
CONCEPTS = ["cat", "table", "window", "background"]


def naive(probe, inputs) -> list[torch.Tensor]:
    """Explicit joint softmax per block and step, then the T2I / I2T slices (head mean, cond half)."""
    kept = []
    with probe.model.generate(**inputs) as tracer:
        for _ in tracer.iter[0:inputs["num_inference_steps"]]:
            for block in range(probe.family.num_blocks):
                q_img, k_img, q_txt, k_txt = (probe.hook(f"blocks.{block}.attn.hook_{n}").output
                                              for n in ("q_img", "k_img", "q_txt", "k_txt"))
                q, k = torch.cat([q_img, q_txt], dim=2)[-1:], torch.cat([k_img, k_txt], dim=2)[-1:]
                p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                n = q_img.shape[2]
                kept.append(p[:, :, :n, n:].mean(1).half())
                kept.append(p[:, :, n:, :n].mean(1).half())
    return kept


def run(mode: str, probe, inputs) -> None:
    if mode == "plain":
        probe.family.remove_taps()
        probe.pipeline(**inputs)
        probe.family.install_taps()
    elif mode == "traced":
        with probe.model.generate(**inputs):
            probe.model.output.save()
    elif mode == "record":
        probe.generate(inputs["prompt"], record=True, **_generate_args(inputs))
    elif mode == "record_all":
        probe.generate(inputs["prompt"], record={"positions": "all"}, **_generate_args(inputs))
    elif mode == "record_concepts":
        probe.generate(inputs["prompt"], record=True, concepts=CONCEPTS, **_generate_args(inputs))
    elif mode == "naive":
        naive(probe, inputs)


def _generate_args(inputs):
    return {"steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"], "height": inputs["height"],
            "width": inputs["width"], "max_sequence_length": inputs["max_sequence_length"], "output_type": "latent"}


def child(width: str, mode: str, dtype: str) -> None:
    probe, inputs = build(width, PROMPT, dtype=dtype)
    run(mode, probe, inputs)
    print(json.dumps({"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory_mb(mode: str, width: str, probe, inputs, device: str, dtype: str) -> float:
    """Peak memory of one run of `mode`: GPU memory allocated, or the CPU process's max RSS."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run(mode, probe, inputs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    out = subprocess.run([sys.executable, __file__, "--child", width, mode, dtype], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["max_rss_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", nargs="*", default=["sd3", "flux"])
    add_device_arguments(parser)
    parser.add_argument("--child", nargs=3, metavar=("WIDTH", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.disable_progress_bar()
    if args.child:
        return child(*args.child)
    results = {**machine(args.device, args.dtype), "widths": {}}
    memory_key = "peak_gpu_mb" if args.device == "cuda" else "max_rss_mb"
    for width in args.widths:
        probe, inputs = build(width, PROMPT, device=args.device, dtype=args.dtype)
        median = median_seconds({mode: partial(run, mode, probe, inputs) for mode in MODES}, args.repeats)
        memory = {mode: peak_memory_mb(mode, width, probe, inputs, args.device, args.dtype) for mode in MODES}
        n_text = probe.family.text_length(inputs["max_sequence_length"])
        results["widths"][width] = {
            "image_tokens": probe.grid(512, 512)[0] * probe.grid(512, 512)[1], "text_tokens": n_text,
            "blocks": probe.family.num_blocks, "steps": inputs["num_inference_steps"],
            "seconds": median, "ratio_to_plain": {m: median[m] / median["plain"] for m in MODES},
            memory_key: memory,
        }
        print(width, json.dumps(results["widths"][width], indent=1))
    RESULTS.mkdir(exist_ok=True)
    stem = results_stem("attention_overhead", args.device, args.dtype)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    memory_label = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    lines = [f"Attention recording overhead ({results['machine']}, torch {results['torch']}, {results['device']}, "
             f"{args.dtype})", "",
             f"| width | image / text tokens | mode | seconds | × plain | {memory_label} |",
             "|---|---|---|---|---|---|"]
    for width, r in results["widths"].items():
        for m in MODES:
            lines.append(f"| {width} | {r['image_tokens']} / {r['text_tokens']} | {m} | {r['seconds'][m]:.2f} | "
                         f"{r['ratio_to_plain'][m]:.2f} | {r[memory_key][m]:.0f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Reconstruction error of every inversion method, on the tiny models and on rendered toy scenes.

    python benchmarks/inversion_methods.py     # writes benchmarks/results/inversion_methods.{json,md}

Each method is paired with the sampler it inverts: euler, heun and fixed-point with the pipeline's
Euler scheduler, rf-solver and fireflow with their own (`inversion.sample_latents`).

- Tiny models (random weights, 64x64, 4 and 8 steps): a prompt's noise is sampled to a clean latent
  with the method's sampler, inverted, and compared with the noise (mean |error| / mean |noise|).
- Toy model (the Shapes world, 20 steps, guidance 4): held-out scenes *rendered* (never generated) are
  inverted with their caption and regenerated (`probe.invert(check=True)`): mean absolute pixel error
  (0-255); and inverted at guidance 1 (no CFG; RF-Solver's and FireFlow's published setting), then
  regenerated at guidance 4.

Model calls are transformer forward calls per inversion (one call is a whole batch, both CFG halves).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging

import mmdit_probe
from mmdit_probe.editing.inversion import (
    METHODS,
    SOLVERS,
    _encode,
    as_image,
    decode,
    invert_latents,
    pixel_error,
    sample_latents,
)
from mmdit_probe.testing import TINY_GENERATION_KWARGS, TINY_KINDS, save_tiny_pipeline
from mmdit_probe.toy.evaluate_edits import CallCounter
from mmdit_probe.toy.world import caption, render, sample_split_scene

RESULTS = Path(__file__).parent / "results"
PROMPT = "a red cat on a mat"


def tiny(kind: str, root: Path, steps: int) -> dict[str, dict]:
    probe = mmdit_probe.load(str(save_tiny_pipeline(kind, root / kind)))
    probe.pipeline.set_progress_bar_config(disable=True)
    kw = TINY_GENERATION_KWARGS[kind]
    generation = {"steps": steps, "guidance": kw["guidance_scale"], "height": kw["height"], "width": kw["width"],
                  "max_sequence_length": kw["max_sequence_length"]}
    inputs = probe.inputs(PROMPT, seed=0, output_type="latent", **generation)
    noise = inputs["latents"]
    counter = CallCounter(probe)
    found = {}
    for method in METHODS:
        if method in SOLVERS:
            clean = sample_latents(probe, inputs, method)
        else:
            clean = probe.pipeline(**inputs).images
            clean = probe.family.pack_latents(clean) if clean.ndim == 4 and probe.family.name == "flux" else clean
        counter.calls = 0
        inverted = invert_latents(probe, clean, PROMPT, method=method, **generation)
        found[method] = {"relative_error": ((inverted - noise).abs().mean() / noise.abs().mean()).item(),
                         "model_calls": counter.calls}
    counter.handle.remove()
    return found


def regenerate(probe, latents, prompt: str, method: str):
    """The image the method's own sampler makes from `latents` at the model's guidance."""
    inputs = probe.inputs(prompt, seed=0, latents=latents)
    if method in SOLVERS:
        return decode(probe, sample_latents(probe, inputs, method), inputs["height"], inputs["width"])[0]
    return probe.pipeline(**inputs).images[0]


def toy(n: int, seed: int) -> dict[str, dict]:
    """Rendered scenes inverted at the sampling guidance (`probe.invert`), and at guidance 1 (RF-Solver's
    and FireFlow's published setting; no CFG), each regenerated at the sampling guidance."""
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    scenes = [sample_split_scene(rng, held_out=True) for _ in range(n)]
    counter = CallCounter(probe)
    found = {}
    for method in METHODS:
        errors = [probe.invert(render(s)[0], caption(s), method=method).error for s in scenes]
        at_one = []
        for s in scenes:
            image = render(s)[0]
            height, width = image.shape[:2]
            clean = _encode(probe, as_image(image, (width, height)), height, width)
            latents = invert_latents(probe, clean, caption(s), method=method, guidance=1.0)
            at_one.append(pixel_error(regenerate(probe, latents, caption(s), method), image))
        # Cost of the inversion alone (without the check's regeneration), on the first scene.
        counter.calls = 0
        start = time.perf_counter()
        probe.invert(render(scenes[0])[0], caption(scenes[0]), method=method, check=False)
        found[method] = {"pixel_error": float(np.mean(errors)), "pixel_error_median": float(np.median(errors)),
                         "diverged": int(np.sum(np.array(errors) > 50)),
                         "pixel_error_inverted_at_guidance_1": float(np.mean(at_one)),
                         "pixel_error_inverted_at_guidance_1_median": float(np.median(at_one)),
                         "model_calls": counter.calls, "seconds": time.perf_counter() - start,
                         "per_scene": [float(e) for e in errors], "per_scene_inverted_at_guidance_1": at_one}
    counter.handle.remove()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=12, help="rendered toy scenes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    report = {"n_toy_scenes": args.n, "tiny": {}, "toy": toy(args.n, args.seed)}
    with tempfile.TemporaryDirectory() as root:
        for kind in TINY_KINDS:
            for steps in (4, 8):
                report["tiny"][f"{kind}, {steps} steps"] = tiny(kind, Path(root), steps)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "inversion_methods.json").write_text(json.dumps(report, indent=2))
    lines = [f"| model | {' | '.join(METHODS)} |", "|---|" + "---|" * len(METHODS)]
    toy_row = report["toy"]
    lines.append(f"| toy, rendered scenes (n={args.n}), pixel error 0-255, mean (median; diverged > 50) | "
                 + " | ".join(f"{toy_row[m]['pixel_error']:.1f} ({toy_row[m]['pixel_error_median']:.1f}; "
                              f"{toy_row[m]['diverged']})" for m in METHODS) + " |")
    lines.append("| same, inverted at guidance 1, regenerated at 4: mean (median) | "
                 + " | ".join(f"{toy_row[m]['pixel_error_inverted_at_guidance_1']:.1f} "
                              f"({toy_row[m]['pixel_error_inverted_at_guidance_1_median']:.1f})" for m in METHODS)
                 + " |")
    lines.append("| toy, model calls per inversion (20 steps) | "
                 + " | ".join(str(toy_row[m]["model_calls"]) for m in METHODS) + " |")
    lines.append("| toy, seconds per inversion (2 CPU cores, shared) | "
                 + " | ".join(f"{toy_row[m]['seconds']:.1f}" for m in METHODS) + " |")
    for name, row in report["tiny"].items():
        lines.append(f"| tiny {name}, relative latent error | "
                     + " | ".join(f"{row[m]['relative_error']:.4f}" for m in METHODS) + " |")
    (RESULTS / "inversion_methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

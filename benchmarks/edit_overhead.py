"""Cost of one edit (q/k injection + local blending) against a plain batch-of-two generation.

    python benchmarks/edit_overhead.py        # writes benchmarks/results/edit_overhead.{json,md}

Same settings side by side, timed interleaved in one process (median of repeats), at SD3-M width
and Flux width (see widths.py). The edit uses the paper's defaults: image q/k injected in every
block for the first 20% of the steps, local blending from the T2I maps of the edited words in the
top blocks (here: all blocks of these shallow models) for the first 50%.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers.utils import logging
from widths import add_device_arguments, build, machine, median_seconds, results_stem

RESULTS = Path(__file__).parent / "results"
SOURCE = "a photo of a red cat sitting on a wooden table next to a window"
TARGET = "a photo of a black dog sitting on a wooden table next to a window"


def measure(width: str, steps: int, repeats: int, device: str = "cpu", dtype: str = "float32") -> dict:
    probe, inputs = build(width, [SOURCE, TARGET], steps=steps, device=device, dtype=dtype)
    generation = {"steps": steps, "guidance": inputs["guidance_scale"], "height": inputs["height"],
                  "width": inputs["width"], "max_sequence_length": inputs["max_sequence_length"],
                  "output_type": "latent"}
    every_block = list(range(probe.family.num_blocks))
    modes = {
        "plain": lambda: probe.pipeline(**inputs),
        "edit": lambda: probe.edit(SOURCE, TARGET, seed=0, blend_blocks=every_block, **generation),
        "edit_no_blend": lambda: probe.edit(SOURCE, TARGET, seed=0, local_blend=False, **generation),
    }
    median = median_seconds(modes, repeats)
    return {"steps": steps, "seconds": median, "ratio_to_plain": {m: median[m] / median["plain"] for m in modes}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--widths", nargs="*", default=["sd3", "flux"])
    add_device_arguments(parser)
    args = parser.parse_args()
    logging.disable_progress_bar()
    results = {**machine(args.device, args.dtype), "widths": {}}
    for width in args.widths:
        results["widths"][width] = measure(width, args.steps, args.repeats, args.device, args.dtype)
        print(width, json.dumps(results["widths"][width], indent=1))
    RESULTS.mkdir(exist_ok=True)
    stem = results_stem("edit_overhead", args.device, args.dtype)
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    lines = [f"Edit overhead ({results['machine']}, torch {results['torch']}, {results['device']}, {args.dtype})", "",
             "| width | steps | mode | seconds | × plain batch of two |", "|---|---|---|---|---|"]
    for width, r in results["widths"].items():
        for m, seconds in r["seconds"].items():
            lines.append(f"| {width} | {r['steps']} | {m} | {seconds:.2f} | {r['ratio_to_plain'][m]:.3f} |")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

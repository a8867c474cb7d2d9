"""Attention-region replacement (I2I, T2I, I2T, T2T) without the score matrix, beside the explicit one.

One joint attention layer at real widths, batch [source, target]: SD3-M (24 heads of 64, text 77 + 256 tokens,
image first) and Flux (24 heads of 128, 512 T5 tokens, text first); `--resolution` sets the image tokens
((resolution / 16)^2: 4096 at 1024 px). Three modes per region:

- plain: the layer's own attention (`scaled_dot_product_attention`), nothing replaced;
- ours: `RegionReplacement`, the editor's attention step (two attention calls over the key subsets combined
  through their log-sum-exps, `kernels.region_attention`);
- explicit: the released code's way, the full (L+S)^2 score matrix per head, the region copied from the source's,
  softmax, times the values.

Each mode's time is the median of interleaved runs; its peak memory is the GPU's peak allocation above the inputs
(`--device cuda`), or on the CPU (Linux) the rise of the peak RSS over one run after a warm-up, in a fresh child
process (coarse: the allocator reuses freed pages). The largest difference between ours and explicit is reported.

    python benchmarks/region_replacement.py --resolution 256            # CPU, small: results/region_replacement.*
    python benchmarks/region_replacement.py --device cuda --resolution 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from widths import machine, median_seconds, results_stem

from mmdit_probe.constants import REPLACEMENTS
from mmdit_probe.editing.qk_injection import RegionReplacement

WIDTHS = {"sd3": {"heads": 24, "dim": 64, "text": 333, "image_first": True},
          "flux": {"heads": 24, "dim": 128, "text": 512, "image_first": False}}
MODES = ("plain", "ours", "explicit")


def layer(width: str, resolution: int, device: str, dtype: torch.dtype):
    """q, k, v of [source, target] and each stream's slice in the joint sequence."""
    w = WIDTHS[width]
    n_image = (resolution // 16) ** 2
    n = n_image + w["text"]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, w["heads"], n, w["dim"], generator=generator).to(device, dtype) for _ in range(3))
    image = slice(0, n_image) if w["image_first"] else slice(w["text"], None)
    text = slice(n_image, None) if w["image_first"] else slice(0, w["text"])
    return q, k, v, {"img": image, "txt": text}


def explicit(q, k, v, streams, region: str) -> torch.Tensor:
    rows, cols = (streams[s] for s in REPLACEMENTS[region])
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    scores[1:, :, rows, cols] = scores[:1, :, rows, cols]  # the source's: q and k of row 0 against each other
    return scores.softmax(-1) @ v


def ours(q, k, v, streams, region: str) -> torch.Tensor:
    def stock():
        return F.scaled_dot_product_attention(q, k, v), None

    return RegionReplacement(region, steps=[0])(q, k, v, streams, stock)[0]


def run(mode: str, q, k, v, streams, region: str) -> torch.Tensor:
    if mode == "plain":
        return F.scaled_dot_product_attention(q, k, v)
    return (ours if mode == "ours" else explicit)(q, k, v, streams, region)


def _status_kb(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def child(width: str, resolution: int, region: str, mode: str, dtype: str) -> None:
    q, k, v, streams = layer(width, resolution, "cpu", getattr(torch, dtype))
    run(mode, q, k, v, streams, region)  # warm-up: a fused kernel is checked once per shape (`kernels`), not per call
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS (VmHWM) starts again from the current RSS
    before = _status_kb("VmRSS")
    run(mode, q, k, v, streams, region)
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def peak_mb(width, resolution, region, mode, device, dtype, tensors) -> float:
    if device == "cuda":  # warmed up by the timing
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(mode, *tensors, region)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    out = subprocess.run([sys.executable, __file__, "--child", width, str(resolution), region, mode, dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (16 px a token)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--regions", nargs="+", default=list(REPLACEMENTS), choices=list(REPLACEMENTS))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        width, resolution, region, mode, dtype = args.child
        return child(width, int(resolution), region, mode, dtype)
    dtype = getattr(torch, args.dtype)
    rows = []
    for width in WIDTHS:
        tensors = layer(width, args.resolution, args.device, dtype)
        for region in args.regions:
            seconds = median_seconds({m: (lambda m=m, t=tensors, r=region: run(m, *t, r)) for m in MODES},
                                     args.repeats)
            error = (ours(*tensors, region).float() - explicit(*tensors, region).float()).abs().max().item()
            memory = {m: peak_mb(width, args.resolution, region, m, args.device, args.dtype, tensors) for m in MODES}
            rows.append({"width": width, "region": region, "image_tokens": tensors[0].shape[2] - WIDTHS[width]["text"],
                         "text_tokens": WIDTHS[width]["text"], "seconds": seconds, "peak_mb": memory,
                         "max_abs_difference_ours_vs_explicit": error})
            print(rows[-1], flush=True)
    stem = results_stem(f"region_replacement_{args.resolution}px", args.device, args.dtype)
    folder = Path(__file__).parent / "results"
    (folder / f"{stem}.json").write_text(json.dumps({**machine(args.device, args.dtype), "rows": rows}, indent=2))
    lines = [f"# Region replacement, one attention layer, batch 2, {args.resolution} px ({args.device}, {args.dtype})",
             "", "| width | region | image / text tokens | plain s | ours s | explicit s | plain MB | ours MB | "
             "explicit MB | max abs diff |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, m = r["seconds"], r["peak_mb"]
        lines.append(f"| {r['width']} | {r['region']} | {r['image_tokens']} / {r['text_tokens']} | {s['plain']:.4f} | "
                     f"{s['ours']:.4f} | {s['explicit']:.4f} | {m['plain']:.0f} | {m['ours']:.0f} | "
                     f"{m['explicit']:.0f} | {r['max_abs_difference_ours_vs_explicit']:.2e} |")
    (folder / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

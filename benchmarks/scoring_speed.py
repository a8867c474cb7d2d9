"""Pixel scoring at 1024 px: `score_map` one map at a time against `score_maps` in batches.

    python benchmarks/scoring_speed.py          # writes benchmarks/results/scoring_speed.json

64x64 maps (SD3 at 1024 px) against one 1024x1024 mask, on the CPU; a sweep of SD3-medium scores
24 blocks x 28 steps = 672 such maps per word, kind and grid. Checks that both give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from mmdit_probe.metrics import METRICS, score_map, score_maps


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--maps", type=int, default=128)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scoring_speed.json")
    args = parser.parse_args()
    maps = torch.rand(args.maps, args.grid, args.grid, generator=torch.Generator().manual_seed(0))
    rows, cols = torch.meshgrid(torch.arange(args.size), torch.arange(args.size), indexing="ij")
    mask = ((rows - args.size / 2) ** 2 + (cols - args.size / 3) ** 2 < (args.size / 4) ** 2).numpy()

    single = [score_map(m, mask) for m in maps]
    batched = {k: [] for k in METRICS}
    for chunk in maps.split(16):
        for k, v in score_maps(chunk, mask).items():
            batched[k] += v.tolist()
    assert all(single[i][k] == batched[k][i] for i in range(args.maps) for k in METRICS), "batched != single"

    results = {"maps": args.maps, "grid": args.grid, "mask": args.size, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "seconds": {"score_map loop": best_of(args.repeats, lambda: [score_map(m, mask) for m in maps])}}
    for chunk in (4, 16, 64):
        name = f"score_maps, {chunk} a call ({chunk * args.size ** 2 * 4 >> 20} MB upsampled)"
        results["seconds"][name] = best_of(args.repeats, lambda c=chunk: [score_maps(m, mask) for m in maps.split(c)])
    loop = results["seconds"]["score_map loop"]
    results["ms_per_map"] = {k: round(1000 * v / args.maps, 2) for k, v in results["seconds"].items()}
    results["speedup"] = {k: round(loop / v, 2) for k, v in results["seconds"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

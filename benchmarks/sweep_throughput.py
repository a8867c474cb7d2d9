"""Sweep throughput on the CPU, toy model: prompts per minute for one and two processes, bytes per prompt.

    python benchmarks/sweep_throughput.py            # writes benchmarks/results/sweep_throughput.json

Runs the real command (`mmdit-probe sweep`, and under `torchrun --nproc_per_node 2`) on the same
prompts. "end_to_end" counts the whole command (imports and model loading included); "steady"
counts from the first record written to the last, so it is the rate a long sweep approaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def run(processes: int, out: Path, n: int, steps: int) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "mmdit_probe.cli", "sweep", "toy",
               "--prompts", "toy", "--num-prompts", str(n), "--steps", str(steps), "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    records = sorted((out / "records").glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    span = records[-1].stat().st_mtime - records[0].stat().st_mtime
    sizes = [p.stat().st_size for p in records]
    return {
        "processes": processes,
        "prompts": len(records),
        "wall_s": round(wall, 2),
        "end_to_end_prompts_per_minute": round(60 * len(records) / wall, 1),
        # The first record marks the start, so it is not counted; with two processes the first two
        # finish together, which makes this slightly optimistic for 2 and exact for 1.
        "steady_prompts_per_minute": round(60 * (len(records) - 1) / span, 1),
        "record_bytes_per_prompt": round(sum(sizes) / len(sizes)),
        "parquet_bytes_per_prompt": round((out / "scores.parquet").stat().st_size / len(records)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=24, help="toy prompts")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (all recorded)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_throughput.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            results.append(run(processes, Path(tmp) / f"p{processes}", args.n, args.steps))
            print(results[-1])
    report = {
        "what": f"mmdit-probe sweep toy --prompts toy --num-prompts {args.n} --steps {args.steps}: all 6 blocks x "
                f"{args.steps} steps x T2I/I2T x content words x 4 metrics x pixels/tokens",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

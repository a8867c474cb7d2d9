"""Where a recording run's time goes, beside the plain run and the naive joint softmax: a torch
profile of three runs of each mode at SD3-M width (see widths.py), top operators first.

    python benchmarks/where_time_goes.py --device cuda --dtype bfloat16   # results/where_time_goes_cuda_bfloat16.txt
"""

from __future__ import annotations

import argparse

import torch
from attention_overhead import PROMPT, RESULTS, run
from diffusers.utils import logging
from torch.profiler import ProfilerActivity, profile
from widths import add_device_arguments, build, results_stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    args = parser.parse_args()
    logging.disable_progress_bar()
    probe, inputs = build("sd3", PROMPT, device=args.device, dtype=args.dtype)
    on_gpu = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    tables = []
    for mode in ("plain", "record", "naive"):
        for _ in range(2):  # warm-up
            run(mode, probe, inputs)
        with profile(activities=activities) as prof:
            for _ in range(3):
                run(mode, probe, inputs)
            if on_gpu:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else "cpu_time_total", row_limit=18,
                                          max_name_column_width=60)
        tables.append(f"===== {mode} (3 runs)\n{table}")
        print(tables[-1])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{results_stem('where_time_goes', args.device, args.dtype)}.txt").write_text("\n".join(tables))


if __name__ == "__main__":
    main()

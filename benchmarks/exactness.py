"""The suite's exactness checks on another device (the tests themselves run on the CPU).

    python benchmarks/exactness.py --device cuda      # writes benchmarks/results/exactness_cuda.json

On every tiny family, loaded with `mmdit_probe.load(..., device=...)`:
- the largest difference between recorded per-head T2I / I2T maps and an explicit float32 softmax
  of the same q and k (off the CPU, each query's log-sum-exp comes from `kernels.chunked_logsumexp`
  instead of the CPU flash kernel);
- whether recording changes any output bit, and whether installing taps does (against the stock
  pipeline loaded from the same directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_inputs  # noqa: E402
from test_attention import cfg_rows, record_with_reference, reference  # noqa: E402

import mmdit_probe  # noqa: E402
from mmdit_probe.testing import TINY_KINDS, save_tiny_pipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def check(kind: str, directory: Path, device: str) -> dict:
    path = save_tiny_pipeline(kind, directory)
    probe = mmdit_probe.load(path, device=device)
    maps, seen, inputs, output = record_with_reference(probe, kind, heads="all", rows=cfg_rows(kind), positions="all")
    worst = 0.0
    for step in range(inputs["num_inference_steps"]):
        for block in maps.blocks:
            t2i, i2t = reference(seen, block, step)
            worst = max(worst, (maps.t2i[step, block] - t2i.to(maps.t2i.device)).abs().max().item(),
                        (maps.i2t[step, block] - i2t.to(maps.i2t.device)).abs().max().item())
    stock = DiffusionPipeline.from_pretrained(path).to(device)
    stock.set_progress_bar_config(disable=True)
    plain = tiny_inputs(probe, kind, ["a red cat on a mat", "a blue dog on a mat"])
    return {"maps_vs_softmax_max_abs": worst, "map_device": str(maps.t2i.device),
            "recording_changes_no_bit": torch.equal(output.images, probe.pipeline(**inputs).images),
            "taps_change_no_bit": torch.equal(stock(**plain).images, probe.pipeline(**plain).images),
            "output_device": str(output.images.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    logging.disable_progress_bar()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "torch": torch.__version__}
    root = Path(tempfile.mkdtemp())
    for kind in TINY_KINDS:
        try:
            results[kind] = check(kind, root / kind, args.device)
        except Exception:  # one family's failure must not hide the others' results
            results[kind] = {"error": traceback.format_exc()[-3000:]}
        print(kind, json.dumps(results[kind])[:3000], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"exactness_{args.device}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

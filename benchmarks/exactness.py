"""The suite's exactness checks on another device (the tests themselves run on the CPU).

    python benchmarks/exactness.py --device cuda      # writes benchmarks/results/exactness_cuda.json

On every tiny family, loaded with `mmdit_probe.load(..., device=..., dtype=...)`, in each dtype:
- the largest difference between recorded per-head T2I / I2T maps and an explicit float64 softmax
  of the same q and k, and the kernel the log-sum-exp came from (`kernels.fused_backend`; none: the
  chunked float32 path);
- whether recording changes any output bit, and whether installing taps does (against the stock
  pipeline loaded from the same directory in the same dtype).

What sets the tolerance: the recorder computes maps in float32 from the tapped q and k whatever the
model's dtype (bfloat16 values are exact in float32), so the error is float32 rounding of the logits
plus the kernel's error in the log-sum-exp. Kernels running in bfloat16 round more inside (the CPU
flash kernel's bfloat16 path: about 4e-5 nats on random inputs), hence a looser bound there.
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
from mmdit_probe import kernels  # noqa: E402
from mmdit_probe.testing import TINY_KINDS, save_tiny_pipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOLERANCE = {"float32": 2e-6, "bfloat16": 2e-4, "float16": 2e-4}


def check(kind: str, directory: Path, device: str, dtype: str) -> dict:
    path = save_tiny_pipeline(kind, directory)
    probe = mmdit_probe.load(path, device=device, dtype=getattr(torch, dtype))
    kernels._trusted.clear()
    maps, seen, inputs, output = record_with_reference(probe, kind, heads="all", rows=cfg_rows(kind), positions="all")
    exact = {key: [t.double() for t in tensors] for key, tensors in seen.items()}
    worst = 0.0
    for step in range(inputs["num_inference_steps"]):
        for block in maps.blocks:
            t2i, i2t = reference(exact, block, step)
            worst = max(worst, (maps.t2i[step, block].double() - t2i.cpu()).abs().max().item(),
                        (maps.i2t[step, block].double() - i2t.cpu()).abs().max().item())
    # Which fused kernels gave the log-sum-exps, and whether each passed its first-call check.
    lse_kernels = sorted({f"{backend.name}: {'used' if ok else 'refused'}" for (_, _, backend, *_), ok
                          in kernels._trusted.items()}) or ["none: chunked float32"]
    stock = DiffusionPipeline.from_pretrained(path).to(device, getattr(torch, dtype))
    stock.set_progress_bar_config(disable=True)
    plain = tiny_inputs(probe, kind, ["a red cat on a mat", "a blue dog on a mat"])
    return {"maps_vs_float64_softmax_max_abs": worst, "tolerance": TOLERANCE[dtype],
            "within_tolerance": worst <= TOLERANCE[dtype],
            "lse_kernels": lse_kernels,
            "recording_changes_no_bit": torch.equal(output.images, probe.pipeline(**inputs).images),
            "taps_change_no_bit": torch.equal(stock(**plain).images, probe.pipeline(**plain).images),
            "output_device": str(output.images.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"], choices=list(TOLERANCE))
    args = parser.parse_args()
    logging.disable_progress_bar()
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "torch": torch.__version__}
    root = Path(tempfile.mkdtemp())
    for dtype in args.dtypes:
        results[dtype] = {}
        for kind in TINY_KINDS:
            try:
                results[dtype][kind] = check(kind, root / dtype / kind, args.device, dtype)
            except Exception:  # one family's failure must not hide the others' results
                results[dtype][kind] = {"error": traceback.format_exc()[-3000:]}
            print(dtype, kind, json.dumps(results[dtype][kind])[:3000], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"exactness_{args.device}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

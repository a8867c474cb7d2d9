"""Does a sweep reproduce `reports/toy`? The toy evaluation's per-block tables, recomputed from a sweep.

    python benchmarks/sweep_vs_evaluate.py    # minutes on a CPU; writes benchmarks/results/sweep_vs_evaluate.json

`python -m mmdit_probe.toy.evaluate` generated the 100 held-out captions in batches of 10 and scored
each block's map averaged over a step window (early, middle, late thirds, all). Here the sweep
generates the same captions one at a time from the same initial noise (checked below), with the
toy preset's 20 steps, T2I and I2T, windows all/early/middle/late, unsmoothed, and its window rows
give the same tables: per-block mean IoU at 0.5 and soft IoU on the pixels, IoU on the token grid
(over every word), and the best block per word type. Batched and one-at-a-time generation may round
differently on the CPU, so an image, its masks and its maps can differ a little: the differences
are reported, not forced to zero.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

import mmdit_probe
from mmdit_probe.sweep import sweep, toy_prompts
from mmdit_probe.toy.evaluate import STEP_RANGES
from mmdit_probe.toy.world import caption, sample_split_scene

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = list(range(6))  # the toy model's


def check_same_noise(probe, n: int, seed: int = 0, batch: int = 10) -> None:
    """Prompt j: the sweep's latent (seed j, alone) equals evaluate's (generator seed + start + i, in a batch)."""
    items = toy_prompts(n, seed)
    rng = np.random.default_rng(seed)
    assert [it.prompt for it in items] == [caption(sample_split_scene(rng, held_out=True)) for _ in range(n)]
    assert [it.seed for it in items] == [seed + j for j in range(n)]
    pipe, family = probe.pipeline, probe.family
    channels = pipe.transformer.config.in_channels // family.latent_channels_divisor
    size = probe.preset.resolution
    for start in range(0, n, batch):
        group = items[start:start + batch]
        generators = probe.inputs([it.prompt for it in group], seed=seed + start, same_noise=False)["generator"]
        drawn = pipe.prepare_latents(len(group), channels, size, size, torch.float32, torch.device("cpu"), generators)
        for i, item in enumerate(group):
            assert torch.equal(family.initial_noise(1, size, size, item.seed)[0], drawn[i]), item.id


def tables(table) -> tuple[dict, dict]:
    """The evaluation's per-block tables (kind/raw/window/metric -> per block) and per-word-type bests."""
    keys = ["kind", "window", "grid", "metric", "word_type", "block"]
    rows = table.filter(pc.not_equal(table["window"], "step"))
    cols = {k: np.array(rows.column(k).to_pylist()) for k in keys}
    values = rows.column("value").to_numpy()

    def per_block(kind, window, grid, metric, word_type=None) -> np.ndarray:
        chosen = (cols["kind"] == kind) & (cols["window"] == window) & (cols["grid"] == grid)
        chosen &= (cols["metric"] == metric) & ((cols["word_type"] == word_type) if word_type else True)
        return np.array([values[chosen & (cols["block"] == b)].mean() for b in BLOCKS])

    blocks = {}
    for kind in ("t2i", "i2t"):
        for window in STEP_RANGES:
            for metric, grid, name in (("iou", "pixels", "iou"), ("soft_iou", "pixels", "soft_iou"),
                                       ("iou", "tokens", "token_iou")):
                blocks[f"{kind}/raw/{window}/{name}"] = per_block(kind, window, grid, metric).tolist()
    types = {}
    for kind in ("t2i", "i2t"):
        for word_type in sorted(set(cols["word_type"])):
            by_window = {w: per_block(kind, w, "pixels", "iou", word_type) for w in STEP_RANGES}
            types[f"{kind}/{word_type}"] = {
                "best_block_iou": float(by_window["all"].max()), "best_block": int(BLOCKS[by_window["all"].argmax()]),
                "best_block_iou_by_steps": {w: float(v.max()) for w, v in by_window.items()},
                "best_block_token_iou": float(per_block(kind, "all", "tokens", "iou", word_type).max())}
    return blocks, types


def compare(report: dict, per_block: dict, per_type: dict) -> dict:
    block_diffs = {k: float(np.max(np.abs(np.array(per_block[k]) - np.array(v))))
                   for k, v in report["per_block"].items() if k in per_block}
    type_diffs = {}
    for key, theirs in report["per_word_type"].items():
        ours = per_type[key]
        type_diffs[key] = {
            "best_block_iou": abs(ours["best_block_iou"] - theirs["best_block_iou"]),
            "best_block_iou_by_steps": max(abs(ours["best_block_iou_by_steps"][w] - v)
                                           for w, v in theirs["best_block_iou_by_steps"].items()),
            "best_block_token_iou": abs(ours["best_block_token_iou"] - theirs["best_block_token_iou"]),
            "same_best_block": ours["best_block"] == theirs["best_block"]}
    return {"per_block_max_abs_diff": block_diffs,
            "per_block_largest": max(block_diffs.items(), key=lambda kv: kv[1]),
            "per_word_type_abs_diff": type_diffs,
            "per_word_type_largest": {m: max(((k, v[m]) for k, v in type_diffs.items()), key=lambda kv: kv[1])
                                      for m in ("best_block_iou", "best_block_iou_by_steps", "best_block_token_iou")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", type=Path, help="sweep folder to keep (and resume); default a temporary one")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "toy" / "report.json")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_vs_evaluate.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    probe = mmdit_probe.load("toy")
    check_same_noise(probe, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        start = time.perf_counter()
        result = sweep(probe, toy_prompts(args.n), out, num_steps=probe.preset.steps, words="all",
                       windows=STEP_RANGES, smoothing=False)
        seconds = time.perf_counter() - start
        table = pq.read_table(result.table).filter(pc.field("scored"))  # words with a mask only
    report = json.loads(args.report.read_text())
    per_block, per_type = tables(table)
    results = {"prompts": args.n, "steps": probe.preset.steps, "sweep_seconds": round(seconds, 1),
               "same_initial_noise": True,
               "words_scored": table.group_by(["prompt_id", "word_index"]).aggregate([]).num_rows,
               **compare(report, per_block, per_type), "sweep_per_block": per_block, "sweep_per_word_type": per_type}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: results[k] for k in ("sweep_seconds", "words_scored", "per_block_largest",
                                              "per_word_type_largest")}, indent=1))


if __name__ == "__main__":
    main()

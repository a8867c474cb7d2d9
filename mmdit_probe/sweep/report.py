"""What a sweep says: block x step heatmaps, T2I against I2T, the block ranking and the top layers.

>>> report = sweep_report("out/sweep")            # writes report.json, top_layers.json and figures there
>>> report["top_layers"], report["top_k_vs_all"]["t2i"]["top"]["soft_iou"]

The top layers are the best `top_k` blocks by one metric (default: soft IoU on pixels, T2I maps,
every word and recorded step; window rows, if any, are left out). `block_windows` gives each
block's mean score of the maps averaged over each step window. `top_k_vs_all` then scores, for
every prompt and word, the map averaged over those blocks against the map averaged over all
recorded blocks, as an editor would use them. Both come from the same prompts, so the top-k score
is optimistic; rank on one sweep and check on another to measure it fairly.
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import product
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import validation
from ..maps import AttentionMaps, normalise, smooth
from ..metrics import HIGHER_IS_BETTER, METRICS, score_map, token_mask
from ..validation import InvalidInput
from .run import _stored_config, read_record, record_masks


def _means(table, keys: list[str]) -> dict[tuple, float]:
    grouped = table.group_by(keys).aggregate([("value", "mean")]).to_pydict()
    return {tuple(grouped[k][i] for k in keys): grouped["value_mean"][i] for i in range(len(grouped["value_mean"]))}


def _typed_means(table, keys: list[str]) -> dict[tuple, float]:
    """`_means` with "word_type" among the keys, where the type "all" is every row of the others."""
    everything = table.set_column(table.schema.get_field_index("word_type"), "word_type",
                                  pa.repeat(pa.scalar("all"), table.num_rows))
    return _means(pa.concat_tables([everything, table]), keys)


def sweep_report(out: str | Path, *, top_k: int = 5, metric: str = "soft_iou", grid: str = "pixels",
                 kind: str = "t2i", figures: bool = True) -> dict:
    """The report of a finished sweep in `out` (see the module docstring); also written to out/report.json,
    the chosen blocks to out/top_layers.json."""
    out = Path(out)
    fix = "give the --out of `mmdit-probe sweep`"
    if not (out / "config.json").is_file():
        raise InvalidInput(f"{out} is not a sweep's output folder (no config.json): {fix}")
    config = _stored_config(out / "config.json", fix, keys=("blocks", "record_steps", "grids", "kinds"))
    blocks, steps = config["blocks"], config["record_steps"]
    # Every option is checked before anything is read or written.
    top_k = validation.top_k("top_k", top_k, len(blocks), what="blocks in the sweep")
    validation.choice("metric", metric, METRICS)
    validation.choice("grid", grid, config["grids"])
    validation.choice("kind", kind, config["kinds"])
    validation.boolean("figures", figures)
    if not (out / "scores.parquet").exists():
        raise InvalidInput(f"{out} has no scores.parquet: run `mmdit-probe sweep ... --out {out}` first")
    table = pq.read_table(out / "scores.parquet")
    # Rows of single steps, and of step windows; a word without a mask has neither (its `window` is null).
    windows = table.filter(pc.not_equal(table["window"], "step"))
    table = table.filter(pc.equal(table["window"], "step"))
    if table.num_rows == 0:
        raise ValueError(f"{out}/scores.parquet has no scores: no prompt had a word with a mask")
    types = ["all", *sorted(set(table.column("word_type").to_pylist()))]

    scored = list(product(config["kinds"], config["grids"], METRICS))  # (kind, grid, metric) of every score
    per_type = _typed_means(table, ["kind", "grid", "metric", "word_type", "block", "step"])
    heatmaps = {f"{k}/{g}/{m}/{t}": [[per_type.get((k, g, m, t, b, s), float("nan")) for s in steps] for b in blocks]
                for k, g, m in scored for t in types}
    by_block = _means(table, ["kind", "grid", "metric", "block"])
    block_scores = {f"{k}/{g}/{m}": [by_block[(k, g, m, b)] for b in blocks] for k, g, m in scored}
    chosen = np.array(block_scores[f"{kind}/{grid}/{metric}"])
    order = np.argsort(-chosen if HIGHER_IS_BETTER[metric] else chosen, kind="stable")
    ranking = [{"block": blocks[i], "score": float(chosen[i])} for i in order]
    top_layers = [r["block"] for r in ranking[:top_k]]
    by_window = _typed_means(windows, ["kind", "grid", "metric", "window", "word_type", "block"])
    block_windows = {f"{k}/{g}/{m}/{w}/{t}": [by_window.get((k, g, m, w, t, b), float("nan")) for b in blocks]
                     for k, g, m in scored for w in config.get("windows", []) for t in types}

    report = {
        "model": config["model"], "prompts": int(pc.count_distinct(table.column("prompt_id")).as_py()),
        "ranked_by": {"kind": kind, "grid": grid, "metric": metric},
        "blocks": blocks, "steps": steps, "word_types": types,
        "ranking": ranking, "top_layers": top_layers,
        "block_scores": block_scores,  # T2I against I2T: kind/grid/metric -> score per block
        "block_windows": block_windows,  # kind/grid/metric/window/word_type -> score per block
        "top_k_vs_all": _top_k_vs_all(out, config, top_layers),
        "heatmaps": heatmaps,  # kind/grid/metric/word_type -> [block][step]
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "top_layers.json").write_text(json.dumps(
        {"model": config["model"], "top_layers": top_layers, "ranked_by": report["ranked_by"]}, indent=1))
    if figures:
        _figures(report, config, out, grid)
    return report


def _top_k_vs_all(out: Path, config: dict, top_layers: list[int]) -> dict:
    """Mean scores of maps averaged over the top blocks vs over all blocks (all recorded steps)."""
    results: dict[tuple, list[float]] = defaultdict(list)
    for path in sorted((out / "records").glob("*.safetensors")):
        meta, tensors = read_record(path)
        if not meta["words"]:  # no word with a mask, or a failed prompt
            continue
        maps, masks = AttentionMaps.load(path), record_masks(meta, tensors)
        for index, _, _ in meta["words"]:
            targets = {"pixels": masks[index], "tokens": token_mask(masks[index], maps.grid)}
            for kind in config["kinds"]:
                for name, blocks in (("top", top_layers), ("all", None)):
                    m = maps.word(index, kind=kind, blocks=blocks)
                    m = normalise(smooth(m) if config["smoothing"] else m)
                    for g in config["grids"]:
                        for metric, value in score_map(m, targets[g], config["threshold"]).items():
                            results[(kind, name, g, metric)].append(value)
    return {kind: {name: {g: {m: float(np.mean(results[(kind, name, g, m)])) for m in METRICS}
                          for g in config["grids"]} for name in ("top", "all")} for kind in config["kinds"]}


def _figures(report: dict, config: dict, out: Path, grid: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, steps, types, kinds = report["blocks"], report["steps"], report["word_types"], config["kinds"]
    for metric in METRICS:
        fig, axes = plt.subplots(len(types), len(kinds), squeeze=False,
                                 figsize=(2.2 + 0.25 * len(steps) * len(kinds), 0.9 + 0.3 * len(blocks) * len(types)))
        for row, t in enumerate(types):
            for col, kind in enumerate(kinds):
                ax = axes[row, col]
                image = ax.imshow(np.array(report["heatmaps"][f"{kind}/{grid}/{metric}/{t}"]), aspect="auto",
                                  cmap="viridis" if HIGHER_IS_BETTER[metric] else "viridis_r")
                ax.set(title=f"{kind.upper()}, {t}", xlabel="step", ylabel="block",
                       xticks=range(len(steps)), xticklabels=steps, yticks=range(len(blocks)), yticklabels=blocks)
                fig.colorbar(image, ax=ax)
        fig.suptitle(f"{metric} on {grid}, block x step")
        fig.tight_layout()
        fig.savefig(out / f"heatmap_{metric}_{grid}.png", dpi=90)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 2.8))
    for ax, metric in zip(axes, METRICS):
        for kind in kinds:
            ax.plot(blocks, report["block_scores"][f"{kind}/{grid}/{metric}"], marker="o", label=kind.upper())
        ax.set(title=f"{metric} ({grid})", xlabel="block")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "t2i_vs_i2t.png", dpi=90)
    plt.close(fig)

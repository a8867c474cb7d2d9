"""Ground-truth evaluation of the toy model: image quality by the judge, and T2I vs I2T segmentation.

    python -m mmdit_probe.toy.evaluate --n 100 --out reports/toy
    python -m mmdit_probe.toy.evaluate --n 100 --out reports/toy_unplaced --unplaced

For held-out captions, generate, read the objects back from the *generated* image (exact masks on a
plain background), then score every block's T2I and I2T word maps against those masks: IoU at
half the max and soft IoU, per word type (size, colour, shape, position, background), per step
range (early, middle, late), with and without Gaussian smoothing, and for the top-5 blocks'
average against all blocks. IoU is measured twice: on the image's pixels (the map upsampled) and
on the 8x8 token grid (the mask pooled to the map's resolution, as the first prototype scored).
For reference, both are also given for the map of a perfect block: the mask's own token coverage.
Writes report.json and figures. With --unplaced the captions leave out where the objects go, so
the model chooses the layout and objects are matched by colour and shape.

The same runs also carry concept tokens (`mmdit_probe.concepts`; the images are unchanged): each
scene's shape and colour words plus "background", as ConceptAttention chooses concepts. Their
output-space ("concept") and cross-attention ("concept_xattn") maps are scored on the caption's shape,
colour and background words (a background colour word, e.g. "black", is read from the "background"
concept), beside T2I and I2T on the same words: `three_kinds` in report.json, three_kinds.md.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..maps import KINDS, normalise, smooth
from ..metrics import coverage, score_map, token_mask
from ..sampling.windows import step_windows as step_slices  # moved to sampling.windows; alias stays one release
from .judge import judge, summarise, word_masks_from_image
from .world import WORD_TYPE, Scene, caption, sample_split_scene

STEP_RANGES = ("early", "middle", "late", "all")
METRICS = ("iou", "soft_iou", "token_iou")
SCORED_KINDS = ("t2i", "i2t", "concept", "concept_xattn")
CONCEPT_TYPES = ("shape", "colour", "background")  # the word types that concept maps are scored on


def scene_concepts(scene: Scene) -> list[str]:
    """ConceptAttention's concepts for a scene: its shape and colour words, then "background"."""
    return list(dict.fromkeys(w for o in scene.objects for w in (o.shape, o.colour))) + ["background"]


def map_target(kind: str, maps, prompt: int, word_index: int):
    """What a kind's map of a caption word is read from: the word (t2i, i2t) or its concept; None if it has none."""
    if kind in KINDS:
        return word_index
    word = maps.tables[prompt].words[word_index]
    if WORD_TYPE.get(word) not in CONCEPT_TYPES:
        return None
    return word if word in maps.concepts[prompt] else "background"


def evaluate(probe, n: int = 100, seed: int = 0, batch: int = 10, top_k: int = 5, placed: bool = True) -> dict:
    """The report on `n` held-out captions; `placed=False` leaves their position words out."""
    rng = np.random.default_rng(seed)
    scenes = [sample_split_scene(rng, held_out=True) for _ in range(n)]
    verdicts = []
    # scores[(kind, smoothing, step_range, block, word_type, metric)] -> list of values
    scores: dict[tuple, list[float]] = defaultdict(list)
    # perfect[(word_type, metric)]: scores of a perfect block's map (the mask's token coverage)
    perfect: dict[tuple, list[float]] = defaultdict(list)
    blocks = list(range(probe.family.num_blocks))
    steps = step_slices(probe.preset.steps)
    per_image: list[tuple] = []
    for start in tqdm(range(0, n, batch), desc="evaluate"):
        group = scenes[start:start + batch]
        out = probe.generate([caption(s, placed) for s in group], seed=seed + start, same_noise=False, record=True,
                             concepts=[scene_concepts(s) for s in group])
        for i, scene in enumerate(group):
            image = np.asarray(out.images[i])
            verdicts.append(judge(image, scene, placed))
            masks = word_masks_from_image(scene, image, placed)
            per_image.append((out.maps, i, masks))
    for maps, i, masks in tqdm(per_image, desc="score"):
        grid = tuple(maps.grid)
        for word_index, mask in masks.items():
            word_type = WORD_TYPE[maps.tables[i].words[word_index]]
            tokens, ideal = token_mask(mask, grid), normalise(coverage(mask, grid))
            perfect[(word_type, "iou")].append(score_map(ideal, mask)["iou"])
            perfect[(word_type, "token_iou")].append(score_map(ideal, tokens)["iou"])
            for kind in SCORED_KINDS:
                target = map_target(kind, maps, i, word_index)
                if target is None:
                    continue
                for range_name, chosen in steps.items():
                    per_block = maps.per_block(target, prompt=i, kind=kind, steps=chosen)
                    for smoothing in (False, True):
                        stack = [smooth(m) if smoothing else m for m in per_block]
                        for b, m in zip(blocks, stack):
                            m = normalise(m)
                            result = score_map(m, mask)
                            result["token_iou"] = score_map(m, tokens)["iou"]
                            for metric in METRICS:
                                scores[(kind, smoothing, range_name, b, word_type, metric)].append(result[metric])
    return {"placed": placed, **_report(scores, perfect, verdicts, blocks, top_k, per_image)}


def _mean(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def _report(scores, perfect, verdicts, blocks, top_k, per_image) -> dict:
    types = sorted({key[4] for key in scores})

    def block_table(kind, smoothing, step_range, metric="iou", word_types=None):
        chosen = word_types or types
        return [_mean([v for t in chosen for v in scores[(kind, smoothing, step_range, b, t, metric)]])
                for b in blocks]

    t2i_all = block_table("t2i", False, "all")
    top = [blocks[i] for i in np.argsort(t2i_all)[::-1][:top_k]]
    report = {
        "judge": summarise(verdicts),
        "blocks": blocks,
        "top_blocks_t2i_iou": top,
        "per_block": {
            f"{kind}/{'smoothed' if s else 'raw'}/{r}/{metric}": block_table(kind, s, r, metric)
            for kind in SCORED_KINDS for s in (False, True) for r in STEP_RANGES for metric in METRICS
        },
        "per_word_type": {
            f"{kind}/{t}": {"best_block_iou": max(block_table(kind, False, "all", "iou", [t])),
                            "best_block": blocks[int(np.argmax(block_table(kind, False, "all", "iou", [t])))],
                            "best_block_iou_by_steps": {r: max(block_table(kind, False, r, "iou", [t]))
                                                        for r in STEP_RANGES},
                            "best_block_token_iou": max(block_table(kind, False, "all", "token_iou", [t]))}
            for kind in SCORED_KINDS for t in types if kind in KINDS or t in CONCEPT_TYPES
        },
        # What a perfect block's map would score, per word type: the mask's own token coverage. At 8x8
        # tokens a 9-pixel object covers few tokens whole, so pixel IoU cannot come near 1.
        "coverage_map": {t: {metric: _mean(perfect[(t, metric)]) for metric in ("iou", "token_iou")} for t in types},
        "top_k_vs_all": _top_k_vs_all(per_image, top),
        "three_kinds": _three_kinds(block_table, per_image, blocks, top_k),
        "per_word_type_per_block": {kind: {t: block_table(kind, False, "all", "iou", [t]) for t in CONCEPT_TYPES}
                                    for kind in SCORED_KINDS},
    }
    report["headline"] = {
        "t2i_best_block_miou": max(t2i_all),
        "i2t_best_block_miou": max(block_table("i2t", False, "all")),
        "t2i_best_block_miou_shape_words": max(block_table("t2i", False, "all", "iou", ["shape"])),
        "t2i_best_block_miou_colour_words": max(block_table("t2i", False, "all", "iou", ["colour"])),
        "coverage_map_miou": _mean([v for t in types for v in perfect[(t, "iou")]]),
        "t2i_best_block_token_miou": max(block_table("t2i", False, "all", "token_iou")),
        "i2t_best_block_token_miou": max(block_table("i2t", False, "all", "token_iou")),
        "t2i_best_block_token_miou_shape_words": max(block_table("t2i", False, "all", "token_iou", ["shape"])),
        "t2i_best_block_token_miou_colour_words": max(block_table("t2i", False, "all", "token_iou", ["colour"])),
        "concept_best_block_miou_shape_words": max(block_table("concept", False, "all", "iou", ["shape"])),
        "concept_best_block_miou_colour_words": max(block_table("concept", False, "all", "iou", ["colour"])),
    }
    return report


def _three_kinds(block_table, per_image, blocks, top_k) -> dict:
    """Every kind on the words concept maps cover (shape, colour, background), per word type: the best block
    (raw, all steps) and the map averaged over the kind's own top-k blocks (ranked on those words), on pixels
    and on the token grid."""
    found: dict = {}
    for kind in SCORED_KINDS:
        ranking = block_table(kind, False, "all", "iou", list(CONCEPT_TYPES))
        top = [blocks[i] for i in np.argsort(ranking)[::-1][:top_k]]
        top_scores: dict[tuple, list[float]] = defaultdict(list)
        for maps, i, masks in per_image:
            grid = tuple(maps.grid)
            for word_index, mask in masks.items():
                word_type = WORD_TYPE[maps.tables[i].words[word_index]]
                target = map_target(kind, maps, i, word_index)
                if word_type not in CONCEPT_TYPES or target is None:
                    continue
                m = normalise(maps.word(target, prompt=i, kind=kind, blocks=top))
                for t in (word_type, "all"):
                    top_scores[(t, "iou")].append(score_map(m, mask)["iou"])
                    top_scores[(t, "token_iou")].append(score_map(m, token_mask(mask, grid))["iou"])
        found[kind] = {"top_blocks": top}
        for t in (*CONCEPT_TYPES, "all"):
            chosen = list(CONCEPT_TYPES) if t == "all" else [t]
            iou, token = block_table(kind, False, "all", "iou", chosen), block_table(kind, False, "all", "token_iou",
                                                                                      chosen)
            found[kind][t] = {"best_block": blocks[int(np.argmax(iou))], "best_block_iou": max(iou),
                              "best_block_token_iou": max(token), "top_k_iou": _mean(top_scores[(t, "iou")]),
                              "top_k_token_iou": _mean(top_scores[(t, "token_iou")])}
    return found


def three_kinds_table(report: dict) -> str:
    """The three-kind comparison as a markdown table (mIoU; best block, then the top-k blocks' mean map)."""
    names = {"t2i": "T2I", "i2t": "I2T", "concept": "concept (output space)", "concept_xattn": "concept x-attn"}
    lines = ["| word type | map | best block (pixels) | best block (tokens) | top-5 (pixels) | top-5 (tokens) |",
             "|---|---|---|---|---|---|"]
    for t in (*CONCEPT_TYPES, "all"):
        for kind in SCORED_KINDS:
            r = report["three_kinds"][kind][t]
            lines.append(f"| {t} | {names[kind]} | {r['best_block_iou']:.2f} (block {r['best_block']}) | "
                         f"{r['best_block_token_iou']:.2f} | {r['top_k_iou']:.2f} | {r['top_k_token_iou']:.2f} |")
    return "\n".join(lines)


def _top_k_vs_all(per_image, top: list[int]) -> dict[str, float]:
    """mIoU of maps averaged over the top blocks vs over all blocks (all steps), raw and smoothed."""
    results: dict[str, list[float]] = defaultdict(list)
    for maps, i, masks in per_image:
        for word_index, mask in masks.items():
            for name, blocks in (("top", top), ("all", None)):
                for kind in ("t2i", "i2t"):
                    m = maps.word(word_index, prompt=i, kind=kind, blocks=blocks)
                    results[f"{kind}/{name}/raw"].append(score_map(normalise(m), mask)["iou"])
                    results[f"{kind}/{name}/smoothed"].append(score_map(normalise(smooth(m)), mask)["iou"])
    return {k: _mean(v) for k, v in results.items()}


def figures(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, s in zip(axes, ("raw", "smoothed")):
        for kind in ("t2i", "i2t"):
            ax.plot(blocks, report["per_block"][f"{kind}/{s}/all/iou"], marker="o", label=kind.upper())
        ax.set_title(f"mIoU per block ({s})")
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "miou_per_block.png", dpi=110)
    plt.close(fig)
    if "three_kinds" not in report:
        return
    fig, axes = plt.subplots(1, len(CONCEPT_TYPES), figsize=(12, 3))
    for ax, t in zip(axes, CONCEPT_TYPES):
        for kind in SCORED_KINDS:
            ax.plot(blocks, [report["per_word_type_per_block"][kind][t][b] for b in range(len(blocks))],
                    marker="o", label=kind)
        ax.set_title(f"{t} words: mIoU per block")
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "three_kinds_per_block.png", dpi=110)
    plt.close(fig)


def command_line(doc: str, n: int, out: str, argv: list[str] | None, add_arguments=None):
    """The evaluation scripts' shared command line: --n, --seed, --out, --model, and whatever
    `add_arguments(parser)` adds; returns (args, probe)."""
    from ..probe import load

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=n, help="held-out cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--model", default="toy")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    probe = load(args.model)
    probe.pipeline.set_progress_bar_config(disable=True)
    args.out.mkdir(parents=True, exist_ok=True)
    return args, probe


def main(argv: list[str] | None = None) -> None:
    def unplaced_flag(parser):
        parser.add_argument("--unplaced", action="store_true",
                            help="captions without position words: the model chooses the layout")

    args, probe = command_line(__doc__, 100, "reports/toy", argv, unplaced_flag)
    report = evaluate(probe, n=args.n, seed=args.seed, placed=not args.unplaced)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    (args.out / "three_kinds.md").write_text(three_kinds_table(report) + "\n")
    figures(report, args.out)
    print(three_kinds_table(report))
    print(json.dumps({"judge": report["judge"], "headline": report["headline"],
                      "top_blocks": report["top_blocks_t2i_iou"], "top_k_vs_all": report["top_k_vs_all"]}, indent=2))


if __name__ == "__main__":
    main()

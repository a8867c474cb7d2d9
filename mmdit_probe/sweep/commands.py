"""The `mmdit-probe sweep` and `mmdit-probe sweep-report` commands.

    mmdit-probe sweep toy --prompts toy --num-prompts 100 --steps 8 --out out/sweep
    torchrun --nproc_per_node 2 -m mmdit_probe.cli sweep toy --prompts toy --out out/sweep    # two CPU processes
    accelerate launch --num_processes 4 -m mmdit_probe.cli sweep sd3-medium --prompts prompts.txt \
        --masks grounded-sam --out out/sd3                                                    # one process per GPU
    mmdit-probe sweep-report out/sweep
"""

from __future__ import annotations

import argparse

from .._notices import quiet
from ..constants import GRIDS, KINDS, METRICS, WINDOWS
from ..entry_points import fraction as _fraction
from ..entry_points import positive as _positive


class PromptsFailed(RuntimeError):
    """Some prompts of a sweep failed while running (each recorded, the others done): exit code 1."""


def _check(args: argparse.Namespace) -> None:
    """What the options' command-line names say best, checked before torch is imported; the sweep checks the
    rest (and these again) against the model and the prompts before it writes anything."""
    from .. import validation

    validation.count("--num-prompts", args.num_prompts)
    if args.max_prompts is not None:
        validation.count("--max-prompts", args.max_prompts, " (or leave it out for all)")
    if args.guidance is not None:
        validation.number("--guidance", args.guidance, low=0.0)
    if args.masks is None and args.prompts != "toy":
        raise validation.InvalidInput("give --masks DIR (a folder of <prompt id>/<word>.png) or --masks grounded-sam "
                                      "for prompts other than the Shapes world's (--prompts toy)")


def _sweep(args: argparse.Namespace) -> None:
    _check(args)
    from accelerate import PartialState

    from ..entry_points import checking
    from .masks import mask_source
    from .run import prepare_sweep

    quiet(future_warnings=True)  # one progress bar and nothing else
    options = {"detector": args.detector, "segmenter": args.segmenter} if args.masks == "grounded-sam" else {}
    with checking():  # a model or mask source that cannot be loaded is a bad argument, like a bad option
        prepared = prepare_sweep(
            args.model, args.prompts, args.out, masks=mask_source(args.masks or "toy", **options),
            blocks=args.blocks, record_steps=args.record_steps, kinds=args.kinds,
            words=args.words[0] if args.words in (["content"], ["all"]) else args.words,
            resolution=args.resolution, num_steps=args.steps, guidance=args.guidance, seed=args.seed,
            n=args.num_prompts, threshold=args.threshold, grids=args.grids, smoothing=args.smooth,
            windows=args.windows, max_prompts=args.max_prompts, keep_going=not args.debug)
    result = prepared.run()
    state = PartialState()
    if state.is_main_process:
        failed = f", {len(result.failed)} failed" if result.failed else ""
        more = "" if result.complete else "; rerun the same command to go on"
        print(f"{result.done} of {result.total} prompts done{failed}{more}; scores: {result.table}")
    state.destroy_process_group()
    if result.failed:  # the main process's exit code says the sweep is not whole
        first, reason = next(iter(result.failed.items()))
        raise PromptsFailed(f"{len(result.failed)} of {result.total} prompts failed: {first} ({reason})"
                            f"{' and others' if len(result.failed) > 1 else ''}; their records in {args.out}/records "
                            f"hold the tracebacks; rerun the same command to retry them")


def _report(args: argparse.Namespace) -> None:
    from .report import sweep_report

    quiet(future_warnings=True)
    report = sweep_report(args.dir, top_k=args.top_k, metric=args.metric, grid=args.grid)  # checks every option
    ranked = report["ranked_by"]
    scores = {name: report["top_k_vs_all"][ranked["kind"]][name][ranked["grid"]][ranked["metric"]]
              for name in ("top", "all")}
    print(f"top layers {report['top_layers']} by {ranked['kind']} {ranked['metric']} on {ranked['grid']}: "
          f"{scores['top']:.3f} averaged over them, {scores['all']:.3f} over all blocks")
    print(f"wrote report.json, top_layers.json and figures to {args.dir}/")


def add_commands(commands) -> None:
    """Add `sweep` and `sweep-report` to the `mmdit-probe` subcommands."""
    sweep = commands.add_parser("sweep", help="score every block x step x word map of a prompt set against masks",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("model", help="preset name (e.g. toy, sd3-medium), hub id, or local pipeline directory")
    sweep.add_argument("--prompts", required=True, help="'toy' (held-out Shapes-world captions), or a .txt "
                       "(one prompt a line) or .jsonl file ({'prompt', 'id', 'seed', 'word_types'} a line)")
    sweep.add_argument("--out", required=True, help="output folder; rerunning with the same folder resumes")
    sweep.add_argument("--masks", help="'toy' (default for --prompts toy), 'grounded-sam', or a folder holding "
                       "<prompt id>/<word>.png")
    sweep.add_argument("--detector", default="IDEA-Research/grounding-dino-tiny",
                       help="Grounding-DINO hub id or local directory (with --masks grounded-sam)")
    sweep.add_argument("--segmenter", default="facebook/sam-vit-base",
                       help="SAM hub id or local directory (with --masks grounded-sam)")
    sweep.add_argument("--num-prompts", type=int, default=100, help="how many toy prompts (with --prompts toy)")
    sweep.add_argument("--seed", type=int, default=0, help="prompt i's seed is SEED + i unless the file gives one")
    sweep.add_argument("--blocks", type=int, nargs="+", help="blocks to record (default: all)")
    sweep.add_argument("--record-steps", type=int, nargs="+", help="denoising steps to record (default: all)")
    sweep.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    sweep.add_argument("--words", nargs="+", default=["content"],
                       help="'content' (default: all but a, the, on, ...), 'all', or the words to score")
    sweep.add_argument("--resolution", type=_positive, help="image size in pixels (default: the preset's)")
    sweep.add_argument("--steps", type=_positive, help="denoising steps (default: the preset's)")
    sweep.add_argument("--guidance", type=float, help="guidance scale (default: the preset's)")
    sweep.add_argument("--threshold", type=_fraction, default=0.5, help="θ for IoU of the max-normalised map, 0-1")
    sweep.add_argument("--grids", nargs="+", default=list(GRIDS), choices=GRIDS,
                       help="score on the image's pixels and/or the token grid (pixels cost most on big images)")
    sweep.add_argument("--windows", nargs="+", default=[], choices=WINDOWS,
                       help="also score each block's map averaged over these step ranges (thirds of --steps)")
    sweep.add_argument("--smooth", action="store_true", help="Gaussian-smooth maps before scoring (kernel 7, σ 1)")
    sweep.add_argument("--max-prompts", type=int, help="stop after this many unfinished prompts (rerun to go on)")
    sweep.set_defaults(run=_sweep)

    report = commands.add_parser("sweep-report", help="heatmaps, block ranking and top layers of a finished sweep")
    report.add_argument("dir", help="the sweep's output folder")
    report.add_argument("--top-k", type=int, default=5, help="how many blocks to choose (default 5)")
    report.add_argument("--metric", default="soft_iou", choices=METRICS,
                        help="metric that ranks the blocks (default soft_iou)")
    report.add_argument("--grid", default="pixels", choices=GRIDS,
                        help="rank by scores on pixels (default) or on the token grid")
    report.set_defaults(run=_report)

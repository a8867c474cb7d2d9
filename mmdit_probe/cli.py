"""The `mmdit-probe` command.

    mmdit-probe info toy                 # family, blocks, token layout, hook names
    mmdit-probe info ./my-sd3-dir --hooks
    mmdit-probe maps toy "on the left a large red circle on a white background" --out out/ \
                    --edit "on the left a large green circle on a white background"
    mmdit-probe edit toy "on the left a large red circle on a white background" \
                         "on the left a large blue circle on a white background" --out out/edit
    mmdit-probe sweep toy --prompts toy --num-prompts 100 --steps 8 --out out/sweep     # see mmdit_probe/sweep
    mmdit-probe sweep-report out/sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .probe import load
from .sweep.commands import add_commands as add_sweep_commands
from .tokens import FUNCTION_WORDS


def _info(args: argparse.Namespace) -> None:
    probe = load(args.model)
    print(probe.info())
    if args.hooks:
        print("\n".join(probe.hook_names))
    if args.prompt:
        print(probe.tokens(args.prompt))


def _maps(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from .viz import t2i_vs_i2t, word_grid

    probe = load(args.model)
    out = probe.generate(args.prompt, seed=args.seed, steps=args.steps, record=True)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    out.images[0].save(folder / "image.png")
    out.maps.save(folder / "maps.safetensors")
    words = args.words or [w for w in out.maps.recorded_words() if w not in FUNCTION_WORDS]
    blocks = "top" if set(probe.preset.top_layers) <= set(out.maps.blocks) else None
    figures = {"t2i_vs_i2t.png": t2i_vs_i2t(out.maps, words, blocks=blocks),
               "t2i_by_block.png": word_grid(out.maps, words, by="block"),
               "i2t_by_block.png": word_grid(out.maps, words, by="block", kind="i2t"),
               "t2i_by_step.png": word_grid(out.maps, words, by="step")}
    for name, fig in figures.items():
        fig.savefig(folder / name, dpi=110)
    print(f"wrote {', '.join(['image.png', 'maps.safetensors', *figures])} to {folder}/")
    if args.edit:
        _write_edit(probe, args.prompt, args.edit, folder / "edit", seed=args.seed, steps=args.steps)


def _edit(args: argparse.Namespace) -> None:
    options = {k: v for k, v in (("tau", args.tau), ("eta", args.eta), ("theta", args.theta)) if v is not None}
    _write_edit(load(args.model), args.source, args.target, Path(args.out), seed=args.seed, steps=args.steps,
                variant=args.variant, local_blend=not args.no_blend, **options)


def _write_edit(probe, source: str, target: str, folder: Path, **options) -> None:
    import numpy as np
    from PIL import Image

    result = probe.edit(source, target, **options)
    folder.mkdir(parents=True, exist_ok=True)
    result.source_image.save(folder / "source.png")
    result.edited_image.save(folder / "edited.png")
    size = result.source_image.size
    for step, mask in zip(result.params["blend_steps"], result.masks):
        picture = Image.fromarray((np.asarray(mask) * 255).astype(np.uint8)).resize(size, Image.NEAREST)
        picture.save(folder / f"mask_step{step:02d}.png")
    (folder / "params.json").write_text(json.dumps(result.params, indent=2))
    print(f"wrote source.png, edited.png, {len(result.masks)} masks and params.json to {folder}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmdit-probe", description="Look inside MM-DiTs (SD3, SD3.5, Flux.1).")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="describe a model: family, blocks, token layout, hook points")
    info.add_argument("model", help="preset name (e.g. toy, sd3-medium), hub id, or local pipeline directory")
    info.add_argument("--hooks", action="store_true", help="list every hook point name")
    info.add_argument("--prompt", help="also show this prompt's token table")
    info.set_defaults(run=_info)

    maps = commands.add_parser("maps", help="generate an image and write its T2I and I2T attention maps")
    maps.add_argument("model", help="preset name (e.g. toy), hub id, or local pipeline directory")
    maps.add_argument("prompt")
    maps.add_argument("--out", default="out", help="output directory (default: out)")
    maps.add_argument("--seed", type=int, default=0)
    maps.add_argument("--steps", type=int, default=None, help="denoising steps (default: the preset's)")
    maps.add_argument("--words", nargs="*", help="words to show (default: the prompt's content words)")
    maps.add_argument("--edit", metavar="TARGET", help="also edit the image into this prompt (writes DIR/edit/)")
    maps.set_defaults(run=_maps)

    edit = commands.add_parser("edit", help="edit an image by prompt: q/k injection plus local blending")
    edit.add_argument("model", help="preset name (e.g. toy), hub id, or local pipeline directory")
    edit.add_argument("source", help="the source prompt")
    edit.add_argument("target", help="the target prompt")
    edit.add_argument("--out", default="out/edit", help="output directory (default: out/edit)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--steps", type=int, default=None)
    edit.add_argument("--variant", default="qiki", help="qiki (default), qk, qi, ki, qikt, kivi or none")
    edit.add_argument("--tau", type=float, help="fraction of steps with q/k injection (default: preset)")
    edit.add_argument("--eta", type=float, help="fraction of steps with local blending (default: preset)")
    edit.add_argument("--theta", type=float, help="local-blend threshold (default: preset)")
    edit.add_argument("--no-blend", action="store_true", help="no local blending")
    edit.set_defaults(run=_edit)

    add_sweep_commands(commands)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

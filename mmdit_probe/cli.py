"""The `mmdit-probe` command.

    mmdit-probe info toy                 # family, blocks, token layout, hook names
    mmdit-probe info ./my-sd3-dir --hooks
    mmdit-probe maps toy "on the left a large red circle on a white background" --out out/ \
                    --edit "on the left a large green circle on a white background"
    mmdit-probe edit toy "on the left a large red circle on a white background" \
                         "on the left a large blue circle on a white background" --out out/edit
    mmdit-probe maps black-forest-labs/FLUX.1-Kontext-dev "the cat wearing a red hat" --image cat.png --out out/k
    mmdit-probe sweep toy --prompts toy --num-prompts 100 --steps 8 --out out/sweep     # see mmdit_probe/sweep
    mmdit-probe sweep-report out/sweep

Every command checks its arguments (and the words against the prompt) before the model runs, writes
into a temporary folder and moves the finished files into place, and refuses to replace existing
files unless given --overwrite. Errors are one line: exit code 2 for a bad argument, 1 for a failure
while running; --debug shows the traceback. `mmdit_probe.entry_points` gives every entry point
(`python -m mmdit_probe.segmentation` too) these same rules.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ._notices import quiet as _quiet  # moved to mmdit_probe._notices; this alias stays one release
from .constants import EDIT_METHODS, FAMILY_TITLES, STEP_ROUNDINGS
from .entry_points import ArgumentParser, checking, run_command
from .entry_points import fraction as _fraction
from .entry_points import positive as _positive
from .tokens import FUNCTION_WORDS
from .validation import InvalidInput, real_image

# Light imports only at the top: `--help` and argument errors never import torch.

MAPS_FILES = ("image.png", "maps.safetensors", "t2i_vs_i2t.png", "t2i_by_block.png", "i2t_by_block.png",
              "t2i_by_step.png")
EDIT_FILES = ("source.png", "edited.png", "params.json")
IMAGE_HELP = ("a context / reference image the model takes (Flux.1 Kontext, Flux.2, Qwen-Image-Edit, which needs "
              "one); repeat it for several where the model takes them (Flux.2, Qwen-Image-Edit-2509)")


def _check_out(overwrite: bool, *outputs: tuple[Path, tuple[str, ...]]) -> None:
    """Each (folder, its files) output: the folder is a folder (or absent) and holds none of its files (an edit's
    masks included), unless --overwrite. The first folder is --out."""
    folder, found = outputs[0][0], []
    for f, names in outputs:
        for parent in (f, *f.parents):
            if parent.exists() and not parent.is_dir():
                raise InvalidInput(f"--out {folder}: {parent} is a file, not a folder; choose another --out")
        found += [str(f / n) for n in names if (f / n).exists()]
        found += sorted(str(m) for m in f.glob("mask_step*.png")) if names == EDIT_FILES and f.is_dir() else []
    if found and not overwrite:
        raise InvalidInput(f"--out {folder} already holds {', '.join(found[:4])}{' ...' if len(found) > 4 else ''}: "
                           f"pass --overwrite to replace them, or choose another --out")


@contextlib.contextmanager
def _staging(folder: Path):
    """A temporary folder beside `folder`; on success its files are moved into `folder`, on failure it is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        yield staging
        _move_into(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into(staging: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if any(staging.glob("mask_step*.png")) or (staging / "source.png").exists():
        for old in folder.glob("mask_step*.png"):  # a previous edit's masks would mix with this one's
            old.unlink()
    for item in sorted(staging.iterdir()):
        if item.is_dir():
            _move_into(item, folder / item.name)
        else:
            os.replace(item, folder / item.name)


def _read_images(paths: list[str] | None) -> list:
    """The --image files as RGB PIL images, read before the model loads as diffusers' `load_image` reads them (EXIF
    orientation applied, then RGB), refusing the modes RGB would clip, as the Python API does (`real_image`)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    images = []
    for path in paths or []:
        if not Path(path).is_file():
            what = "is a folder" if Path(path).is_dir() else "does not exist"
            raise InvalidInput(f"--image {path} {what}: give the path of an image file (PNG, JPEG, ...)")
        try:
            with Image.open(path) as picture:
                real_image(picture, f"--image {path}")
                images.append(ImageOps.exif_transpose(picture).convert("RGB"))
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
            raise InvalidInput(f"--image {path} could not be read as an image ({error}): give a PNG, JPEG, ... "
                               f"file") from error
    return images


def _load(model: str):
    from .probe import load

    _quiet()
    return load(model)


def _info(args: argparse.Namespace) -> None:
    with checking():
        probe = _load(args.model)
        table = probe.tokens(args.prompt) if args.prompt is not None else None
    print(probe.info())
    if args.hooks:
        print("\n".join(probe.hook_names))
    if table is not None:
        print(table)


def _maps(args: argparse.Namespace) -> None:
    folder = Path(args.out)
    edit = [(folder / "edit", EDIT_FILES)] if args.edit is not None else []
    _check_out(args.overwrite, (folder, MAPS_FILES), *edit)
    images = _read_images(args.image)
    with checking():
        probe = _load(args.model)
        probe.family.check_input_images(images, cli=True)
        image = probe.family.image_inputs(images, 1) if images else {}
        pair = probe.family.image_inputs(images, 2) if images and args.edit is not None else {}  # source and target
        probe.check_generation(args.prompt, seed=args.seed, steps=args.steps, **image)
        table = probe.tokens(args.prompt)
        if args.words:
            for word in args.words:
                table.positions(word)  # names the prompt's words, or says the word was cut off
            words = list(args.words)
        else:
            words = [w for w in dict.fromkeys(table.words)
                     if w not in FUNCTION_WORDS and any(t.word == w for t in table.tokens)]
            if not words:
                raise InvalidInput(f"the prompt {args.prompt!r} has no content words to map (a, the, on, ... are "
                                   f"left out): give a prompt that names something, or --words")
        if args.edit is not None:
            from .editing.qk_injection import check_edit

            check_edit(probe, args.prompt, args.edit, seed=args.seed, steps=args.steps, **pair)

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    from .viz import t2i_vs_i2t, word_grid

    out = probe.generate(args.prompt, seed=args.seed, steps=args.steps, record=True, **image)
    blocks = "top" if set(probe.preset.top_layers) <= set(out.maps.blocks) else None
    figures = {"t2i_vs_i2t.png": lambda: t2i_vs_i2t(out.maps, words, blocks=blocks),
               "t2i_by_block.png": lambda: word_grid(out.maps, words, by="block"),
               "i2t_by_block.png": lambda: word_grid(out.maps, words, by="block", kind="i2t"),
               "t2i_by_step.png": lambda: word_grid(out.maps, words, by="step")}
    with _staging(folder) as staging:
        out.images[0].save(staging / "image.png")
        out.maps.save(staging / "maps.safetensors")
        for name, figure in figures.items():
            drawn = figure()
            drawn.savefig(staging / name, dpi=110)
            pyplot.close(drawn)  # pyplot keeps every figure it made open; a long session would pile them up
        if args.edit is not None:
            _write_edit(probe, args.prompt, args.edit, staging / "edit", image_paths=args.image, seed=args.seed,
                        steps=args.steps, **pair)
    print(f"wrote {', '.join(MAPS_FILES)}{' and edit/' if args.edit is not None else ''} to {folder}/")


def _edit(args: argparse.Namespace) -> None:
    folder = Path(args.out)
    _check_out(args.overwrite, (folder, EDIT_FILES))
    options = {k: getattr(args, k) for k in ("tau", "eta", "theta", "paper", "step_rounding", "blend_pool",
                                             "n_prev_steps") if getattr(args, k) is not None}
    options.update(seed=args.seed, steps=args.steps, variant=args.variant, local_blend=not args.no_blend)
    images = _read_images(args.image)
    with checking():
        probe = _load(args.model)
        probe.family.check_input_images(images, cli=True)
        if images:
            options.update(probe.family.image_inputs(images, 2))  # the edit runs source and target together
        from .editing.qk_injection import check_edit

        check_edit(probe, args.source, args.target, **options)
    with _staging(folder) as staging:
        count = _write_edit(probe, args.source, args.target, staging, image_paths=args.image, **options)
    print(f"wrote source.png, edited.png, {count} masks and params.json to {folder}/")


def _write_edit(probe, source: str, target: str, folder: Path, *, image_paths: list[str] | None = None,
                **options) -> int:
    """Edit and write source.png, edited.png, the masks and params.json (with the --image paths, where given)."""
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
    params = {**result.params, "images": list(image_paths)} if image_paths else result.params
    (folder / "params.json").write_text(json.dumps(params, indent=2))
    return len(result.masks)


def parser() -> argparse.ArgumentParser:
    top = ArgumentParser(prog="mmdit-probe", description=f"Look inside MM-DiTs ({', '.join(FAMILY_TITLES.values())}).")
    top.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = top.add_subparsers(dest="command", required=True)

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
    maps.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the preset's)")
    maps.add_argument("--words", nargs="+", help="words to show (default: the prompt's content words)")
    maps.add_argument("--edit", metavar="TARGET", help="also edit the image into this prompt (writes DIR/edit/)")
    maps.set_defaults(run=_maps)

    edit = commands.add_parser("edit", help="edit an image by prompt: q/k injection plus local blending")
    edit.add_argument("model", help="preset name (e.g. toy), hub id, or local pipeline directory")
    edit.add_argument("source", help="the source prompt")
    edit.add_argument("target", help="the target prompt")
    edit.add_argument("--out", default="out/edit", help="output directory (default: out/edit)")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: the preset's)")
    edit.add_argument("--variant", default="qiki", choices=list(EDIT_METHODS),
                      help="which activations the target takes from the source (default qiki)")
    edit.add_argument("--tau", type=_fraction, help="fraction of steps with q/k injection, 0-1 (default: preset)")
    edit.add_argument("--eta", type=_fraction, help="fraction of steps with local blending, 0-1 (default: preset)")
    edit.add_argument("--theta", type=_fraction, help="local-blend threshold, 0-1 (default: preset)")
    edit.add_argument("--no-blend", action="store_true", help="no local blending")
    edit.add_argument("--paper", choices=("printed", "run"),
                      help="take the options not given from the paper's released code (run: its SD3.5-M blocks as "
                           "its code really reads them)")
    edit.add_argument("--step-rounding", choices=STEP_ROUNDINGS,
                      help="ceil: steps s < tau*n (default); floor: s < int(tau*n), as the released code")
    edit.add_argument("--blend-pool", type=_positive, help="odd side of the max-pool before thresholding (1: none)")
    edit.add_argument("--n-prev-steps", type=lambda t: t if t == "all" else _positive(t),
                      help="masks from the maps of the last N blended steps, or 'all' (default 1)")
    edit.set_defaults(run=_edit)
    for sub in (maps, edit):  # the options both end with
        sub.add_argument("--image", action="append", metavar="PATH", help=IMAGE_HELP)
        sub.add_argument("--overwrite", action="store_true", help="replace files already in --out")

    from .sweep.commands import add_commands as add_sweep_commands  # light: the sweep imports lazily

    add_sweep_commands(commands)
    for sub in commands.choices.values():  # --debug is accepted after the command too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)  # argparse's errors: one line and exit code 2 (`ArgumentParser`)
    run_command(f"mmdit-probe {args.command}", lambda: args.run(args), debug=args.debug)


if __name__ == "__main__":
    main()

"""Zero-shot segmentation scores on a folder of images and masks, by ConceptAttention's protocol.

Each image's concept map of its target concept (softmax over the concepts, "background" among
them) is upsampled to the mask's size and scored: the binary prediction is the map above its own
mean value. Over the whole folder: pixel accuracy (correct pixels / all pixels), mIoU (the mean over
the two classes, foreground and background, of the dataset's intersection / union) and mAP (the mean
over images of the soft map's average precision), as in the protocol ConceptAttention takes from
Chefer et al. (ImageNet-Segmentation, PascalVOC single class).

A folder holds ``images/NAME.png`` (or .jpg), ``masks/NAME.png`` (non-zero pixels are the target)
and optionally ``labels.json`` ({"NAME": "dog", ...}: each image's target concept).

    python -m mmdit_probe.segmentation FOLDER --model sd3-medium --concepts background --out scores.json

Every input (the folder, the labels, the concepts of each image, the options) is checked before the
model loads; bad input exits with code 2, a failure while running with 1, each as one line (--debug
shows the traceback), as `mmdit-probe` does.

>>> segment_folder(probe, "data/voc", concepts=["background"], labels="labels.json")["miou"]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import validation
from .concepts import check_words
from .constants import CONCEPT_KINDS
from .entry_points import ArgumentParser, checking, run_command
from .image_maps import METHODS, check_sigma, image_maps
from .maps import upsample
from .tokens import normalise_word

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """Average precision of `scores` ranking the `target` pixels first: the sum over score thresholds (ties
    taken together, highest first) of precision times the recall gained there."""
    scores, target = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(target, dtype=bool).ravel()
    if not target.any():
        raise ValueError("average precision needs at least one target pixel")
    order = np.argsort(-scores, kind="stable")
    scores, target = scores[order], target[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(target)[last_of_tie]
    precision = true_positives / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, true_positives]) / target.sum()
    return float(np.sum(precision * recall_gain))


def segmentation_scores(soft_maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    """Pixel accuracy, mIoU (foreground and background) and mAP of soft maps against boolean masks of the
    same sizes; each map is thresholded at its own mean value."""
    if len(soft_maps) != len(masks) or not masks:
        raise validation.InvalidInput(f"give one map per mask (got {len(soft_maps)} maps, {len(masks)} masks)")
    correct = labelled = 0
    intersection, union = np.zeros(2), np.zeros(2)
    precisions = []
    for m, mask in zip(soft_maps, masks):
        m, mask = np.asarray(m, dtype=np.float64), np.asarray(mask, dtype=bool)
        if m.shape != mask.shape:
            raise validation.InvalidInput(f"a map of shape {m.shape} for a mask of shape {mask.shape}: upsample it")
        predicted = m > m.mean()
        correct += int((predicted == mask).sum())
        labelled += mask.size
        for c, (p, t) in enumerate(((~predicted, ~mask), (predicted, mask))):
            intersection[c] += (p & t).sum()
            union[c] += (p | t).sum()
        if mask.any():
            precisions.append(average_precision(m, mask))
    return {"pixel_accuracy": correct / labelled, "miou": float(np.mean(intersection / np.maximum(union, 1))),
            "map": float(np.mean(precisions)) if precisions else float("nan"), "images": len(masks)}


def read_folder(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """(name, image path, mask path) of every image with a mask, sorted by name."""
    folder = Path(folder)
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        raise FileNotFoundError(f"{folder} needs an images/ and a masks/ folder (masks/NAME.png for images/NAME.png)")
    found = []
    for image in sorted((folder / "images").iterdir()):
        if image.suffix.lower() in IMAGE_SUFFIXES:
            mask = folder / "masks" / f"{image.stem}.png"
            if not mask.is_file():
                raise FileNotFoundError(f"no mask {mask} for the image {image}")
            found.append((image.stem, image, mask))
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder / 'images'}")
    return found


def check_folder(folder: str | Path, concepts: list[str], labels: str | Path | dict | None = None, *,
                 kind: str = "concept", method: str = "noise", sigma: float | None = None) -> list[tuple]:
    """Every input of `segment_folder` checked, before any model runs: (name, image path, mask path, the image's
    concepts with its target first) of each image."""
    validation.choice("kind", kind, CONCEPT_KINDS)
    validation.choice("method", method, METHODS)
    check_sigma(method, sigma)  # as `image_maps` checks it, but before the model loads
    concepts = validation.concept_list("concepts", concepts)
    entries = read_folder(folder)
    labels = _labels(labels)
    if labels is None:
        own = check_words(concepts)
        return [(name, image, mask, own) for name, image, mask in entries]
    checked = []
    for name, image, mask in entries:
        if name not in labels:
            raise validation.InvalidInput(f"labels have no concept for the image {name!r}: add it, or leave labels "
                                          f"out to find concepts[0] in every image")
        target = labels[name]
        if not isinstance(target, str):
            raise validation.InvalidInput(f"the label of the image {name!r} is {target!r}: give a concept (str)")
        # A concept spelled as the label in another case is the label's concept, not a second one.
        own = [target, *[c for c in concepts if normalise_word(c) != normalise_word(target)]]
        try:
            check_words(own)
        except validation.InvalidInput as error:
            raise validation.InvalidInput(f"image {name!r} (label {target!r}): {error}") from None
        checked.append((name, image, mask, own))
    return checked


def _labels(labels: str | Path | dict | None) -> dict | None:
    """Labels as a dict {image name: concept}, read from a labels.json if given its path."""
    if isinstance(labels, (str, Path)):
        path = Path(labels)
        if not path.is_file():
            raise validation.InvalidInput(f"labels file {path} does not exist: give a labels.json "
                                          f"({{\"NAME\": \"dog\", ...}}) or leave labels out")
        labels = validation.json_file(path, "give one object {\"NAME\": \"dog\", ...}", label=f"labels file {path}")
        if not isinstance(labels, dict):
            raise validation.InvalidInput(f"labels file {path} holds a {type(labels).__name__}: give one object "
                                          f"{{\"NAME\": \"dog\", ...}}")
    if labels is not None and not isinstance(labels, dict):
        raise validation.InvalidInput("labels must be a dict {image name: concept} or a labels.json path")
    return labels


def segment_folder(probe, folder: str | Path, *, concepts: list[str], labels: str | Path | dict | None = None,
                   prompt: str = "", kind: str = "concept", blocks=None, method: str = "noise",
                   sigma: float | None = None, seed: int = 0, **generation) -> dict:
    """Scores of a folder (see the module docstring). Without labels the target is `concepts[0]`; with labels
    (a dict or a labels.json) each image's target is its label, put before `concepts` (e.g. ["background"]).
    kind: "concept" (output space) or "concept_xattn"; blocks as in `maps.concept` (default all);
    method, sigma: as in `image_maps` (default ConceptAttention's: one forward on the noised image)."""
    checked = check_folder(folder, concepts, labels, kind=kind, method=method, sigma=sigma)
    sigma = check_sigma(method, sigma)
    soft, masks, per_image = [], [], []
    for name, image_path, mask_path, own in tqdm(checked, desc="segment"):
        mask = np.asarray(Image.open(mask_path).convert("L")) > 0
        image = Image.open(image_path).convert("RGB")
        maps = image_maps(probe, image, prompt, own, method=method, sigma=sigma, seed=seed, **generation)
        m = upsample(maps.concept(own[0], kind=kind, blocks=blocks), mask.shape).numpy()
        soft.append(m)
        masks.append(mask)
        per_image.append({"name": name, "target": own[0], **segmentation_scores([m], [mask])})
    return {**segmentation_scores(soft, masks), "kind": kind, "method": method, "sigma": sigma,
            "per_image": per_image}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m mmdit_probe.segmentation", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default="toy")
    parser.add_argument("--concepts", nargs="+", default=["background"],
                        help="concepts of every image; the target is the first unless labels.json names it")
    parser.add_argument("--labels", type=Path, help="default: FOLDER/labels.json when it exists")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--kind", default="concept", choices=CONCEPT_KINDS)
    parser.add_argument("--method", default="noise", choices=METHODS)
    parser.add_argument("--sigma", type=float, help="noise level of --method noise, in (0, 1] (default 0.5)")
    parser.add_argument("--out", type=Path, default=Path("segmentation.json"))
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    # Two threads for the command; called in-process (a notebook, a test) it leaves the caller's setting as it was.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_command(parser.prog, lambda: _run(args), debug=args.debug)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> None:
    from .probe import load

    labels = args.labels or (args.folder / "labels.json" if (args.folder / "labels.json").is_file() else None)
    options = {"concepts": args.concepts, "labels": labels, "kind": args.kind, "method": args.method,
               "sigma": args.sigma}
    with checking():  # the output, the folder, every option and the model's loading: bad input, exit code 2
        if args.out.is_dir():
            raise validation.InvalidInput(f"--out {args.out} is a folder: give a file, e.g. {args.out}/scores.json")
        for parent in args.out.parents:
            if parent.exists() and not parent.is_dir():
                raise validation.InvalidInput(f"--out {args.out}: {parent} is a file, not a folder; choose another "
                                              f"--out")
        check_folder(args.folder, **options)
        probe = load(args.model)
    probe.pipeline.set_progress_bar_config(disable=True)
    result = segment_folder(probe, args.folder, prompt=args.prompt, **options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("pixel_accuracy", "miou", "map", "images")}, indent=2))


if __name__ == "__main__":
    main()

"""Read a Shapes-world image back: background, and each object's colour, shape, size and place.

Analytic: the background is the border's colour; objects are connected regions that differ from
it; colour is the nearest palette colour to the region's median; shape and size are the rendered
template (circle, square, triangle at each size, centred on the region) with the best IoU.
Its own accuracy on rendered scenes is measured by `judge_accuracy` (and quoted in the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .world import (
    BACKGROUNDS,
    COLOURS,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    render,
    sample_split_scene,
    word_masks,
)

MIN_AREA = 12  # pixels; smaller specks are noise, the smallest object covers ~50


@dataclass(frozen=True)
class Reading:
    colour: str
    shape: str
    size: str
    position: str
    mask: np.ndarray
    shape_iou: float  # how well the best template fits; low means a ragged or unclear shape


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    distances = [np.linalg.norm(rgb - np.array(palette[n], dtype=float)) for n in names]
    return names[int(np.argmin(distances))]


def read_background(image: np.ndarray) -> str:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
    return _nearest(np.median(border, axis=0), BACKGROUNDS)


def _position(cx: float) -> str:
    return "left" if cx < IMAGE_SIZE * 0.4 else "right" if cx > IMAGE_SIZE * 0.6 else "center"


def read_objects(image: np.ndarray) -> list[Reading]:
    """Objects in an RGB uint8 image, left to right.

    Each pixel is explained as a blend of the background and one palette colour (anti-aliased
    edges are such blends): it takes the colour whose blend line passes closest, and belongs to
    an object when more than half covered, as in the renderer's masks. Objects are the connected
    regions of one colour, so touching objects of different colours stay apart.
    """
    image = np.asarray(image).astype(float)
    background = np.array(BACKGROUNDS[read_background(image.astype(np.uint8))], dtype=float)
    names = list(COLOURS)
    direction = np.array([COLOURS[n] for n in names], dtype=float) - background  # (colour, rgb)
    offset = image - background
    coverage = offset @ direction.T / (direction**2).sum(axis=1)  # (h, w, colour)
    residual = np.linalg.norm(offset[..., None, :] - coverage[..., None] * direction, axis=-1)
    nearest = residual.argmin(axis=-1)
    # Slightly under one half: a half-covered edge pixel counts, as in the renderer (> 127 of 255).
    covered = np.take_along_axis(coverage, nearest[..., None], axis=-1)[..., 0] > 0.45
    readings = []
    for k, colour in enumerate(names):
        labels, count = ndimage.label(covered & (nearest == k))
        for index in range(1, count + 1):
            mask = labels == index
            if mask.sum() >= MIN_AREA:
                readings.append(_read_shape(mask, colour))
    return sorted(readings, key=lambda r: ndimage.center_of_mass(r.mask)[1])


def _read_shape(mask: np.ndarray, colour: str) -> Reading:
    _, cx = ndimage.center_of_mass(mask)
    rows, cols = np.nonzero(mask)
    centre = ((cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2)
    best = (-1.0, "", "")
    for shape in SHAPES:
        for size in SIZES:
            template = _template(shape, size, centre)
            best = max(best, ((template & mask).sum() / max((template | mask).sum(), 1), shape, size))
    return Reading(colour, best[1], best[2], _position(cx), mask, float(best[0]))


def _template(shape: str, size: str, centre: tuple[float, float]) -> np.ndarray:
    dx, dy = centre[0] - IMAGE_SIZE / 2, centre[1] - IMAGE_SIZE / 2
    obj = Shape(shape=shape, colour="red", size=size, position="center", dx=dx, dy=dy)
    return render(Scene((obj,), "white"))[1][0]


@dataclass(frozen=True)
class Verdict:
    """Per caption object: was an object found at its place, and were its colour and shape right."""

    found: list[bool]
    colour: list[bool]
    shape: list[bool]
    background: bool
    extra_objects: int


def match_objects(scene: Scene, readings: list[Reading], placed: bool = True) -> list[Reading | None]:
    """The reading that shows each of the scene's objects, or None. When the caption placed the
    objects they are matched by position (a lone object that drifted off its place still counts);
    otherwise the model chose the layout, and they are matched by colour and shape, then colour,
    then whatever is left."""
    if placed:
        rules = [lambda r, o: r.position == o.position]
        if len(scene.objects) == 1:
            rules.append(lambda r, o: True)
    else:
        rules = [lambda r, o: (r.colour, r.shape) == (o.colour, o.shape), lambda r, o: r.colour == o.colour,
                 lambda r, o: True]
    matches: list[Reading | None] = [None] * len(scene.objects)
    unmatched = list(readings)
    for rule in rules:
        for i, obj in enumerate(scene.objects):
            if matches[i] is None:
                matches[i] = next((r for r in unmatched if rule(r, obj)), None)
                if matches[i] is not None:
                    unmatched.remove(matches[i])
    return matches


def word_masks_from_image(scene: Scene, image: np.ndarray, placed: bool = True) -> dict[int, np.ndarray]:
    """Word index in `caption(scene, placed)` -> mask, from the objects found in the image itself
    (a generated image chooses its own layout), for the words of the objects it drew and the
    background."""
    found = [None if r is None else r.mask for r in match_objects(scene, read_objects(image), placed)]
    return {i: mask for i, (_, mask) in enumerate(word_masks(scene, found, placed)) if mask is not None}


def judge(image: np.ndarray, scene: Scene, placed: bool = True) -> Verdict:
    """Compare an image with the scene `caption(scene, placed)` describes (see `match_objects`)."""
    readings = read_objects(image)
    matches = match_objects(scene, readings, placed)
    return Verdict(
        found=[m is not None for m in matches],
        colour=[m is not None and m.colour == obj.colour for m, obj in zip(matches, scene.objects)],
        shape=[m is not None and m.shape == obj.shape for m, obj in zip(matches, scene.objects)],
        background=read_background(image) == scene.background,
        extra_objects=len(readings) - sum(m is not None for m in matches),
    )


def judge_accuracy(n: int = 500, seed: int = 1) -> dict[str, float]:
    """The judge's own accuracy on rendered (ground-truth) held-out scenes."""
    rng = np.random.default_rng(seed)
    verdicts = [judge(render(s)[0], s) for s in (sample_split_scene(rng, held_out=True) for _ in range(n))]
    return summarise(verdicts)


def summarise(verdicts: list[Verdict]) -> dict[str, float]:
    objects = sum(len(v.found) for v in verdicts)
    return {
        "objects": objects,
        "found": sum(map(sum, (v.found for v in verdicts))) / objects,
        "colour": sum(map(sum, (v.colour for v in verdicts))) / objects,
        "shape": sum(map(sum, (v.shape for v in verdicts))) / objects,
        "colour_and_shape": sum(c and s for v in verdicts for c, s in zip(v.colour, v.shape)) / objects,
        "background": sum(v.background for v in verdicts) / len(verdicts),
        "extra_objects": sum(v.extra_objects for v in verdicts) / len(verdicts),
    }

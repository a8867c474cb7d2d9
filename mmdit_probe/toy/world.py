"""The Shapes world: scenes of one or two coloured shapes with exact captions and masks.

A scene is drawn at 4x resolution and box-filtered down, so edges are anti-aliased like a
generated image, while masks come from the same geometry (pixel coverage > 1/2).

>>> scene = sample_scene(np.random.default_rng(0))
>>> image, masks = render(scene)           # (32, 32, 3) uint8, one bool mask per object
>>> caption(scene)
'on the left a small green square and on the right a large red circle on a black background'
>>> caption(scene, placed=False)  # the model chooses where the objects go
'a small green square and a large red circle on a black background'
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 9, "large": 13}
POSITIONS = ("left", "right", "center")
_CENTRE_X = {"left": 8.0, "right": 24.0, "center": 16.0}

# Every word the grammar can produce; the toy tokenizer has one token per word.
FILLER_WORDS = ("a", "on", "the", "and", "in", "background")
VOCABULARY: tuple[str, ...] = (
    FILLER_WORDS + tuple(SIZES) + tuple(COLOURS) + tuple(BACKGROUNDS) + SHAPES + POSITIONS
)
WORD_TYPE: dict[str, str] = {
    **{w: "size" for w in SIZES},
    **{w: "colour" for w in COLOURS},
    **{w: "background" for w in BACKGROUNDS},
    "background": "background",
    **{w: "shape" for w in SHAPES},
    **{w: "position" for w in POSITIONS},
}


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    position: str
    # Layout jitter in pixels, so the model sees layouts, not one fixed place per word.
    dx: float = 0.0
    dy: float = 0.0

    @property
    def centre(self) -> tuple[float, float]:
        return _CENTRE_X[self.position] + self.dx, IMAGE_SIZE / 2 + self.dy


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    background: str


def sample_scene(rng: np.random.Generator) -> Scene:
    """One or two objects; two objects always sit left and right, in either caption order."""
    def obj(position: str) -> Shape:
        return Shape(
            shape=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=str(rng.choice(list(SIZES))),
            position=position,
            dx=float(rng.uniform(-1.0, 1.0)),
            dy=float(rng.uniform(-6.0, 6.0)),
        )

    background = str(rng.choice(list(BACKGROUNDS)))
    if rng.random() < 0.3:
        return Scene((obj(str(rng.choice(POSITIONS))),), background)
    left, right = obj("left"), obj("right")
    return Scene((left, right) if rng.random() < 0.5 else (right, left), background)


def _where(o: Shape) -> list[str]:
    return ["in", "the", "center"] if o.position == "center" else ["on", "the", o.position]


def _object_phrase(o: Shape, placed: bool = True) -> list[str]:
    # Where first, so the shape word ends the phrase. The text encoders are causal (as SD3's CLIPs
    # are): a word carries only what precedes it, and image queries read the word that carries the
    # whole phrase. With the place last that word was "left"/"right", and colour and shape maps were
    # weak; with the shape word last they land on their object (README, "Why captions put the place
    # first").
    return [*(_where(o) if placed else []), "a", o.size, o.colour, o.shape]


def _caption_parts(scene: Scene, placed: bool) -> list[tuple[str, int | str | None]]:
    """Each caption word with what it names: an object's index, "background", or None (fillers)."""
    parts: list[tuple[str, int | str | None]] = []
    for i, o in enumerate(scene.objects):
        if i:
            parts.append(("and", None))
        parts += [(w, i if w in (o.size, o.colour, o.shape, o.position) else None) for w in _object_phrase(o, placed)]
    return parts + [("on", None), ("a", None), (scene.background, "background"), ("background", "background")]


def caption_words(scene: Scene, placed: bool = True) -> list[str]:
    return [word for word, _ in _caption_parts(scene, placed)]


def caption(scene: Scene, placed: bool = True) -> str:
    """The caption; `placed=False` leaves out where each object is (the model chooses)."""
    return " ".join(caption_words(scene, placed))


def is_held_out(scene: Scene) -> bool:
    """Fixed split: about 10% of the attribute combinations (the caption) never appear in training."""
    # Hashes the caption of the first grammar (place after shape), so the split stays the one every
    # shipped model was trained and evaluated on.
    phrases = [" ".join(["a", o.size, o.colour, o.shape, *_where(o)]) for o in scene.objects]
    key = " and ".join(phrases) + f" on a {scene.background} background"
    return zlib.crc32(key.encode()) % 10 == 0


def unplaced_caption_is_held_out(scene: Scene) -> bool:
    """Whether `caption(scene, placed=False)` is also the caption of a held-out scene with the same
    objects placed elsewhere; training must then keep the position words, or it would see a
    held-out attribute combination."""
    if len(scene.objects) == 1:
        layouts = [(p,) for p in POSITIONS]
    else:
        layouts = [("left", "right"), ("right", "left")]
    return any(
        is_held_out(replace(scene, objects=tuple(replace(o, position=p) for o, p in zip(scene.objects, layout))))
        for layout in layouts
    )


def sample_split_scene(rng: np.random.Generator, held_out: bool) -> Scene:
    while True:
        scene = sample_scene(rng)
        if is_held_out(scene) == held_out:
            return scene


def _draw(draw: ImageDraw.ImageDraw, o: Shape, fill) -> None:
    s = SUPERSAMPLE
    cx, cy = (c * s for c in o.centre)
    r = SIZES[o.size] * s / 2
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "square":
        r *= 0.9  # equal area to the eye: a square of the circle's width looks bigger
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Return the RGB image (uint8, IMAGE_SIZE^2) and one boolean coverage mask per object."""
    big = IMAGE_SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    masks = []
    for o in scene.objects:
        _draw(draw, o, COLOURS[o.colour])
        cover = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(cover), o, 255)
        small = np.asarray(cover.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
        masks.append(small > 127)
    # Later objects are drawn on top; objects never overlap by construction, but stay exact if they do.
    for i in range(len(masks)):
        for later in masks[i + 1:]:
            masks[i] = masks[i] & ~later
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)), masks


def word_masks(scene: Scene, object_masks: list[np.ndarray | None],
               placed: bool = True) -> list[tuple[str, np.ndarray | None]]:
    """Ground truth per word of `caption(scene, placed)`, in caption order: the object's mask for
    its size, colour, shape and position words, the background mask for the background words, None
    for fillers (and for the words of an object whose mask is None, e.g. one missing from a
    generated image)."""
    present = [m for m in object_masks if m is not None]
    background = ~np.any(present, axis=0) if present else np.ones((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    return [(word, background if names == "background" else None if names is None else object_masks[names])
            for word, names in _caption_parts(scene, placed)]


def with_object(scene: Scene, index: int, **changes) -> Scene:
    """The same scene with one object's attributes changed (for editing pairs)."""
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **changes)
    return replace(scene, objects=tuple(objects))

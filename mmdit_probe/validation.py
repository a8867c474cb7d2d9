"""One place for the checks of user-facing parameters, run before any model call.

Every check names the parameter, the value it got, what is allowed and what to do; the API
(`Probe.inputs/generate`, `edit`, `invert`, `AttentionRecorder`, `AttentionMaps`, `load`) and the
CLI share them. Integers may be Python or numpy integers (never bools or floats); numbers must be
finite.

>>> positive_int("steps", 0)
Traceback (most recent call last):
ValueError: steps=0 is not allowed: give a whole number >= 1 (or leave steps out for the preset's default)
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class InvalidInput(ValueError):
    """A user-facing parameter refused before anything ran (the CLI answers it with exit code 2)."""


class BlockIndexError(InvalidInput, IndexError):
    """A block index the model does not have: bad input, and an IndexError as block lookups always raised."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, *, minimum: int | None = None, default_hint: str = "") -> int:
    """A whole number (Python or numpy), at least `minimum`; returned as a Python int."""
    allowed = f"a whole number{'' if minimum is None else f' >= {minimum}'}{default_hint}"
    if not _is_int(value):
        raise InvalidInput(f"{name}={value!r} ({type(value).__name__}) is not allowed: give {allowed}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise InvalidInput(f"{name}={value} is not allowed: give {allowed}")
    return value


def positive_int(name: str, value: Any, *, default_hint: str | None = None) -> int:
    hint = f" (or leave {name} out for the preset's default)" if default_hint is None else default_hint
    return integer(name, value, minimum=1, default_hint=hint)


def optional_positive_int(name: str, value: Any) -> int | None:
    """None (the preset's default) or a whole number >= 1: 0 never silently means the default."""
    return None if value is None else positive_int(name, value)


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None, what: str = "") -> float:
    """A finite real number in [low, high]; returned as a float."""
    allowed = (f"a number in [{low}, {high}]" if low is not None and high is not None
               else f"a number >= {low}" if low is not None else "a finite number")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidInput(f"{name}={value!r} ({type(value).__name__}) is not allowed: give {allowed}{what}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        raise InvalidInput(f"{name}={value!r} is not allowed: give {allowed}{what}")
    return value


def fraction(name: str, value: Any, what: str = "") -> float:
    """A number in [0, 1] (a share of the steps, a threshold on max-normalised maps)."""
    return number(name, value, low=0.0, high=1.0, what=what)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name}={value!r} is not allowed: give True or False")
    return value


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidInput(f"{name}={value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}")
    return value


def items(name: str, value: Any, item, *, one: str, empty: str, each: str) -> list:
    """One item (`item(value)` is true) or a non-empty list of items. The messages end with `one` (what to give
    instead of a non-list), `empty` (after "name=[]") and `each` (after "name", for an item that is not one)."""
    found = [value] if item(value) else value
    if isinstance(found, (str, bytes, dict)) or not isinstance(found, Iterable):
        raise InvalidInput(f"{name}={value!r} is not allowed: give {one}")
    found = list(found)
    if not found:
        raise InvalidInput(f"{name}=[] {empty}")
    for x in found:
        if not item(x):
            raise InvalidInput(f"{name} {each}; got {x!r} ({type(x).__name__})")
    return found


def index_list(name: str, values: Any, *, what: str = "indices") -> list[int]:
    """A non-empty list of distinct whole numbers (one whole number is a list of one)."""
    found = items(name, values, _is_int, one=f"a whole number or a list of {what}",
                  empty=f"selects nothing: give at least one of the {what}, or leave {name} out for all",
                  each=f"must hold whole numbers ({what})")
    ints = [int(v) for v in found]
    duplicates = sorted({v for v in ints if ints.count(v) > 1})
    if duplicates:
        raise InvalidInput(f"{name} names {duplicates} more than once: give each of the {what} once")
    return ints


BLOCKS_MESSAGE = "block index {block!r} out of range: {model} has blocks 0..{last}"


def blocks(name: str, values: Any, n_blocks: int, *, model: str = "the model", template: str = BLOCKS_MESSAGE,
           **fields: Any) -> list[int]:
    """Distinct block indices (one index is a list of one), each in 0..n_blocks-1, else `BlockIndexError`.

    `template` is formatted with `name`, `block` (the first index out of range), `bad` (all of them), `values`
    (every index), `last` (n_blocks - 1), `model` and `fields`."""
    found = index_list(name, values, what="block indices")
    bad = [b for b in found if not 0 <= b < n_blocks]
    if bad:
        raise BlockIndexError(template.format(name=name, block=bad[0], bad=bad, values=found, last=n_blocks - 1,
                                              model=model, **fields))
    return found


def word_list(name: str, words: Any) -> list[str | int]:
    """One word (or word index), or a non-empty list of them."""
    found = items(name, words, lambda w: isinstance(w, str) or _is_int(w),
                  one="a word, a word index, or a list of them",
                  empty="selects no word: give at least one word of the prompt",
                  each="must hold words (str) or word indices (int)")
    if any(isinstance(w, str) and not w.strip() for w in found):
        raise InvalidInput(f"{name} holds an empty word: give words of the prompt")
    return [w if isinstance(w, str) else int(w) for w in found]


PROMPT_MESSAGE = "{name}={value!r} is not allowed: give a prompt (str)"


def prompt(name: str, value: Any, *, empty_ok: bool = True, message: str = PROMPT_MESSAGE) -> str:
    """One prompt: a str, and with `empty_ok=False` one that is not blank. `message` is formatted with `name`,
    `value` and `type` (the value's type name)."""
    if not isinstance(value, str) or not (empty_ok or value.strip()):
        raise InvalidInput(message.format(name=name, value=value, type=type(value).__name__))
    return value


def strings(name: str, value: Any, *, one: str, empty: str, each: str) -> list[str]:
    """One str or a non-empty list of them (messages as `items`)."""
    return items(name, value, lambda x: isinstance(x, str), one=one, empty=empty, each=each)


def prompts(value: Any, name: str = "prompts") -> list[str]:
    """One prompt or a non-empty list of prompts (strings)."""
    return strings(name, value, one="a prompt (str) or a list of prompts", empty="is empty: give at least one prompt",
                   each="must be strings")


def edit_prompts(source: Any, target: Any) -> None:
    """An editor's two prompts: both non-empty strings."""
    for name, value in (("source", source), ("target", target)):
        prompt(name, value, empty_ok=False,
               message="{name}={value!r} is not allowed: give the {name} prompt (a non-empty str)")


def skip_layer_guidance(inputs: dict[str, Any]) -> None:
    """Refuse SD3's skip-layer guidance: its extra transformer calls on some steps have no place in any layout of the
    calls (recording, patching and editing count each step's calls)."""
    if inputs.get("skip_guidance_layers"):
        raise InvalidInput("skip_guidance_layers runs the transformer twice per step; record or patch without it")


def true_cfg(inputs: dict[str, Any]) -> bool:
    """Whether these pipeline inputs run true CFG (Flux.1, Kontext, Qwen-Image): `true_cfg_scale` > 1 with a negative
    prompt, the negative prompt as a second transformer call per step (the pipelines' `do_true_cfg`)."""
    negative = inputs.get("negative_prompt") is not None or inputs.get("negative_prompt_embeds") is not None
    return inputs.get("true_cfg_scale", 1.0) > 1 and negative


def one_call_per_step(inputs: dict[str, Any], calls: int | None = None,
                      second_call: str = "true CFG, true_cfg_scale > 1 with a negative_prompt (Flux, Qwen-Image)"
                      ) -> None:
    """Refuse options that add transformer calls per step, for the paths that take one call as the whole velocity
    (sampling, inversion and the editors built on them): from the options alone, before any model call, or from a
    family's `calls` per step and what makes its `second_call` (`Family.check_one_call_per_step`)."""
    skip_layer_guidance(inputs)
    if (1 + true_cfg(inputs) if calls is None else calls) > 1:
        raise InvalidInput(f"these inputs run guidance as a second transformer call per step (the transformer runs "
                           f"twice per step: {second_call}), and this path takes one transformer call as the whole "
                           f"velocity: use guidance 1 here; recording, activation patching and the q/k editor "
                           f"(probe.edit) take two-call runs")


def json_file(path: str | Path, fix: str, label: str | None = None) -> Any:
    """The JSON value in the file at `path`; `InvalidInput` "`label` (default: the path) is not valid JSON (...):
    `fix`" where the file holds none."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"{label or path} is not valid JSON ({error}): {fix}") from None


def image_size(name: str, value: Any, multiple: int) -> int:
    """An image side in pixels: a whole number >= `multiple`, divisible by it (one image token's side)."""
    value = positive_int(name, value)
    if value % multiple:
        below, above = value - value % multiple, value - value % multiple + multiple
        suggestion = f"{below} or {above}" if below else f"{above}"
        raise InvalidInput(f"{name}={value} is not allowed: image sides must be multiples of {multiple} pixels "
                           f"(one image token); use {suggestion}")
    return value


def float_dtype(name: str, value: Any):
    import torch

    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise InvalidInput(f"{name}={value!r} is not allowed: give a floating-point torch dtype "
                           f"(torch.float16, torch.bfloat16 or torch.float32)")
    return value


def latents(value: Any, shapes: tuple[tuple[int, ...], ...], fits: str, hint: str = ""):
    """An initial-latent tensor of one of `shapes` (the first is named in the message), of finite values."""
    import torch

    if not isinstance(value, torch.Tensor) or tuple(value.shape) not in shapes:
        raise InvalidInput(f"latents of shape {tuple(getattr(value, 'shape', ()))} do not fit {fits}: give a tensor "
                           f"of shape {shapes[0]}{hint}")
    if not torch.isfinite(value).all():
        raise InvalidInput("latents hold NaN or infinite values")
    return value


def known_keywords(name: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse keywords a function would pass on to a place that does not take them, with a suggestion."""
    import difflib

    allowed = sorted(set(allowed))
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(allowed)}"
            raise InvalidInput(f"{name} got an unknown keyword {key!r}{hint}")


# Counts, top-k and thresholds: one checker each, used by every entry point.


def count(name: str, value: Any, what: str = "") -> int:
    """How many of something to take (prompts, blocks, concepts): a whole number >= 1, never 0 meaning "all"."""
    return integer(name, value, minimum=1, default_hint=what)


def top_k(name: str, value: Any, available: int, what: str = "blocks") -> int:
    """How many of `available` ranked items to keep: a whole number in [1, available]."""
    value = count(name, value)
    if value > available:
        raise InvalidInput(f"{name}={value} is not allowed: there are only {available} {what}; give a whole number "
                           f"from 1 to {available}")
    return value


def threshold(name: str, value: Any, what: str = " (maps are max-normalised to [0, 1])") -> float:
    """A threshold on max-normalised maps or masks: a number in [0, 1]."""
    return fraction(name, value, what=what)


# Images and image-token regions


def image_side(name: str, value: Any, multiple: int, largest: int | None) -> int:
    """An image side the transformer can take: `image_size`, and at most `largest` pixels where its positional table
    ends there (a family adapter's `max_image_side`, e.g. SD3's `pos_embed_max_size`; None: no limit)."""
    value = image_size(name, value, multiple)
    if largest is not None and value > largest:
        raise InvalidInput(f"{name}={value} is not allowed: this transformer's positional table covers at most "
                           f"{largest} pixels a side; use {largest} or less")
    return value


# PIL modes whose conversion to RGB keeps the picture: 1- and 8-bit bands with a colour conversion PIL knows. PIL
# clips 16-bit, 32-bit and float values ("I;16", "I", "F") to 0-255 (a float image in [0, 1] turns black) and copies
# "LAB" bands unconverted; the right scaling is the caller's to say, so those modes are refused.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV")


def real_image(value: Any, name: str = "image"):
    """A real image as a PIL image, checked before any conversion or resizing (so an empty image is never stretched
    into a black one): a PIL image in one of `IMAGE_MODES`, or a uint8 array (height, width), (height, width, 3) or
    (height, width, 4); at least one pixel."""
    import numpy as np
    from PIL import Image

    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8:
            raise InvalidInput(f"{name} arrays must be uint8 (0-255); got {value.dtype}: scale the values to 0-255 "
                               f"and convert with .astype(np.uint8)")
        if not (value.ndim == 2 or (value.ndim == 3 and value.shape[2] in (3, 4))):
            first = value.ndim == 3 and value.shape[0] in (3, 4)
            raise InvalidInput(f"{name} array of shape {value.shape} is not allowed: give (height, width), "
                               f"(height, width, 3) or (height, width, 4)"
                               + ("; it looks channels-first: use array.transpose(1, 2, 0)" if first else ""))
        if 0 in value.shape[:2]:
            raise InvalidInput(f"{name} is empty ({value.shape[1]}x{value.shape[0]} pixels): give an image with pixels")
        value = Image.fromarray(value)
    elif not isinstance(value, Image.Image):
        raise InvalidInput(f"{name} of type {type(value).__name__} is not allowed: expected a PIL image or a uint8 "
                           f"array (height, width, 3)")
    if value.mode not in IMAGE_MODES:
        raise InvalidInput(f"{name} has mode {value.mode!r}, whose values a conversion to RGB would clip or garble: "
                           f"convert it to 8-bit RGB yourself (scale its values to 0-255), or give a uint8 array")
    if 0 in value.size:
        raise InvalidInput(f"{name} is empty ({value.size[0]}x{value.size[1]} pixels): give an image with pixels")
    return value


REGION_THRESHOLD = 0.5  # a soft region mask selects the tokens where it is at least this


def region_mask(name: str, value: Any):
    """A token-grid region as a boolean tensor: a boolean array or tensor, or numbers in [0, 1] of which those
    >= `REGION_THRESHOLD` select a token. NaN and values outside [0, 1] are refused (``mask.bool()`` would select
    them, so a mask that is NaN outside its region would select every token)."""
    import torch

    try:
        mask = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInput(f"{name} of type {type(value).__name__} is not allowed: give a boolean array or tensor, "
                           f"or numbers in [0, 1]") from error
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise InvalidInput(f"{name} holds complex numbers: give a boolean mask, or real numbers in [0, 1]")
    mask = mask.double()
    if torch.isnan(mask).any():
        raise InvalidInput(f"{name} holds NaN: give a boolean mask, or numbers in [0, 1] (>= {REGION_THRESHOLD} "
                           f"selects a token)")
    if mask.numel() and (mask.min() < 0 or mask.max() > 1):
        low, high = float(mask.min()), float(mask.max())
        raise InvalidInput(f"{name} holds values outside [0, 1] (from {low:g} to {high:g}): give a boolean mask, or "
                           f"numbers in [0, 1] of which >= {REGION_THRESHOLD} select a token (for a 0/255 or signed "
                           f"mask, pass mask > 0)")
    return mask >= REGION_THRESHOLD


def concept_list(name: str, value: Any) -> list[str]:
    """One concept (str) or a non-empty list of them, as a selection of recorded concepts (`maps.concept`)."""
    return strings(name, value, one="a concept (str) or a list of concepts",
                   empty="selects no concept: give at least one concept recorded for the prompt",
                   each="must hold concepts (str)")


"""What every editing method shares: the result type, the edited words and their mask, the source-to-target row
patch, both prompts' shared start (from noise or from a real image's inversion), and the checked options of that
inversion."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import validation
from ..maps import AttentionMaps, normalise, smooth
from ..patching import replace_rows, rows
from ..sampling.images import as_image, encode
from ..sampling.inversion import check_inversion, invert_latents
from ..tokens import normalise_word


@dataclass
class EditResult:
    """Source and edited images, the local-blend mask of each blended step (token grid, 0/1),
    the edited words' T2I maps that made them, and every parameter used."""

    source_image: Any
    edited_image: Any
    masks: list[np.ndarray]
    maps: AttentionMaps | None
    params: dict[str, Any]
    inputs: dict[str, Any] = field(repr=False)


def edited_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """Words that differ between two prompts: (source side, target side)."""
    a, b = normalise_word(source).split(), normalise_word(target).split()
    left, right = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op != "equal":
            left += a[i1:i2]
            right += b[j1:j2]
    return left, right


def blend_mask(maps: torch.Tensor, columns: list[int], grid: tuple[int, int], theta: float,
               pool: int = 1) -> torch.Tensor:
    """Binary mask from (block, image, text) T2I maps: mean over blocks and the word columns,
    Gaussian-smoothed, max-pooled over `pool` x `pool` tokens (1: not pooled; the paper's SD3 code: 3),
    max-normalised, thresholded at theta. Maps of several steps stacked on the first dimension are averaged too."""
    m = smooth(maps[..., columns].float().mean(dim=(0, -1)).reshape(grid))
    if pool > 1:
        m = torch.nn.functional.max_pool2d(m[None, None], pool, stride=1, padding=pool // 2)[0, 0]
    return (normalise(m) >= theta).float()


def source_and_target(x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The target's rows take the source's (prompts [source, target]; each guidance half from its own half)."""
    return replace_rows(x, rows(2, x, 0, "both"), rows(2, x, 1, "both"), positions=positions)


def start_from(inputs: dict[str, Any], latents: torch.Tensor | None, *, check: bool = True) -> None:
    """Source and target (the prompts of `inputs`) both start from one prompt's initial `latents`; None keeps the
    noise drawn for the seed. `check`: latents the caller gave, refused unless they fit these sizes."""
    if latents is None:
        return
    if check:
        shape = tuple(inputs["latents"].shape[1:])
        validation.latents(latents, ((1, *shape), shape), "one prompt at these sizes (the edit repeats it)")
    inputs["latents"] = latents.to(inputs["latents"]).expand_as(inputs["latents"]).clone()


def _encoded(probe, image, height: int, width: int) -> torch.Tensor:
    return encode(probe, as_image(image, (width, height)), height, width)


def start_from_image(probe, inputs: dict[str, Any], image, source: str, **inversion: Any) -> torch.Tensor:
    """Source and target start from the noise that inverting `image` with the `source` prompt gives (`inversion`:
    method, iterations and generation options of `invert_latents`); returns the image's clean latents."""
    clean = _encoded(probe, image, inputs["height"], inputs["width"])
    start_from(inputs, invert_latents(probe, clean, source, **inversion), check=False)
    return clean


def inversion_options(image, inversion: str | None, iterations: int | None) -> tuple[str | None, int | None]:
    """A real-image edit's checked inversion method and iterations (default fixed-point, 3); refused without
    `image`, where nothing is inverted."""
    if image is None:
        for name, value in (("inversion", inversion), ("iterations", iterations)):
            if value is not None:
                raise validation.InvalidInput(f"{name}= is for image= (how a real image is inverted): leave it out, "
                                              f"or give the image")
        return None, None
    inversion = "fixed-point" if inversion is None else inversion
    return inversion, check_inversion(inversion, 3 if iterations is None else iterations)

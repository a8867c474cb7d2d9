"""A patching metric for the Shapes world: the judge's reading of the patched images."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .. import validation
from ..patching.metrics import Metric
from ..validation import InvalidInput
from .judge import read_objects


def shapes_judge(attribute: str = "colour", obj: int = 0) -> Metric:
    """A metric for the Shapes world (output="image"): the judge's reading of one object's attribute.

    1 where the judge reads the corrupt image's value (e.g. "blue"), 0 where it reads the clean
    image's, NaN where it reads something else or finds no object. Objects count from the left.

    >>> activation_patching(probe, clean, corrupt, "v_txt", metric=shapes_judge("colour"))
    """
    validation.choice("attribute", attribute, ("colour", "shape", "size", "position"))
    obj = validation.integer("obj", obj, minimum=0)

    def read(image: torch.Tensor) -> str | None:
        if image.ndim != 3 or image.shape[0] != 3:
            raise InvalidInput("shapes_judge reads images: run with output='image'")
        pixels = (image.permute(1, 2, 0).double().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        found = read_objects(pixels)
        return getattr(found[obj], attribute) if len(found) > obj else None

    def judged(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
        low, high = read(clean), read(corrupt)
        if low is None or high is None or low == high:
            warnings.warn(f"the judge reads the clean and corrupt images' {attribute} as {low!r} and {high!r}: "
                          f"they must differ for this metric (NaN)", UserWarning, stacklevel=3)
        values = [1.0 if r == high and r != low else 0.0 if r == low and r != high else float("nan")
                  for r in map(read, patched)]
        return torch.tensor(values, dtype=torch.float64)

    judged.__name__ = f"judge {attribute}"
    judged.needs_images = True
    return judged

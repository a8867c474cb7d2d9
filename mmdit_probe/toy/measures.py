"""The Shapes world's measure of change, offered to vital layers as the measure "judge" (by name: the core never
imports the toy)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..validation import InvalidInput
from .judge import read_background, read_objects
from .world import IMAGE_SIZE


def check_judge_size(size: tuple[int, int]) -> None:
    """Refuse images of a (height, width) the judge cannot read (it reads Shapes-world images only)."""
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise InvalidInput(f"measure 'judge' reads Shapes-world images of {IMAGE_SIZE}x{IMAGE_SIZE} "
                           f"pixels; these are {size[0]}x{size[1]}: use the toy model at its size")


def judge_change(reference, changed) -> float:
    """1 - the share of the reference's objects (colour, shape, size, place) and background read back unchanged."""
    ref, new = np.asarray(reference), np.asarray(changed)
    left = Counter((r.colour, r.shape, r.size, r.position) for r in read_objects(new))
    kept = 0
    wanted = [(r.colour, r.shape, r.size, r.position) for r in read_objects(ref)]
    for key in wanted:
        if left[key] > 0:
            left[key] -= 1
            kept += 1
    kept += read_background(ref) == read_background(new)
    return 1.0 - kept / (len(wanted) + 1)

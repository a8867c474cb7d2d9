"""The Shapes world as a sweep's prompt set and mask source: `sweep(model, "toy", out)` and `--masks toy` find
these by name (`sweep.run.PROMPT_SOURCES`, `sweep.masks.MASK_SOURCES`)."""

from __future__ import annotations

import numpy as np

from ..sweep.run import PromptItem
from .judge import word_masks_from_image
from .world import WORD_TYPE, caption, sample_split_scene


def toy_prompts(n: int = 100, seed: int = 0) -> list[PromptItem]:
    """`n` held-out Shapes-world captions (never seen in training); prompt i gets seed `seed + i`.

    >>> toy_prompts(2)[0].prompt
    'on the left a small green square and on the right a large red circle on a black background'
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_split_scene(rng, held_out=True) for _ in range(n)]
    return [PromptItem(f"toy{i:05d}", caption(s), seed + i, s, WORD_TYPE) for i, s in enumerate(scenes)]



class ToyMasks:
    """The Shapes world's ground truth: the judge reads each object off the *generated* image
    (`toy.judge.word_masks_from_image`), so masks follow the layout the model chose."""

    def describe(self) -> str:
        return "toy"

    def __call__(self, item, image: np.ndarray, words: list[tuple[int, str]]) -> dict[int, np.ndarray]:
        if item.scene is None:
            raise ValueError(f"prompt {item.id!r} is not a Shapes-world scene: toy masks need --prompts toy; "
                             "for your own prompts give --masks DIR or --masks grounded-sam")
        found = word_masks_from_image(item.scene, image)
        return {i: found[i] for i, _ in words if i in found}

"""Scores of attention maps against ground-truth masks, and per-block layer selection.

A map is max-normalised, optionally smoothed, upsampled to the mask's size, then compared:
soft IoU, binary cross-entropy, mean squared error, and IoU after thresholding. Ranking blocks by
these is what explains a preset's "top-5 layers", and how to choose them for a new checkpoint.
A map has one value per token, so it cannot match a pixel mask exactly: `coverage` gives the map
a perfect block would hold (each token weighted by its share of the object), a reference for every
score, and `token_mask` the mask at the map's own resolution, for scoring there instead.

>>> scores = score_blocks(maps, {"cat": cat_mask}, prompt=0)
>>> scores.top(5)                    # best blocks by soft IoU
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .maps import AttentionMaps, normalise, smooth, upsample

METRICS = ("soft_iou", "iou", "bce", "mse")
HIGHER_IS_BETTER = {"soft_iou": True, "iou": True, "bce": False, "mse": False}


def _as_mask(mask) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.ndim != 2:
        raise ValueError(f"masks must be 2-D (height, width); got shape {tuple(m.shape)}")
    return m


def score_map(prediction: torch.Tensor, mask, threshold: float = 0.5) -> dict[str, float]:
    """Scores of a [0, 1] map (any size; resized to the mask) against a binary mask."""
    target = _as_mask(mask)
    p = prediction.float()
    if p.shape != target.shape:
        p = upsample(p, tuple(target.shape))
    p = p.clamp(0, 1)
    intersection = (p * target).sum()
    union = (p + target - p * target).sum().clamp_min(1e-12)
    binary = (p >= threshold).float()
    hard_union = ((binary + target) > 0).float().sum().clamp_min(1e-12)
    eps = 1e-6
    bce = -(target * torch.log(p.clamp(eps, 1)) + (1 - target) * torch.log((1 - p).clamp(eps, 1))).mean()
    return {"soft_iou": float(intersection / union), "iou": float((binary * target).sum() / hard_union),
            "bce": float(bce), "mse": float(((p - target) ** 2).mean())}


def coverage(mask, grid: tuple[int, int]) -> torch.Tensor:
    """The fraction of each token's patch that a pixel mask covers, on the (rows, cols) token grid:
    the map of a block that attends to exactly the object, token by token.

    >>> score_map(coverage(mask, (8, 8)), mask)["iou"]   # about 0.8 for a Shapes-world object
    """
    m = _as_mask(mask)
    if m.shape[0] % grid[0] or m.shape[1] % grid[1]:
        raise ValueError(f"a {tuple(m.shape)} mask does not split into a {grid} token grid; "
                         "pass the mask at the generated image's size")
    return F.avg_pool2d(m[None, None], (m.shape[0] // grid[0], m.shape[1] // grid[1]))[0, 0]


def token_mask(mask, grid: tuple[int, int]) -> torch.Tensor:
    """A pixel mask on the token grid: the tokens it covers at least half of. Scoring a map against
    it (`score_map(m, token_mask(mask, m.shape))`) compares at the map's own resolution."""
    return (coverage(mask, grid) >= 0.5).float()


@dataclass
class BlockScores:
    """Mean scores per block over the given words (and prompts)."""

    blocks: list[int]
    scores: dict[str, np.ndarray]  # metric -> (block,)
    kind: str

    def ranked(self, metric: str = "soft_iou") -> list[int]:
        """Blocks from best to worst by a metric."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose from {METRICS}")
        order = np.argsort(self.scores[metric])
        if HIGHER_IS_BETTER[metric]:
            order = order[::-1]
        return [self.blocks[i] for i in order]

    def top(self, k: int = 5, metric: str = "soft_iou") -> list[int]:
        return self.ranked(metric)[:k]

    def table(self) -> str:
        lines = [f"{'block':>5}  " + "  ".join(f"{m:>8}" for m in METRICS)]
        for i, b in enumerate(self.blocks):
            lines.append(f"{b:>5}  " + "  ".join(f"{self.scores[m][i]:8.3f}" for m in METRICS))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"BlockScores({self.kind}, best by soft IoU: {self.top(5)})\n{self.table()}"


def score_blocks(maps: AttentionMaps, masks: dict, *, prompt: int = 0, kind: str = "t2i", steps=None,
                 smoothing: bool = False, threshold: float = 0.5) -> BlockScores:
    """Score every recorded block's map of each word against its mask, averaged over the words.

    masks: word (or word index) -> boolean (height, width) array for prompt `prompt`.
    """
    if not masks:
        raise ValueError("no masks given: pass {word: mask}")
    per_block = maps.per_block  # (block, rows, cols) per word
    results = {m: np.zeros(len(maps.blocks)) for m in METRICS}
    for word, mask in masks.items():
        stack = per_block(word, prompt=prompt, kind=kind, steps=steps)
        for i, m in enumerate(stack):
            m = smooth(m) if smoothing else m
            for metric, value in score_map(normalise(m), mask, threshold).items():
                results[metric][i] += value / len(masks)
    return BlockScores(list(maps.blocks), results, kind)

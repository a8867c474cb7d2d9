"""Scores of attention maps against ground-truth masks, and per-block layer selection.

A map is max-normalised, optionally smoothed, upsampled to the mask's size, then compared:
soft IoU, binary cross-entropy, mean squared error, and IoU after thresholding. Ranking blocks by
these is what explains a preset's "top-5 layers", and how to choose them for a new checkpoint.
A map has one value per token, so it cannot match a pixel mask exactly: `coverage` gives the map
a perfect block would hold (each token weighted by its share of the object), a reference for every
score, and `token_mask` the mask at the map's own resolution, for scoring there instead.
`score_maps` scores many maps against one mask in a batch (a sweep's block x step maps of a word).

>>> scores = score_blocks(maps, {"cat": cat_mask}, prompt=0)
>>> scores.top(5)                    # best blocks by soft IoU
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .constants import HIGHER_IS_BETTER, METRICS
from .maps import AttentionMaps, normalise, smooth


def _as_mask(mask) -> torch.Tensor:
    m = mask.float() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if m.ndim != 2:
        raise ValueError(f"masks must be 2-D (height, width); got shape {tuple(m.shape)}")
    return m


def _pixel_terms(p: torch.Tensor, target: torch.Tensor, threshold: float, binary_target: bool) -> torch.Tensor:
    """The six per-pixel terms whose sums make the four scores, stacked: (6, *p.shape)."""
    overlap = p * target
    binary = (p >= threshold).float()
    eps = 1e-6
    if binary_target:
        # t log a + (1 - t) log b is exactly log a where t = 1 and log b where t = 0: one log, not two.
        log_likelihood = torch.where(target.bool(), p, 1 - p).clamp_(eps, 1).log_()
    else:
        log_likelihood = target * torch.log(p.clamp(eps, 1)) + (1 - target) * torch.log((1 - p).clamp(eps, 1))
    return torch.stack([overlap, p + target - overlap, ((binary + target) > 0).float(), binary * target,
                        log_likelihood, (p - target) ** 2])


def score_maps(predictions: torch.Tensor, mask, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Scores of N [0, 1] maps, (N, rows, cols) of any size, against one binary mask: {metric: (N,) tensor}.

    All maps are upsampled to the mask in one call and scored together, on the maps' device; a map
    scores the same alone (`score_map`) as in any batch. The upsampled maps take N x 4 bytes per mask
    pixel (64 MB for 16 maps at 1024 px), so score large sets in chunks.
    """
    if predictions.ndim != 3:
        raise ValueError(f"predictions must be (N, rows, cols); got shape {tuple(predictions.shape)}")
    target = _as_mask(mask).to(predictions.device)
    p = predictions.float()
    if p.shape[1:] != target.shape:
        p = F.interpolate(p[:, None], size=tuple(target.shape), mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1)
    else:
        p = p.clamp(0, 1)  # not in place: p may be the caller's tensor
    n, height, width = p.shape
    binary_target = bool(((target == 0) | (target == 1)).all())
    if height * width < 32768:
        # Below torch's parallel grain a map's sum runs on one thread, in one order, whatever the batch.
        sums = _pixel_terms(p, target, threshold, binary_target).flatten(2).sum(2)
    else:
        # torch sums one long row in pieces on several threads (so a lone map's rounding would depend on
        # the thread count and differ from the same map's in a batch) but many rows on one thread each:
        # summing every image row, then the rows, fixes the order. Bands of rows keep the temporaries
        # small on the CPU, where filling fresh memory costs as much as the arithmetic at 1024 px.
        rows = max(1, (2**18 if p.device.type == "cpu" else 2**24) // (n * width))
        sums = torch.cat([_pixel_terms(p[:, r:r + rows], target[r:r + rows], threshold, binary_target).sum(3)
                          for r in range(0, height, rows)], dim=2).sum(2)
    intersection, union, hard_union, hard_intersection, log_likelihood, squared_error = sums
    return {"soft_iou": intersection / union.clamp_min(1e-12), "iou": hard_intersection / hard_union.clamp_min(1e-12),
            "bce": -log_likelihood / (height * width), "mse": squared_error / (height * width)}


def score_map(prediction: torch.Tensor, mask, threshold: float = 0.5) -> dict[str, float]:
    """Scores of a [0, 1] map (any size; resized to the mask) against a binary mask: `score_maps` of one map."""
    return {metric: float(value[0]) for metric, value in score_maps(prediction[None], mask, threshold).items()}


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
        return "\n".join([f"{'block':>5}  " + "  ".join(f"{m:>8}" for m in METRICS),
                          *(f"{b:>5}  " + "  ".join(f"{self.scores[m][i]:8.3f}" for m in METRICS)
                            for i, b in enumerate(self.blocks))])

    def __repr__(self) -> str:
        return f"BlockScores({self.kind}, best by soft IoU: {self.top(5)})\n{self.table()}"


def score_blocks(maps: AttentionMaps, masks: dict, *, prompt: int = 0, kind: str = "t2i", steps=None,
                 smoothing: bool = False, threshold: float = 0.5) -> BlockScores:
    """Score every recorded block's map of each word against its mask, averaged over the words.

    masks: word (or word index) -> boolean (height, width) array for prompt `prompt`.
    """
    if not masks:
        raise ValueError("no masks given: pass {word: mask}")
    results = {m: np.zeros(len(maps.blocks)) for m in METRICS}
    for word, mask in masks.items():
        for i, m in enumerate(maps.per_block(word, prompt=prompt, kind=kind, steps=steps)):  # (block, rows, cols)
            m = smooth(m) if smoothing else m
            for metric, value in score_map(normalise(m), mask, threshold).items():
                results[metric][i] += value / len(masks)
    return BlockScores(list(maps.blocks), results, kind)

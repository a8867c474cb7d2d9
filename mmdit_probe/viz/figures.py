"""matplotlib figures: word x block and word x step grids, T2I beside I2T (and concept maps), I2I maps of query
patches, the T2T matrix, block scores."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from ..maps import AttentionMaps, smooth
from ..metrics import BlockScores
from .render import image_of, outline, per, picture


def _show(ax, maps: AttentionMaps, m, prompt: int, opacity: float, smoothing: bool, patch=None) -> None:
    """The map over the prompt's image (if known), without ticks; an I2I query `patch` outlined."""
    rgb = picture(image_of(maps, prompt), smooth(m) if smoothing else m, opacity)
    ax.imshow(rgb if patch is None else outline(rgb, patch, maps.grid))
    ax.set_xticks([])
    ax.set_yticks([])


def word_grid(maps: AttentionMaps, words: Sequence[str], *, by: str = "block", prompt: int = 0,
              kind: str = "t2i", smoothing: bool = False, opacity: float = 0.7) -> plt.Figure:
    """One row per word, one column per recorded block (by="block") or step (by="step")."""
    maps_by, labels = per(maps, by)
    fig, axes = plt.subplots(len(words), len(labels), figsize=(1.3 * len(labels), 1.4 * len(words)), squeeze=False)
    for r, word in enumerate(words):
        for c, m in enumerate(maps_by(word, prompt=prompt, kind=kind)):
            _show(axes[r, c], maps, m, prompt, opacity, smoothing)
            if r == 0:
                axes[r, c].set_title(f"{by} {labels[c]}", fontsize=8)
        axes[r, 0].set_ylabel(word)
    fig.suptitle(f"{kind.upper()} maps by {by}: {maps.prompts[prompt]!r}", fontsize=10)
    fig.tight_layout()
    return fig


KIND_NAMES = {"t2i": "T2I", "i2t": "I2T", "concept": "concept", "concept_xattn": "concept x-attn", "t2t": "T2T",
              "i2i": "I2I"}


def _kinds_by_word(maps: AttentionMaps, words: Sequence[str], kinds: Sequence[str], *, prompt: int, blocks,
                   smoothing: bool, opacity: float, fontsize: int) -> plt.Figure:
    """The image, then one column per word with one row per kind; concept rows stay empty for a word
    that is not among the prompt's concepts."""
    fig, axes = plt.subplots(len(kinds), len(words) + 1, figsize=(1.8 * (len(words) + 1), 1.9 * len(kinds)),
                             squeeze=False)
    image = image_of(maps, prompt)
    concepts = maps.concepts[prompt] if maps.concept_kinds else []
    for r, kind in enumerate(kinds):
        axes[r, 0].axis("off")
        if image is not None and r == 0:
            axes[r, 0].imshow(image)
            axes[r, 0].set_title("image", fontsize=9)
        for c, word in enumerate(words, start=1):
            if kind in maps.concept_kinds and word.lower() not in concepts:
                axes[r, c].axis("off")
                continue
            m = maps.word(word, prompt=prompt, kind=kind, blocks=blocks)
            _show(axes[r, c], maps, m, prompt, opacity, smoothing)
            axes[r, c].set_title(f"{word} ({KIND_NAMES[kind]})", fontsize=fontsize)
    fig.suptitle(f"{maps.prompts[prompt]!r}, blocks {blocks}", fontsize=10)
    fig.tight_layout()
    return fig


def t2i_vs_i2t(maps: AttentionMaps, words: Sequence[str], *, prompt: int = 0, blocks="top",
               smoothing: bool = True, opacity: float = 0.7) -> plt.Figure:
    """The image, then for each word its T2I map above its I2T map (same blocks and steps)."""
    return _kinds_by_word(maps, words, ("t2i", "i2t"), prompt=prompt, blocks=blocks, smoothing=smoothing,
                          opacity=opacity, fontsize=9)


def three_kinds(maps: AttentionMaps, words: Sequence[str], *, prompt: int = 0, blocks="top",
                smoothing: bool = True, opacity: float = 0.7) -> plt.Figure:
    """The image, then for each word its T2I, I2T and concept maps (output space, then concept x-attention) in
    one column, same blocks and steps; a word that is not among the prompt's concepts leaves its concept rows
    empty. Needs maps recorded with concepts (`probe.generate(..., concepts=[...])`).

    >>> three_kinds(out.maps, ["circle", "red", "background"])
    """
    if not maps.concept_kinds:
        raise ValueError("these maps have no concept maps: record with concepts=[...] (or use t2i_vs_i2t)")
    return _kinds_by_word(maps, words, [*maps.kinds, *maps.concept_kinds], prompt=prompt, blocks=blocks,
                          smoothing=smoothing, opacity=opacity, fontsize=8)


def i2i_maps(maps: AttentionMaps, patches: Sequence[tuple[int, int]] | None = None, *, prompt: int = 0,
             blocks="top", smoothing: bool = False, opacity: float = 0.7) -> plt.Figure:
    """For each query patch (row, col) (default: up to six recorded ones), its I2I map: where that image query
    attends among the image keys, the query outlined; same blocks and steps for all. Needs maps recorded with
    kinds=[..., "i2i"] and queries=...

    >>> i2i_maps(out.maps, [(1, 1), (2, 5)], blocks=[3])
    """
    if patches is None:
        recorded = maps.query_patches
        patches = recorded[:: max(1, len(recorded) // 6)][:6]
    patches = [tuple(p) for p in ([patches] if len(patches) == 2 and isinstance(patches[0], int) else patches)]
    maps.query_columns(patches)  # every patch recorded, before any drawing
    fig, axes = plt.subplots(1, len(patches), figsize=(1.9 * len(patches), 2.1), squeeze=False)
    for ax, patch in zip(axes[0], patches):
        _show(ax, maps, maps.patch(patch, prompt=prompt, blocks=blocks), prompt, opacity, smoothing, patch)
        ax.set_title(f"I2I of patch {patch}", fontsize=8)
    fig.suptitle(f"{maps.prompts[prompt]!r}, blocks {blocks}", fontsize=10)
    fig.tight_layout()
    return fig


def t2t_matrix(maps: AttentionMaps, *, prompt: int = 0, blocks="top", real: bool = True) -> plt.Figure:
    """The T2T map as a matrix: text queries (rows) x text keys (columns), each row a query's attention on the
    recorded text keys (its attention on image keys makes up the rest of its row sum). `real`: only the prompt's
    own tokens (no padding). Needs maps recorded with kinds=[..., "t2t"].

    >>> t2t_matrix(out.maps, blocks="top")
    """
    m = maps.text_matrix(prompt=prompt, blocks=blocks)
    labels = maps.position_labels(prompt)
    keep = [i for i, p in enumerate(maps.positions) if not real or p in maps.tables[prompt].real_positions]
    m, labels = m[keep][:, keep], [labels[i] for i in keep]
    fig, ax = plt.subplots(figsize=(0.3 * len(keep) + 2, 0.3 * len(keep) + 1.5))
    shown = ax.imshow(m.numpy(), cmap="inferno")
    ax.set_xticks(range(len(keep)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(keep)), labels, fontsize=7)
    ax.set_xlabel("text key")
    ax.set_ylabel("text query")
    fig.colorbar(shown, ax=ax, fraction=0.046)
    ax.set_title(f"T2T, blocks {blocks}: {maps.prompts[prompt]!r}", fontsize=9)
    fig.tight_layout()
    return fig


def block_scores(scores: Sequence[BlockScores] | BlockScores, metric: str = "soft_iou", top: int = 5) -> plt.Figure:
    """Bars of a metric per block, one series per kind, the top blocks of the first series marked."""
    scores = [scores] if isinstance(scores, BlockScores) else list(scores)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(scores[0].blocks) + 1), 2.6))
    width = 0.8 / len(scores)
    x = np.arange(len(scores[0].blocks))
    for i, s in enumerate(scores):
        ax.bar(x + i * width, s.scores[metric], width, label=s.kind.upper())
    best = set(scores[0].top(top, metric))
    ax.set_xticks(x + 0.4 - width / 2, [f"{b}*" if b in best else str(b) for b in scores[0].blocks], fontsize=8)
    ax.set_xlabel(f"block (* = top {top} of {scores[0].kind.upper()})")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

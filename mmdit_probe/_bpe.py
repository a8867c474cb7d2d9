"""BPE merges that make chosen words single tokens: the toy tokenizer and the tiny test pipelines' CLIP
tokenizers are built with them (torch-free, no model needed)."""

from __future__ import annotations


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segment like BPE does: repeatedly merge the best-ranked adjacent pair."""
    while len(pieces) > 1:
        rank, i = min((ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:])))
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2:]
    return pieces


def word_merges(words, vocab: dict[str, int], end: str = "</w>") -> list[tuple[str, str]]:
    """BPE merges that make each word a single token; merged pieces are added to `vocab`. `end` marks a word's last
    piece (CLIP's "</w>"; "" for byte-level BPEs such as Qwen2's, whose words carry a leading "Ġ" instead).

    A merge ranked after all existing ones never changes a word already reduced to one token, so
    merging each word's first remaining pair, word by word, ends with every word one token.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(pieces := _bpe([*word[:-1], word[-1] + end], ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    return merges

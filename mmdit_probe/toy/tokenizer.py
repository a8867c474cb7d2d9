"""A word-level CLIP tokenizer for the Shapes grammar.

It is a stock `CLIPTokenizer` (byte-level BPE), so the pipeline and the word-to-token code treat it
exactly like a real CLIP tokenizer; its merges are chosen so that every grammar word is one token.
Any other text still tokenizes, character by character.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from .._bpe import _bpe, word_merges  # noqa: F401  (moved to mmdit_probe._bpe; this alias stays one release)
from .world import VOCABULARY

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_CHARACTERS = string.ascii_lowercase + string.digits + ",.!?;:'-"


def build_tokenizer(model_max_length: int) -> CLIPTokenizer:
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + tuple(_CHARACTERS) + tuple(c + "</w>" for c in _CHARACTERS):
        vocab.setdefault(token, len(vocab))
    merges = word_merges(VOCABULARY, vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)

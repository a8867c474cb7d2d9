"""Tokens to words: which positions of the transformer's text sequence belong to which prompt word.

Words are matched by character offsets, so punctuation never sticks to a word ("pig," and "pig."
are the word "pig") and every tokenizer (CLIP with its BOS token, T5 sentencepiece pieces) is
handled the same way. A prompt the pipeline wraps in a chat template (Flux.2) is tokenized inside it, so
positions count the template's tokens too.

>>> table = probe.tokens("a photo of a pig, sitting")
>>> table.positions("pig")          # CLIP and T5 positions of "pig"
[5, 81]
"""

from __future__ import annotations

import numbers
import re
import warnings
from dataclasses import dataclass

# Words too common to be worth a map by default (figures and widgets start from the others).
FUNCTION_WORDS = frozenset({"a", "an", "the", "on", "in", "of", "and", "with", "at", "to"})
_WORD = re.compile(r"\w+(?:['’-]\w+)*")


def normalise_word(word: str) -> str:
    """The word as matched: lowercase, without surrounding punctuation."""
    return " ".join(_WORD.findall(word.lower()))


@dataclass(frozen=True)
class Token:
    position: int  # index in the transformer's text sequence
    encoder: str  # "clip" or "t5"
    piece: str
    word: str | None  # the prompt word it belongs to; None for special tokens and punctuation
    word_index: int | None  # which word of the prompt (0-based)


class TokenTable:
    """The prompt's real (non-padding) text tokens, with their words.

    `positions(word)` gives the text positions of a word in every tokenizer; maps of a word
    average over exactly these positions.
    """

    def __init__(self, prompt: str, tokens: list[Token], text_length: int) -> None:
        self.prompt = prompt
        self.tokens = tokens
        self.text_length = text_length
        self.words = [m.group(0).lower() for m in _WORD.finditer(prompt)]

    @property
    def real_positions(self) -> list[int]:
        """Positions holding a real token (special tokens included), not padding."""
        return [t.position for t in self.tokens]

    def positions(self, words: str | int | list[str | int], encoders: tuple[str, ...] | None = None) -> list[int]:
        """Text positions of one word or several (by text or word index); every occurrence."""
        if isinstance(words, (str, numbers.Integral)):
            words = [words]
        found: list[int] = []
        for word in words:
            if isinstance(word, numbers.Integral) and not isinstance(word, bool):
                word = int(word)
                if not 0 <= word < len(self.words):
                    raise IndexError(f"word index {word} out of range: the prompt has {len(self.words)} words")
                match = [t for t in self.tokens if t.word_index == word]
            else:
                key = normalise_word(word)
                match = [t for t in self.tokens if t.word == key]
                if not match and key in self.words:
                    raise KeyError(f"word {word!r} is in the prompt {self.prompt!r} but cut off: the tokenizers keep "
                                   f"only the first tokens ({self.text_length} text positions in all); shorten the "
                                   f"prompt or raise max_sequence_length")
                if not match:
                    raise KeyError(f"word {word!r} is not in the prompt {self.prompt!r}; "
                                   f"its words are: {', '.join(dict.fromkeys(self.words))}")
            found += [t.position for t in match if encoders is None or t.encoder in encoders]
        return sorted(set(found))

    def rows(self) -> list[tuple[int, str, str, str]]:
        return [(t.position, t.encoder, t.piece, t.word or "") for t in self.tokens]

    def __repr__(self) -> str:
        lines = [f"TokenTable({self.prompt!r}, {len(self.tokens)} real tokens of {self.text_length})",
                 f"{'pos':>5}  {'encoder':7} {'piece':16} word"]
        lines += [f"{p:>5}  {e:7} {piece:16} {w}" for p, e, piece, w in self.rows()]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        cells = "".join(f"<tr><td>{p}</td><td>{e}</td><td><code>{piece}</code></td><td>{w}</td></tr>"
                        for p, e, piece, w in self.rows())
        return (f"<b>{self.prompt}</b><table><tr><th>position</th><th>encoder</th><th>piece</th>"
                f"<th>word</th></tr>{cells}</table>")


def _tokenizer(pipeline, segment):
    """The tokenizer of a text segment (a processor's own, Flux.2 dev's); None where its text encoder is absent."""
    tokenizer = getattr(pipeline, segment.tokenizer, None)
    if tokenizer is None or getattr(pipeline, segment.text_encoder, None) is None:
        return None
    return getattr(tokenizer, "tokenizer", tokenizer)


def tokenize(prompt: str, segments, pipeline) -> TokenTable:
    """Tokenize as the pipeline does (padding to each segment's length) and attach words."""
    spans = [(m.start(), m.end(), m.group(0).lower(), i) for i, m in enumerate(_WORD.finditer(prompt))]
    tokens: list[Token] = []
    for segment in segments:
        tokenizer = _tokenizer(pipeline, segment)
        if tokenizer is None:
            continue  # e.g. SD3 without T5: zero rows, no tokens
        text, shift = prompt, 0
        if segment.template is not None:
            # The prompt inside a chat template: the template writes its own special tokens, and the prompt's
            # characters follow the template's prefix.
            text = segment.template(prompt)
            prefix, _, suffix = segment.template("\x00").partition("\x00")
            if text != prefix + prompt + suffix:
                raise ValueError(f"the chat template changes the prompt {prompt!r} (Flux.2 dev drops '[IMG]'); "
                                 f"its words cannot be found: rephrase the prompt")
            shift = len(prefix)
        enc = tokenizer(text, padding="max_length", max_length=segment.length + segment.drop, truncation=True,
                        return_offsets_mapping=True, add_special_tokens=segment.template is None)
        pieces = tokenizer.convert_ids_to_tokens(enc["input_ids"])
        for i, (mask, (start, end), piece) in enumerate(zip(enc["attention_mask"], enc["offset_mapping"], pieces)):
            if not mask or i < segment.drop:
                continue
            start, end = start - shift, end - shift
            word = next(((w, j) for s, e, w, j in spans if min(end, e) > max(start, s)), (None, None))
            tokens.append(Token(segment.start + i - segment.drop, segment.encoder, piece, *word))
    total = segments[-1].start + segments[-1].length if segments else 0
    return TokenTable(prompt, tokens, total)


def warn_unknown_characters(prompts: list[str], segments, pipeline) -> None:
    """Warn where a tokenizer reads characters of a prompt as its unknown token: the model sees something else than
    the prompt (the toy tokenizer reads them as end-of-text)."""
    for segment in segments:
        tokenizer = _tokenizer(pipeline, segment)
        unknown = None if tokenizer is None else tokenizer.unk_token_id
        if unknown is None:
            continue
        for prompt in prompts:
            enc = tokenizer(prompt, max_length=segment.length, truncation=True, return_offsets_mapping=True)
            lost = sorted({prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
                           if i == unknown and b > a})
            if lost:
                warnings.warn(f"the {segment.encoder} tokenizer does not know {', '.join(map(repr, lost))} in the "
                              f"prompt {prompt!r}: it reads {tokenizer.unk_token!r} there, which changes the image; "
                              f"rephrase with characters it knows", UserWarning, stacklevel=4)

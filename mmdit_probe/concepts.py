"""Concept tokens: ConceptAttention's output-space saliency, read beside T2I and I2T on the same run.

Concept words ("circle", "background", ...) are encoded by the pipeline's own text encoders, like a
prompt, and carried through every joint block as a residual stream of their own, on the text
stream's weights (projections, qk-norms, modulation, MLP). After each block's normal call, a
forward hook calls the block once more, in *concept mode*: the concept stream is its text input, a
one-token dummy its image input, and the block's `temb` (and, for Flux, the identity rotation of
zero position ids, as Flux gives its text) are the block's own. In concept mode the tapped attention
processor ignores the dummy and lets the concept queries attend to the image keys and values kept
from the block's normal call (post-norm, post-RoPE, after the taps) and to the concept keys; the
block's own code then applies the modulation, gates, output projection and MLP to the concept
stream. Image and prompt tokens never see concept keys, so the generation is bit for bit the one
without concepts. No hook point fires in concept mode, so recording and patching see one call per
step as before (modules inside the blocks, which nnsight could also read, are called twice).

Under classifier-free guidance every row of the batch (unconditional and conditional) carries the
same concepts against its own image keys; the maps keep the recorder's rows (the conditional half by
default). Where guidance is a second transformer call per step, each call starts the concept stream
afresh, and the unconditional call carries it only where its rows are recorded.

Maps, per block and step:

- "concept" (ConceptAttention's, output space): softmax over the concepts of the dot product of each
  image token's attention output with each concept's, both *before* the output projection and over
  all heads at once (the attention output (tokens, heads x head_dim)), as in ConceptAttention's
  reference code (`concept_attn` and `img_attn`, einsum over the full feature dimension).
  ConceptAttention's pipeline takes this softmax per block and step, then averages blocks and steps,
  as `maps.concept` does.
- "concept_xattn" (the baseline on the same run): each image query's attention logits on the
  concept keys, softmax over the concepts, per head, then the head mean. (ConceptAttention's own
  "cross attention" baseline dots image *queries* with concept *queries*, heads concatenated; this
  one is the attention the image queries would pay the concept keys.)

Unlike ConceptAttention, which modulates its concepts by a vector built from the concepts' own pooled
CLIP embedding, the concept stream here is modulated by the block's `temb` (the prompt's), so the
concept tokens are exactly text tokens that nothing else attends to.

Each concept is one token: the concept, encoded alone as a prompt, gives its first token of the
word in T5 where the pipeline has T5, else in CLIP (the position `probe.tokens(concept)` names).
A word the tokenizer splits is warned about (the concept is its first piece only); a word whose
first token is the tokenizer's unknown or end-of-text token is refused. Concepts are one list for
every prompt, or one list per prompt: then each prompt's concepts attend only to each other (a key
mask), and its maps take the softmax over its own concepts only, exactly as if each prompt ran
alone. Each list holds two concepts or more: a softmax over one concept is 1.0 everywhere.

>>> out = probe.generate("on the left a red circle", concepts=["circle", "red", "background"], record=True)
>>> out.maps.concept("circle", blocks="top")           # (rows, cols), like maps.word
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from . import validation
from .tokens import Token, normalise_word


def check_concepts(concepts, n_prompts: int) -> list[list[str]]:
    """One list of concepts per prompt, from one list for all prompts or one list per prompt."""
    if not isinstance(concepts, str) and isinstance(concepts, Iterable):
        concepts = list(concepts)
        if concepts and all(isinstance(c, (list, tuple)) for c in concepts):
            if len(concepts) != n_prompts:
                raise validation.InvalidInput(f"{len(concepts)} concept lists for {n_prompts} prompt(s): give one list "
                                              f"per prompt, or one list of words for all of them")
            return [check_words(c, f"concepts[{i}]") for i, c in enumerate(concepts)]
    return [check_words(concepts)] * n_prompts


def check_words(concepts, name: str = "concepts") -> list[str]:
    """Two or more distinct one-word concepts (str), normalised as words are matched. Both concept maps are a
    softmax over the concepts: with one concept they are 1.0 at every image token and say nothing."""
    if isinstance(concepts, str) or not isinstance(concepts, Iterable):
        raise validation.InvalidInput(f"{name}={concepts!r} is not allowed: give a list of words, e.g. "
                                      f"['circle', 'square', 'background']")
    concepts = list(concepts)
    if not concepts:
        raise validation.InvalidInput(f"{name}=[] selects no concept: give at least two concepts, e.g. ['circle', "
                                      f"'background'], not an empty list")
    found = []
    for c in concepts:
        if not isinstance(c, str):
            raise validation.InvalidInput(f"concept {c!r} ({type(c).__name__}) is not allowed: concepts are words "
                                          f"(str)")
        word = normalise_word(c)
        if not word or " " in word:
            raise validation.InvalidInput(f"concept {c!r} is not one word: each concept is a single word such as "
                                          f"'circle'")
        if word in found:
            raise validation.InvalidInput(f"concept {c!r} is given twice: give each concept once")
        found.append(word)
    if len(found) < 2:
        hint = "the concept to find beside 'background'" if found == ["background"] else "'background'"
        raise validation.InvalidInput(f"{name}={concepts!r} gives one concept: concept maps are a softmax over the "
                                      f"concepts, so one concept's map is 1.0 everywhere; give at least two concepts "
                                      f"(e.g. add {hint})")
    return found


# Word-boundary marks of the tokenizers' pieces: T5's sentencepiece "▁" (a word start) and CLIP's "</w>" (a word
# end). A piece that is nothing but one of them holds no character of the word.
_WORD_MARKS = ("▁", "</w>")


def concept_token(probe, concept: str, max_sequence_length: int) -> Token:
    """The token that stands for a concept: the first token of the word, encoded alone as a prompt, in T5 where the
    pipeline has T5, else in CLIP. Warns when the tokenizer splits the word (the concept is then its first piece
    only, as the same piece in other words) and refuses a token that holds nothing of the word: the tokenizer's
    unknown or end-of-text token, or a bare word mark."""
    tokens = [t for t in probe.tokens(concept, max_sequence_length).tokens if t.word == concept]
    if not tokens:
        raise validation.InvalidInput(f"concept {concept!r} gives no token in this model's tokenizers")
    encoder = "t5" if any(t.encoder == "t5" for t in tokens) else tokens[0].encoder
    pieces = [t for t in tokens if t.encoder == encoder]
    chosen = pieces[0]
    segment = next(s for s in probe.family.text_segments(max_sequence_length) if s.encoder == encoder)
    tokenizer = getattr(probe.pipeline, segment.tokenizer)
    special = getattr(tokenizer, "tokenizer", tokenizer).all_special_tokens  # a processor's own tokenizer
    text = chosen.piece
    for mark in _WORD_MARKS:
        text = text.replace(mark, "")
    if chosen.piece in special or not text:
        raise validation.InvalidInput(f"the {encoder} tokenizer does not know the concept {concept!r}: its concept "
                                      f"token would be {chosen.piece!r}, which is no piece of the word; choose a word "
                                      f"it knows (probe.tokens(word) shows its pieces)")
    if len(pieces) > 1:
        warnings.warn(f"the {encoder} tokenizer splits the concept {concept!r} into "
                      f"{', '.join(repr(t.piece) for t in pieces)}: its concept token is the first, {chosen.piece!r}, "
                      f"which other words share; choose a word the tokenizer keeps whole (probe.tokens(word) shows "
                      f"its pieces)", UserWarning, stacklevel=2)
    return chosen


def encode_concepts(probe, concepts: list[str], max_sequence_length: int) -> torch.Tensor:
    """(concept, joint_attention_dim): each concept encoded alone by the pipeline's `encode_prompt`, the row of
    its `concept_token`. Every concept's token is checked before any text encoder runs."""
    tokens = [concept_token(probe, c, max_sequence_length) for c in concepts]
    pipe = probe.pipeline
    options = {"prompt": concepts, "device": pipe._execution_device, "max_sequence_length": max_sequence_length}
    parameters = inspect.signature(pipe.encode_prompt).parameters
    # SD3 and Flux have more encoders (Qwen-Image, Chroma and Flux.2 one); SD3 and Chroma would also encode
    # negative prompts, which no concept wants.
    extra = {"prompt_2": None, "prompt_3": None, "do_classifier_free_guidance": False}
    options.update({name: value for name, value in extra.items() if name in parameters})
    with torch.no_grad():
        embeds = pipe.encode_prompt(**options)[0]
    return torch.stack([embeds[i, token.position] for i, token in enumerate(tokens)])


def concept_maps(q_img: torch.Tensor, k_concepts: torch.Tensor, image_out: torch.Tensor, concept_out: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One block's maps (module docstring), float32: "concept" (row, image token, concept) from the attention outputs
    (row, tokens, heads x dim), "concept_xattn" from the image queries and concept keys (row, heads, tokens, dim).
    `key_mask` (row, 1, 1, concept): which concepts a row has."""
    scores = image_out.float() @ concept_out.float().transpose(-1, -2)
    logits = q_img.float() @ k_concepts.float().transpose(-1, -2) * q_img.shape[-1] ** -0.5
    if key_mask is not None:
        spare = ~key_mask
        scores, logits = scores.masked_fill(spare[:, 0], -torch.inf), logits.masked_fill(spare, -torch.inf)
    return {"concept": scores.softmax(dim=-1), "concept_xattn": logits.softmax(dim=-1).mean(dim=1)}


class ConceptSlot:
    """One attention module's share: the image q/k/v and attention output of the block's normal call, and the
    concept attention of its concept call."""

    def __init__(self, stream: ConceptStream, block: int) -> None:
        self.stream, self.block = stream, block
        self.kept: tuple[torch.Tensor, ...] | None = None

    def keep(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """Image q, k, v (batch, heads, tokens, dim) after the taps, and the image attention output before the
        output projection (batch, tokens, heads x dim)."""
        self.kept = (q, k, v, out)

    def attend(self, cq: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Concept queries over [image keys | concept keys]: the concepts' attention output (batch, concept,
        heads x dim), before the output projection. Hands the block's maps' inputs to the recorder."""
        if self.kept is None:
            raise RuntimeError(f"block {self.block}: concept call before the block's own call")
        q, k, v, image_out = self.kept
        stream = self.stream
        mask = stream.key_mask
        if mask is not None:  # prompts with fewer concepts: their spare slots are no keys
            mask = torch.cat([mask.new_ones(*mask.shape[:3], k.shape[2]), mask], dim=-1)
        out = F.scaled_dot_product_attention(cq, torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2),
                                             attn_mask=mask)
        out = out.transpose(1, 2).flatten(2)
        if stream.records(stream.call, self.block):
            stream.keep(stream.call, self.block, q, ck, image_out, out)
        self.kept = None
        return out


class ConceptStream:
    """The concept tokens' residual stream through every block (see the module docstring), for a recorder.

    blocks: the recorded blocks (the stream runs up to the last). records(call, block): whether the recorder keeps
    that block's maps in that transformer call; keep(call, block, q_img, k_concepts, image_out, concept_out) keeps
    them (`concept_maps`). Calls are counted within the generation, as `tracer.iter` counts them. `install()` adds
    the hooks, `remove()` takes them away.
    """

    def __init__(self, probe, concepts, n_prompts: int, max_sequence_length: int, *, blocks: list[int],
                 records: Callable[[int, int], bool], keep: Callable[..., None]) -> None:
        self.probe = probe
        self.concepts = check_concepts(concepts, n_prompts)  # one list per prompt
        self.blocks, self.records, self.keep = blocks, records, keep
        words = list(dict.fromkeys(w for c in self.concepts for w in c))
        encoded = encode_concepts(probe, words, max_sequence_length)
        # Each prompt's concepts in slots 0..len-1; a shorter list's spare slots are masked out everywhere.
        slots = max(len(c) for c in self.concepts)
        self.valid = torch.tensor([[i < len(c) for i in range(slots)] for c in self.concepts])
        self.embeds = torch.stack([encoded[[words.index(w) for w in c] + [0] * (slots - len(c))]
                                   for c in self.concepts])
        self.state: torch.Tensor | None = None  # the concept stream entering the next block
        self.key_mask: torch.Tensor | None = None  # (batch, 1, 1, slots): which concept keys a row has
        self.rotary = None  # Flux: the identity rotation of zero ids, one row per concept
        # The transformer call in progress and the last block whose concept call it needs (-1: none).
        self.call, self.last = -1, -1
        self._timesteps = None  # the scheduler's, at the last call
        self._handles: list = []
        self._inside = False

    # -- hooks --------------------------------------------------------------
    def install(self) -> None:
        family = self.probe.family
        transformer = self.probe.pipeline.transformer
        self._handles.append(transformer.register_forward_pre_hook(self._start, with_kwargs=True))
        for a in family.attentions:
            if a.name != "attn":
                continue
            block = transformer.get_submodule(family.block_path(a.block))
            processors = [m.processor for m in (getattr(block, "attn", None), getattr(block, "attn2", None))
                          if m is not None]
            processors[0].concepts = ConceptSlot(self, a.block)
            self._handles.append(block.register_forward_hook(self._after_block(processors, a.block),
                                                              with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for a in self.probe.family.attentions:
            processor = self.probe.pipeline.transformer.get_submodule(a.path).processor
            processor.concepts, processor.concept_mode = None, False
        self.state = None

    def _start(self, transformer, args, kwargs) -> None:
        """Each transformer call starts the concept stream from the context embedder, like the text."""
        # Each pipeline call sets the scheduler's timesteps anew: counted from there, a transformer call made between
        # building the recorder and the generation moves no map to another step or guidance half.
        timesteps = self.probe.pipeline.scheduler.timesteps
        self.call = 0 if timesteps is not self._timesteps else self.call + 1
        self._timesteps = timesteps
        self.last = self.blocks[-1] if self.records(self.call, self.blocks[-1]) else -1
        text = kwargs.get("encoder_hidden_states")
        if text is None:
            raise RuntimeError("the transformer was called without encoder_hidden_states as a keyword; concept "
                               "tokens need the pipeline's own call")
        # The image's rows: a single negative prompt (Qwen-Image's) is one text row, broadcast over the batch.
        n, batch = len(self.concepts), kwargs.get("hidden_states", text).shape[0]
        if batch % n:
            raise RuntimeError(f"a batch of {batch} rows for {n} prompts: concept tokens need one row per prompt, or "
                               f"two under classifier-free guidance")
        prompt = torch.arange(batch) % n  # [uncond | cond] rows under guidance
        embeds = self.embeds[prompt].to(device=text.device, dtype=text.dtype)
        self.state = self.probe.family.embed_text(embeds)
        valid = self.valid[prompt]
        self.key_mask = None if valid.all() else valid[:, None, None].to(text.device)
        if kwargs.get("txt_ids") is not None:
            ids = kwargs["txt_ids"]
            self.rotary = transformer.pos_embed(ids.new_zeros(self.valid.shape[1], ids.shape[-1]))

    def _after_block(self, processors, index: int):
        def hook(block, args, kwargs, output):
            if self._inside or self.state is None:
                return None
            if index > self.last:
                # No map of this call reads the stream from here on, and the next call starts it afresh.
                processors[0].concepts.kept = None
                return None
            if args:
                raise RuntimeError("concept tokens need the blocks called with keywords, as the pipelines call them")
            hidden = kwargs["hidden_states"]
            dummy = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[2])
            call, new_state = self.probe.family.concept_call(index, kwargs, self.state, dummy)
            if call.get("image_rotary_emb") is not None:
                call["image_rotary_emb"] = self.rotary
            self._inside = True
            for p in processors:
                p.concept_mode = True
            try:
                self.state = new_state(block(**call))
            finally:
                self._inside = False
                for p in processors:
                    p.concept_mode = False
            return None
        return hook

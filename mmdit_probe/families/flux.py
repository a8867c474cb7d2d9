"""Flux.1 (`FluxTransformer2DModel`): joint sequence [text | image], text = T5 only.

Global block numbering: double-stream blocks 0..D-1, then single-stream blocks D..D+S-1.
RoPE is applied to the joint q/k after the norms, so the q/k taps hold rotated vectors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..kernels import attention_with_lse
from ..names import STREAMS
from ..taps import TapProcessor, project_qkv
from .base import Attention, DoubleAndSingleBlocks, TextSegment


class FluxTapProcessor(TapProcessor):
    """`FluxAttnProcessor` with taps, for double-stream and single-stream blocks.

    A single-stream block hands its attention one joint [text | image] sequence; the family sets
    `text_length` before each call (see `DoubleAndSingleBlocks.install_taps`). Where the family has a reference
    region (Kontext), the image stream ends with `reference_length` reference tokens, tapped as the
    "ref" stream; the family sets that length before each transformer call.
    Attention runs through diffusers' `dispatch_attention_fn`, so GPU backends stay selectable.
    """

    attends = True
    # The stock processor makes the attention output's slices contiguous before the output projections (Flux.1's
    # does, Flux.2's does not): the same values, and the stock rounding.
    contiguous_outputs = True

    def __init__(self, streams: tuple[str, ...] = STREAMS) -> None:
        super().__init__(streams)
        self.text_length: int | None = None
        self.reference_length = 0
        # While recording: the attention mask of the last call as (batch, 1, queries, keys) in joint order, a
        # view of the pipeline's own; the recorder applies its slices to its logits as the kernel does.
        self.recorded_mask: torch.Tensor | None = None

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                image_rotary_emb=None, **kwargs):
        if self.concept_mode:
            return self._concepts_forward(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        q, k, v = _heads(attn, hidden_states, "img")
        q, k = attn.norm_q(q), attn.norm_k(k)

        joint = attn.added_kv_proj_dim is not None
        if joint:
            tq, tk, tv = _heads(attn, encoder_hidden_states, "txt")
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
            n_text = encoder_hidden_states.shape[1]
        else:
            if self.text_length is None:
                raise RuntimeError("single-stream tap processor called without its block setting text_length")
            n_text = self.text_length

        if image_rotary_emb is not None:
            q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
        text, image, n_image = self._attend(q, k, v, n_text, attention_mask)
        if joint:
            if self.contiguous_outputs:
                image, text = image.contiguous(), text.contiguous()
            image = self.tap_image_out(attn.to_out[1](attn.to_out[0](image)), n_image)
            return image, self.hook_out_txt(attn.to_add_out(text))
        image = self.tap_image_out(image, n_image)  # the image output's taps fire first, as in every family
        return torch.cat([self.hook_out_txt(text), image], dim=1)

    def _attend(self, q, k, v, n_text: int, attention_mask):
        """(text, image stream, image tokens): the attention outputs (batch, tokens, heads x dim) of q, k, v (batch,
        tokens, heads, dim) after their taps; the image stream's rows are the image's, then the reference tokens'."""
        q, k, v, n_image = self.tap_joint(q, k, v, n_text, self.reference_length)
        mask = None if attention_mask is None else _joint_mask(attention_mask, q.shape[0], q.shape[1])

        def stock():  # in the taps' layout, (batch, heads, tokens, dim): transposes of views, so bit-identical
            if self.record_lse:
                self.recorded_mask = mask
                return attention_with_lse(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            # parallel_config only where set: older diffusers releases do not take it.
            extra = {"parallel_config": self._parallel_config} if self._parallel_config is not None else {}
            out = dispatch_attention_fn(q, k, v, attn_mask=attention_mask, backend=self._attention_backend, **extra)
            return out.transpose(1, 2), None

        out = self.attend_joint(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), n_text, n_image, stock,
                                mask).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        if self.concepts is not None:
            image_rows = slice(n_text, n_text + n_image)
            self.concepts.keep(*(t[:, image_rows].transpose(1, 2) for t in (q, k, v)), out[:, image_rows])
        return out[:, :n_text], out[:, n_text:], n_image

    def _concepts_forward(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """The block's concept call: the concept tokens, projected and normed as the text is (single-stream
        blocks: the first `text_length` rows), attend as `_concept_attention` says. The dummy image gets zeros."""
        joint = attn.added_kv_proj_dim is not None
        concepts = encoder_hidden_states if joint else hidden_states[:, :self.text_length]
        stream = "txt" if joint else "img"  # single-stream blocks project text with the image projections
        cq, ck, cv = _heads(attn, concepts, stream)
        cq, ck = (attn.norm_added_q(cq), attn.norm_added_k(ck)) if joint else (attn.norm_q(cq), attn.norm_k(ck))
        out = self._concept_attention(cq, ck, cv, image_rotary_emb)
        if joint:
            return torch.zeros_like(hidden_states), attn.to_add_out(out)
        return torch.cat([out, torch.zeros_like(hidden_states[:, self.text_length:])], dim=1)

    def _concept_attention(self, cq, ck, cv, image_rotary_emb) -> torch.Tensor:
        """The concept call's attention: concept q/k/v (normed like the text) rotated by the identity rotation of
        zero ids, over the image keys kept from the block's own call and the concept keys. No taps."""
        if image_rotary_emb is not None:
            cq, ck = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (cq, ck))
        return self.concepts.attend(*(t.transpose(1, 2) for t in (cq, ck, cv))).to(cq.dtype)


def _heads(attn, states: torch.Tensor, stream: str) -> tuple[torch.Tensor, ...]:
    """One stream's q, k, v projections, (batch, tokens, heads, dim)."""
    return tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in project_qkv(attn, states, stream))


def reference_tokens(call: dict[str, Any]) -> int:
    """The reference tokens of a Flux.1 Kontext or Flux.2 transformer call (its keyword arguments): the image-stream
    tokens whose first RoPE axis is not 0 (the generated image's is; Kontext's context image is at 1, Flux.2's
    reference i at T = 10 + 10 i, `Flux2Pipeline._prepare_image_ids`)."""
    ids = call.get("img_ids")
    if ids is None:
        return 0
    ids = ids[0] if ids.ndim == 3 else ids  # 3-D ids are deprecated, still taken: every row has the same ids
    return int((ids[:, 0] != 0).sum())


def _joint_mask(mask: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """An attention mask as (batch, 1 or heads, queries, keys) over the joint sequence, a view (no copy): the 2-D
    key masks `dispatch_attention_fn` also takes, and Chroma's (batch, 1, tokens, tokens) outer-product masks."""
    if mask.ndim == 2:
        mask = mask[:, None, None, :]
    return mask.expand(batch, -1, tokens, tokens)  # -1: a per-head mask keeps its heads


class FluxFamily(DoubleAndSingleBlocks):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    transformer_class = "FluxTransformer2DModel"
    image_first = False
    # Guidance-distilled: guidance is an input, never a doubled batch (true CFG, with a negative prompt, is a second
    # transformer call per step: `calls_per_step`).
    batched_guidance = False
    latent_channels_divisor = 4  # `pack_latents` packs 2x2 latent patches into one token

    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        return [TextSegment("t5", "tokenizer_2", "text_encoder_2", 0, max_sequence_length)]

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline._pack_latents(latents, *latents.shape)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)

    def make_processor(self, attention: Attention, stock) -> FluxTapProcessor:
        return FluxTapProcessor(self.streams(attention))

"""Hook points: named identity modules that every activation of interest passes through.

An attention processor with taps is an `nn.Module` holding one `HookPoint` per activation, so
nnsight (or a plain torch hook) reads and replaces them like any module output, by a name that
does not change between diffusers releases or model families:

    blocks.{i}.attn.hook_q_img     image-stream queries, after qk-norm (and RoPE for Flux)
    blocks.{i}.attn.hook_k_txt     text-stream keys
    blocks.{i}.attn.hook_out_img   the attention output of the image stream
    blocks.{i}.attn2.hook_q_img    SD3.5-M's image-only self-attention (blocks that have it)
    blocks.{i}.attn.hook_lse_img   log-sum-exp of each image query's logits over all keys;
                                   fires only while the processor's `record_lse` is set

q, k and v taps have shape (batch, heads, tokens, head_dim) in every family; output taps have
shape (batch, tokens, features). Text-stream taps are absent where the attention has no text
(SD3.5-M `attn2`). In every family they run in the same order: q, k, v of the image stream, q, k, v
of the text stream, then the image and text outputs; nnsight reads must follow that order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# QKV, ACTIVATIONS and tap_name moved to .names; these aliases stay one release.
from .names import ACTIVATIONS, QKV, REFERENCE, STREAMS, TAPPED, leaf, tap_name  # noqa: F401


class HookPoint(nn.Module):
    """The identity. It exists to be read and replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TapProcessor(nn.Module):
    """Base of the attention processors with taps: one `HookPoint` per activation and stream."""

    # True where `forward` runs its attention through `attend` (region replacement needs it).
    attends = False
    # Read by diffusers' `dispatch_attention_fn` (the Flux / Qwen-Image / Flux.2 processors); copied from the stock
    # processor when the taps are installed, and written by `set_attention_backend` afterwards.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, streams: tuple[str, ...] = STREAMS) -> None:
        super().__init__()
        self.streams = streams
        for activation in TAPPED:
            for stream in self.streams:
                self.add_module(leaf(activation, stream), HookPoint())
        # Set by attention recording: attention then also yields each query's log-sum-exp.
        self.record_lse = False
        # Set by a concept stream (`mmdit_probe.concepts`): `concepts` keeps this call's image q/k/v and
        # attention output; `concept_mode` marks the block's second call, which carries the concepts.
        self.concepts = None
        self.concept_mode = False
        # Set by an edit's attention-region replacement (`mmdit_probe.editing.qk_injection`): it takes the place of
        # the attention step, see `attend`.
        self.region_replacement = None

    def hook(self, activation: str, stream: str) -> HookPoint:
        return getattr(self, leaf(activation, stream))

    def tap_qkv(self, stream: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return self.hook("q", stream)(q), self.hook("k", stream)(k), self.hook("v", stream)(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streams: dict[str, slice],
               stock: Callable[[], tuple[torch.Tensor, torch.Tensor | None]], mask: torch.Tensor | None = None):
        """The attention step every family's processor runs: `stock()`, the processor's own attention, giving the
        output (batch, heads, tokens, dim) and, while `record_lse` is set, each query's log-sum-exp (else None).

        q, k, v: the joint sequence, (batch, heads, tokens, dim), after the taps; `streams` names each stream's
        tokens in it ({"img": slice, "txt": slice}); `mask`: the attention mask `stock()` applies, in the same token
        order as (batch, 1 or heads, queries or 1, keys) (boolean: keep where True; float: added to the scores),
        None where it applies none. An edit's `region_replacement`, where set, is called instead with the same
        arguments and returns the same pair.
        """
        if self.region_replacement is None:
            return stock()
        return self.region_replacement(q, k, v, streams, stock, mask)

    def tap_joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_text: int, n_reference: int):
        """Tap the q, k, v (batch, tokens, heads, dim) of a joint [text | image | reference] sequence (Flux, Flux.2)
        stream by stream, as (batch, heads, tokens, dim) views: a tap that changes nothing leaves the attention inputs
        bit-identical. Returns q, k, v rejoined and the number of image tokens."""
        reference = REFERENCE in self.streams
        n_image = q.shape[1] - n_text - (n_reference if reference else 0)
        # In `TAP_ORDER_REFERENCE`'s order (image, reference, text): nnsight reads follow execution order.
        image = self.tap_qkv("img", *(t[:, n_text:n_text + n_image].transpose(1, 2) for t in (q, k, v)))
        if reference:
            ref = self.tap_qkv(REFERENCE, *(t[:, n_text + n_image:].transpose(1, 2) for t in (q, k, v)))
            if n_reference:  # without references the ref taps fire on empty tensors: nothing to join
                image = [torch.cat([i, r], dim=2) for i, r in zip(image, ref)]
        text = self.tap_qkv("txt", *(t[:, :n_text].transpose(1, 2) for t in (q, k, v)))
        q, k, v = (torch.cat([t.transpose(1, 2), i.transpose(1, 2)], dim=1) for t, i in zip(text, image))
        return q, k, v, n_image

    def tap_image_out(self, image: torch.Tensor, n_image: int) -> torch.Tensor:
        """The image stream's attention output (batch, tokens, features) through its taps: the image tokens', then the
        reference tokens'. The output projection has run on the whole stream, as in the stock processors, so its
        rounding is the stock one."""
        if REFERENCE not in self.streams:
            return self.hook_out_img(image)
        return torch.cat([self.hook_out_img(image[:, :n_image]), self.hook_out_ref(image[:, n_image:])], dim=1)

    def attend_joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_text: int, n_image: int,
                     stock: Callable[[], tuple[torch.Tensor, torch.Tensor | None]],
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """`attend` over a joint [text | image | reference] sequence (Flux, Qwen-Image, Flux.2), q, k, v (batch,
        heads, tokens, dim), firing the log-sum-exp taps while attention is recorded. Returns the output."""
        reference = REFERENCE in self.streams
        streams = {"txt": slice(0, n_text), "img": slice(n_text, n_text + n_image),
                   **({REFERENCE: slice(n_text + n_image, None)} if reference else {})}
        out, lse = self.attend(q, k, v, streams, stock, mask)
        if self.record_lse:
            self.hook_lse_img(lse[:, :, n_text:n_text + n_image])
            if reference:
                self.hook_lse_ref(lse[:, :, n_text + n_image:])
            self.hook_lse_txt(lse[:, :, :n_text])
        return out

def project_qkv(attn, x: torch.Tensor, stream: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v projections of one stream, through the fused projection when `fuse_qkv_projections()` made one."""
    if getattr(attn, "fused_projections", False):
        return (attn.to_qkv if stream == "img" else attn.to_added_qkv)(x).chunk(3, dim=-1)
    if stream == "img":
        return attn.to_q(x), attn.to_k(x), attn.to_v(x)
    return attn.add_q_proj(x), attn.add_k_proj(x), attn.add_v_proj(x)


def qk_norms(attn, stream: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k after one stream's qk-norms, where the attention has them (SD3.5, Qwen-Image; SD3 has none)."""
    norm_q, norm_k = (attn.norm_q, attn.norm_k) if stream == "img" else (attn.norm_added_q, attn.norm_added_k)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k))

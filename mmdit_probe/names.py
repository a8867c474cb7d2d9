"""The hook-name grammar, the one place that builds and parses names such as ``blocks.7.attn.hook_q_img``.

A hook point's name is ``blocks.{block}.{attention}.hook_{activation}_{stream}``: `attention` is
"attn" (joint attention) or "attn2" (SD3.5-M's image-only attention), `activation` one of q, k, v,
out (and lse, which fires only while attention is recorded), `stream` img or txt (or ref: the reference
tokens of a family that has them, e.g. Flux.1 Kontext's context image). A *kind* is a name
without its block ("q_img", "attn2.q_img"). No torch here: the CLI and the families share it.
"""

from __future__ import annotations

from typing import NamedTuple

QKV = ("q", "k", "v")
STREAMS = ("img", "txt")
ACTIVATIONS = (*QKV, "out")
ATTENTIONS = ("attn", "attn2")
TAPPED = (*ACTIVATIONS, "lse")  # every activation with a hook point; lse fires only while recording
# Every kind an experiment may patch, activation by activation (the order error messages list them in).
TAP_KINDS = tuple(f"{a}_{s}" for a in ACTIVATIONS for s in STREAMS)
# The order in which one attention's taps run, in every family; nnsight reads must follow it.
TAP_ORDER = ("q_img", "k_img", "v_img", "q_txt", "k_txt", "v_txt", "out_img", "out_txt")
# The taps attention recording reads, in execution order.
RECORDED_TAPS = ("q_img", "k_img", "q_txt", "k_txt", "lse_img", "lse_txt")
# A third region: reference tokens (Flux.1 Kontext's context image) that follow the image tokens in the image stream.
# Their taps ("q_ref", ...) exist only where a family has such a region (`Family.has_reference`).
REFERENCE = "ref"
REFERENCE_TAP_KINDS = tuple(f"{a}_{REFERENCE}" for a in ACTIVATIONS)
# The order of one attention's taps where the image stream holds reference tokens: each of the image stream's
# activations is tapped for the image tokens, then for the reference tokens.
TAP_ORDER_REFERENCE = ("q_img", "k_img", "v_img", "q_ref", "k_ref", "v_ref", "q_txt", "k_txt", "v_txt", "out_img",
                       "out_ref", "out_txt")
# The taps that recording reference maps reads, in execution order.
RECORDED_TAPS_REFERENCE = ("q_img", "k_img", "q_ref", "k_ref", "q_txt", "k_txt", "lse_img", "lse_ref", "lse_txt")
FORMAT_MESSAGE = "hook names look like 'blocks.7.attn.hook_q_img'"


class Tap(NamedTuple):
    """A parsed hook name; `block` is None for a kind."""

    block: int | None
    attention: str
    leaf: str  # the module name inside the processor, e.g. "hook_q_img"

    @property
    def short(self) -> str:
        """The leaf without "hook_", e.g. "q_img"."""
        return self.leaf.removeprefix("hook_")

    @property
    def activation(self) -> str:
        return self.short.rpartition("_")[0]

    @property
    def stream(self) -> str:
        return self.short.rpartition("_")[2]

    @property
    def kind(self) -> str:
        """The name without its block: "q_img", or "attn2.q_img" outside the joint attention."""
        return self.short if self.attention == "attn" else f"{self.attention}.{self.short}"


def leaf(activation: str, stream: str) -> str:
    """The hook point's module name inside its processor: ``hook_q_img``."""
    return f"hook_{activation}_{stream}"


def tap(block: int, short: str, attention: str = "attn") -> str:
    """The name of tap `short` ("q_img", "lse_txt", ...) of one block's attention: ``blocks.7.attn.hook_q_img``."""
    return f"blocks.{block}.{attention}.hook_{short}"


def tap_name(block: int, activation: str, stream: str = "img", attention: str = "attn") -> str:
    """The stable name of a hook point, e.g. ``tap_name(7, "q") == "blocks.7.attn.hook_q_img"``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {ACTIVATIONS}")
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; choose from {STREAMS}")
    return tap(block, f"{activation}_{stream}", attention)


def parse_tap(name: str) -> Tap:
    """Split a hook name into block, attention and leaf; ValueError unless it has the form ``blocks.N.X.Y``.

    The block may be negative (the family says it is out of range); whether the attention and the leaf
    exist is the family's to say (`Family.tap_path`)."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or not parts[1].lstrip("-").isdigit():
        raise ValueError(f"{FORMAT_MESSAGE}; got {name!r}")
    return Tap(int(parts[1]), parts[2], parts[3])


def parse_kind(kind: str) -> Tap | None:
    """A kind such as "v_txt", "hook_v_txt", "attn.v_txt" or "attn2.q_img" as a Tap without block; None if
    it names no tap of `TAP_KINDS` in `ATTENTIONS`."""
    attention, _, short = kind.rpartition(".")
    short = short.removeprefix("hook_")
    if short not in (*TAP_KINDS, *REFERENCE_TAP_KINDS) or attention not in ("", *ATTENTIONS):
        return None
    return Tap(None, attention or "attn", f"hook_{short}")


def token_dim(name: str) -> int:
    """Token dimension of a hook point: 2 for q/k/v (batch, heads, tokens, dim), 1 for outputs."""
    return 1 if ".hook_out_" in name else 2

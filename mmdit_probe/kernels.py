"""Attention that also returns each query's normaliser, without building the N x N matrix.

T2I and I2T probabilities need, for each query row, the log-sum-exp of its scaled logits over
*all* keys of the joint sequence. The fused kernels compute it anyway: `attention_with_lse` asks
torch which kernel `scaled_dot_product_attention` would pick for these inputs and calls that same
kernel with its log-sum-exp output switched on, so the attention output stays the stock one, bit
for bit. The first call for each device, dtype, kernel and shape is checked: the output against
`scaled_dot_product_attention` itself, the log-sum-exp against `chunked_logsumexp` on a slice of
queries. Where no fused kernel applies (or a check fails, with a warning), the normaliser is
computed in query chunks instead: exact, at the cost of one extra float32 QK^T. With an attention
mask (Chroma's padded text) the CPU kernel takes it too; on other devices the chunked normaliser applies it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

# How far a fused kernel's log-sum-exp may sit from the float32 reference (nats) and still be used:
# both sum the same float32 logits, in different orders.
LSE_TOLERANCE = 1e-3
_CHECKED_QUERIES = 256


def masked(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Logits with an attention mask applied as `scaled_dot_product_attention` applies it: a boolean mask keeps
    where True (elsewhere -inf), a float mask is added."""
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, -torch.inf)
    return logits + mask


def query_chunks(q: torch.Tensor, k: torch.Tensor, budget: int, mask: torch.Tensor | None = None):
    """(query slice, logits q k^T / sqrt(d) of those queries, masked as `masked` does) for (batch, heads, tokens, dim)
    inputs, over query chunks whose float32 logits stay within `budget` bytes."""
    scale = q.shape[-1] ** -0.5
    chunk = max(1, budget // (4 * q.shape[0] * q.shape[1] * k.shape[2]))
    keys = k.transpose(-1, -2)
    for start in range(0, q.shape[2], chunk):
        rows = slice(start, start + chunk)
        # A mask may broadcast over the queries (size 1 there: a key mask).
        rows_mask = mask if mask is None or mask.shape[2] == 1 else mask[:, :, rows]
        yield rows, masked(q[:, :, rows] @ keys * scale, rows_mask)


def chunked_logsumexp(q: torch.Tensor, k: torch.Tensor, budget: int = 2**28,
                      attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log-sum-exp over keys of q k^T / sqrt(d) for (batch, heads, tokens, dim) inputs, with `attn_mask`
    ((batch, 1 or heads, tokens, keys), applied as `masked` does) where given.

    In float32 (as the recorder's logits are: half-precision logits would not match them), over
    query chunks whose logits stay within `budget` bytes.
    """
    chunks = query_chunks(q.float(), k.float(), budget, attn_mask)
    return torch.cat([torch.logsumexp(logits, dim=-1) for _, logits in chunks], dim=2)


def _flash_cpu(q, k, v, mask=None):
    # The CPU kernel takes additive masks only; `scaled_dot_product_attention` converts boolean ones the same way.
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, -torch.inf)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask)[:2]


def _flash_cuda(q, k, v):
    # `scaled_dot_product_attention` pads the head dimension to a multiple of 8 for this kernel, and keeps the
    # unpadded dimension's scale, computed as it computes it.
    d = q.shape[-1]
    pad = (0, -d % 8)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        *(F.pad(t, pad) if pad[1] else t for t in (q, k, v)), 0.0, False, False, scale=1.0 / math.sqrt(d))[:2]
    return out[..., :d], lse


_FUSED: dict[tuple[str, SDPBackend], Callable] = {
    ("cpu", SDPBackend.FLASH_ATTENTION): _flash_cpu,
    ("cuda", SDPBackend.FLASH_ATTENTION): _flash_cuda,
    ("cuda", SDPBackend.EFFICIENT_ATTENTION):
        lambda q, k, v: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2],
    ("cuda", SDPBackend.CUDNN_ATTENTION):
        lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2],
}
_trusted: dict[tuple, bool] = {}


def fused_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> SDPBackend | None:
    """The fused kernel `scaled_dot_product_attention` would run for these inputs, if we can ask it
    for a log-sum-exp too; None otherwise (the math path, or an unknown kernel)."""
    backend = SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask))
    return backend if (q.device.type, backend) in _FUSED else None


def _agrees(q, k, v, out, lse, mask=None) -> str | None:
    """Why the fused result cannot be used, or None when it matches the references."""
    if not torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask)):
        return "its output differs from scaled_dot_product_attention's"
    n = min(q.shape[2], _CHECKED_QUERIES)
    reference = chunked_logsumexp(q[:, :, :n], k, attn_mask=None if mask is None else mask[:, :, :n])
    error = (lse[:, :, :n].float() - reference).abs().max().item()
    if not error <= LSE_TOLERANCE:
        return f"its log-sum-exp is {error:.3g} nats from the float32 reference"
    return None


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (batch, heads, tokens, dim) inputs, and each query's log-sum-exp
    (batch, heads, tokens), float32. The output is the one `scaled_dot_product_attention` gives, with
    `attn_mask` where given (boolean: keep where True; float: added to the logits)."""
    backend = fused_backend(q, k, v, attn_mask)
    if attn_mask is not None and q.device.type != "cpu":
        backend = None  # the CUDA kernels take masks padded their own way: the chunked normaliser stays exact
    mask_key = None if attn_mask is None else (attn_mask.dtype, tuple(attn_mask.shape))
    key = (str(q.device), q.dtype, backend, tuple(q.shape), tuple(k.shape), mask_key)
    if backend is not None and _trusted.get(key, True):
        out, lse = _FUSED[(q.device.type, backend)](q, k, v, *((attn_mask,) if attn_mask is not None else ()))
        lse = lse.squeeze(-1) if lse.ndim == 4 else lse  # cuDNN keeps a trailing singleton
        lse = lse[:, :, :q.shape[2]]  # the efficient kernel pads the query dimension to a multiple of 32
        if key not in _trusted:
            problem = _agrees(q, k, v, out, lse, attn_mask)
            _trusted[key] = problem is None
            if problem:
                warnings.warn(f"{backend.name} attention on {q.device} ({q.dtype}) cannot give maps: {problem}. "
                              f"Recording falls back to a chunked log-sum-exp (exact, slower).", stacklevel=2)
        if _trusted[key]:
            return out, lse
    return (F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask),
            chunked_logsumexp(q, k, attn_mask=attn_mask))


def attention_entropy(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, budget: int = 2**28) -> torch.Tensor:
    """Entropy of each query's softmax attention, lse - sum_j p_j s_j, in query chunks: (batch, heads, tokens)."""
    return torch.cat([lse[:, :, rows] - (torch.exp(logits - lse[:, :, rows].unsqueeze(-1)) * logits).sum(-1)
                      for rows, logits in query_chunks(q, k, budget)], dim=2)


def _no_key(mask: torch.Tensor) -> torch.Tensor:
    """The rows (batch, 1 or heads, queries or 1) in which `mask` removes every key."""
    return ~mask.any(-1) if mask.dtype == torch.bool else torch.isneginf(mask).all(-1)


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_source: torch.Tensor,
                     k_source: torch.Tensor, region: slice, rest: slice | torch.Tensor,
                     attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries `q` over keys `k` in which the scores against the keys `region` are those of `q_source`
    and `k_source`: (batch, heads, tokens, dim) inputs; the keys `region` and `rest` (a range or an index of
    positions) together are all keys. `attn_mask`, where given, is the mask of `q`'s rows over all keys,
    (batch, 1 or heads, queries or 1, keys), applied to the replaced scores as to the others (as `masked` does).

    Each row is softmax(concat(q_source k_source[region]^T, q k[rest]^T) / sqrt(d) + mask) @ concat(v[region],
    v[rest]), computed as two attention calls over the key subsets, each with its slice of the mask and its
    log-sum-exp, combined through them: no score matrix is built. Returns the output (float32) and each row's
    log-sum-exp over all keys (float32).

    >>> out, lse = region_attention(q, k, v, q_src, k_src, region=slice(0, 16), rest=slice(16, None))
    """
    region_mask = rest_mask = None
    if attn_mask is not None:
        region_mask, rest_mask = attn_mask[..., region], attn_mask[..., rest]
    kept, kept_lse = attention_with_lse(q_source, k_source[:, :, region], v[:, :, region], attn_mask=region_mask)
    own, own_lse = attention_with_lse(q, k[:, :, rest], v[:, :, rest], attn_mask=rest_mask)
    if attn_mask is not None:  # a row the mask leaves no key of a subset: the CPU kernel's log-sum-exp reads 0 there
        kept_lse = kept_lse.masked_fill(_no_key(region_mask), -torch.inf)
        own_lse = own_lse.masked_fill(_no_key(rest_mask), -torch.inf)
    lse = torch.logaddexp(kept_lse, own_lse)
    # A subset the mask removes entirely from a row weighs 0 there, whatever its (undefined) output reads.
    parts = [torch.where(weight > 0, weight * part.float(), 0.0)
             for weight, part in ((torch.exp(kept_lse - lse).unsqueeze(-1), kept),
                                  (torch.exp(own_lse - lse).unsqueeze(-1), own))]
    return parts[0] + parts[1], lse

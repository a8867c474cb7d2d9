"""Attention that also returns each query's normaliser, without building the N x N matrix.

T2I and I2T probabilities need, for each query row, the log-sum-exp of its scaled logits over
*all* keys of the joint sequence. The fused kernels compute it anyway; on CPU torch exposes the
same flash kernel that `scaled_dot_product_attention` dispatches to, so the attention output stays
bit-identical. Elsewhere the normaliser is computed in query chunks (exact, one extra QK^T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def chunked_logsumexp(q: torch.Tensor, k: torch.Tensor, budget: int = 2**28) -> torch.Tensor:
    """log-sum-exp over keys of q k^T / sqrt(d) for (batch, heads, tokens, dim) inputs.

    In float32 (as the recorder's logits are: half-precision logits would not match them), over
    query chunks whose logits stay within `budget` bytes.
    """
    scale = q.shape[-1] ** -0.5
    batch, heads, _, _ = q.shape
    chunk = max(1, budget // (4 * batch * heads * k.shape[2]))
    keys = k.float().transpose(-1, -2)
    return torch.cat([torch.logsumexp((part.float() @ keys) * scale, dim=-1) for part in q.split(chunk, dim=2)],
                     dim=2)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of (batch, heads, tokens, dim) inputs, and each query's log-sum-exp."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    return F.scaled_dot_product_attention(q, k, v), chunked_logsumexp(q, k)

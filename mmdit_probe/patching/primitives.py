"""Patching primitives: replace, blend or zero any hook point's rows and token positions.

The row helpers are pure functions on a tensor; `patch` applies one to a hook point inside an
nnsight trace. Batch rows follow the pipeline's layout: one row per prompt, and under
classifier-free guidance the unconditional rows first, then the conditional ones; `rows()` finds
them. Where guidance is a second transformer call per step (`Family.calls_per_step`), each call holds
one row per prompt (what `rows()` gives for "cond"), and `tracer.iter` walks the calls: call 2s is step
s's conditional one, 2s + 1 its unconditional one. Token positions index the hook's token dimension
(image tokens for `*_img`, text positions for `*_txt`).

>>> inputs = probe.inputs(["a red circle ...", "a blue circle ..."], seed=0)
>>> with probe.model.generate(**inputs) as tracer:
...     for call in tracer.iter[0:inputs["num_inference_steps"] * probe.family.calls_per_step(inputs)]:
...         for block in range(probe.family.num_blocks):
...             patch(probe, f"blocks.{block}.attn.hook_v_img",
...                   lambda v: replace_rows(v, source=rows(2, v, 0), target=rows(2, v, 1)))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..names import token_dim  # noqa: F401  (moved to mmdit_probe.names; this alias stays one release)

Index = Sequence[int] | torch.Tensor | None


def rows(n_prompts: int, x: torch.Tensor, prompt: int, half: str = "cond") -> list[int]:
    """Batch rows of one prompt in an activation `x`: its conditional row, unconditional row, or both."""
    if not 0 <= prompt < n_prompts:
        raise IndexError(f"prompt index {prompt} out of range: {n_prompts} prompts")
    if x.shape[0] == n_prompts:
        if half == "uncond":
            raise ValueError("this run has no unconditional rows (no classifier-free guidance)")
        return [prompt]
    if x.shape[0] != 2 * n_prompts:
        raise ValueError(f"a batch of {x.shape[0]} rows does not fit {n_prompts} prompts")
    return {"cond": [n_prompts + prompt], "uncond": [prompt], "both": [prompt, n_prompts + prompt]}[half]


def _apply(x: torch.Tensor, target: Index, positions: Index, dim: int,
           change: Callable[[torch.Tensor, Callable], torch.Tensor]) -> torch.Tensor:
    """A copy of `x` whose target rows (restricted to `positions` along `dim`) become
    `change(region, take)`, where `take(rows)` cuts the same region out of other rows."""
    pos = None if positions is None else torch.as_tensor(positions, device=x.device)

    def take(rows_: Index) -> torch.Tensor:
        part = x[torch.as_tensor(rows_, device=x.device)]
        return part if pos is None else part.index_select(dim, pos)

    target = torch.as_tensor(target, device=x.device)
    out = x.clone()
    new = change(take(target), take)
    out[target] = new if pos is None else out[target].index_copy(dim, pos, new)
    return out


def replace_rows(x: torch.Tensor, source: Index, target: Index, positions: Index = None,
                 dim: int = 2) -> torch.Tensor:
    """A copy of `x` whose `target` rows take the `source` rows' values (at `positions` of `dim`)."""
    return _apply(x, target, positions, dim, lambda region, take: take(source))


def blend_rows(x: torch.Tensor, source: Index, target: Index, alpha: float, positions: Index = None,
               dim: int = 2) -> torch.Tensor:
    """A copy of `x` with target = (1 - alpha) * target + alpha * source (at `positions` of `dim`)."""
    return _apply(x, target, positions, dim, lambda region, take: torch.lerp(region, take(source), alpha))


def zero_rows(x: torch.Tensor, target: Index, positions: Index = None, dim: int = 2) -> torch.Tensor:
    """A copy of `x` with the target rows (at `positions` of `dim`) set to zero."""
    return _apply(x, target, positions, dim, lambda region, take: torch.zeros_like(region))


def set_rows(x: torch.Tensor, value: torch.Tensor, target: Index, positions: Index = None,
             dim: int = 2) -> torch.Tensor:
    """A copy of `x` with the target rows (at `positions` of `dim`) set to `value` (e.g. from another run)."""
    return _apply(x, target, positions, dim,
                  lambda region, take: value.to(device=x.device, dtype=x.dtype).expand_as(region))


def patch(probe, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Inside a trace: replace hook point `name`'s output by `change(output)`; returns the new value."""
    hook = probe.hook(name)
    new = change(hook.output)
    hook.output = new
    return new

"""FireFlow (Deng et al., 2024, "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing").

The sampler: a midpoint step whose starting velocity is reused from the step before. The midpoint
velocity of the previous step, v(x_prev + h/2 v, σ_prev + h/2), stands in for v(x, σ) at the new
point, so each step costs one model call (the first step one more):

    v  = the previous step's midpoint velocity (a model call at the very first step),
    v½ = v(x + h/2 v, σ + h/2),   x_next = x + h v½,   and v½ is kept for the next step.

The same step runs both ways (h < 0 sampling, h > 0 inverting; `sampling.steps.FireFlow`): `invert(method="fireflow")`.
Near second order at the cost of Euler.

The edit is RF-Solver-Edit's value sharing (`value_sharing.share_values`; the `rf_solver` module docstring
lists where ours differs from the published code) with FireFlow's sampler and FireFlow's published
defaults: 8 steps with the first one sharing, guidance 2 (inversion at 1), V of all 38 FLUX.1
single-stream blocks. The published code replaces V only where a feature was stored during
inversion, so at the first step only the midpoint call shares; ours shares in every call of an
injected step.

>>> result = fireflow_edit(probe, "in the center a red circle on a white background",
...                        "in the center a blue circle on a white background")
"""

from __future__ import annotations

from typing import Any

import torch

from ..sampling.steps import FireFlow  # noqa: F401  (moved to sampling.steps; this alias stays one release)
from .base import EditResult
from .value_sharing import ValueSharing, share_values

# FireFlow's scripts ("fast editing"): FLUX.1-dev, 8 steps, `--inject 1`, guidance 2, V of single-stream
# blocks 0-37.
FIREFLOW_EDIT = ValueSharing("FireFlow", "fireflow", paper_steps=8, paper_inject=1, paper_guidance=2.0,
                             first_single=0, source="FireFlow's public code, src/run_*.sh (\"Fast Editing\")")


def fireflow_edit(probe, source: str, target: str, *, image=None, seed: int = 0, inject: int | None = None,
                  blocks: list[int] | None = None, latents: torch.Tensor | None = None,
                  inversion_guidance: float | None = None, **generation: Any) -> EditResult:
    """FireFlow's edit: source and target sampled with FireFlow, the source's image values shared in the
    blocks of `FIREFLOW_EDIT` for the first steps. With `image`, edits a real image (inverted with FireFlow)."""
    return share_values(probe, source, target, FIREFLOW_EDIT, image=image, seed=seed, inject=inject, blocks=blocks,
                        latents=latents, inversion_guidance=inversion_guidance, **generation)

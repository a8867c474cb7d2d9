"""Integrating the ODE over a σ grid with one step method: sampling (σ descending) and inverting (ascending)."""

from __future__ import annotations

import torch

from .. import validation
from ..constants import SOLVERS
from .steps import solver
from .velocity import sampler_velocity


def solve(velocity, x: torch.Tensor, sigmas: torch.Tensor, method: str, before_step=None,
          iterations: int = 3) -> torch.Tensor:
    """Integrate dx/dσ = velocity(x, σ) over the grid `sigmas` (descending: sampling; ascending:
    inversion) with one step method of `steps.STEPS`; `before_step(i)` runs before step i (e.g. to switch a
    hook); `iterations` is "fixed-point"'s."""
    step = solver(method, iterations)
    for i in range(len(sigmas) - 1):
        if before_step is not None:
            before_step(i)
        x = step(velocity, x, float(sigmas[i]), float(sigmas[i + 1]))
    return x


@torch.no_grad()
def sample_latents(probe, inputs: dict, method: str) -> torch.Tensor:
    """Clean latents (sampler layout) from `inputs` (as `probe.inputs` makes them, with latents) by a
    solver of `SOLVERS` instead of the pipeline's scheduler."""
    if method not in SOLVERS:
        raise validation.InvalidInput(f"sample_latents integrates with a solver of its own: choose one of "
                                      f"{', '.join(SOLVERS)} (the pipeline samples with Euler)")
    if inputs.get("latents") is None:
        raise validation.InvalidInput("sample_latents needs the initial latents in inputs (probe.inputs(...) with "
                                      "same_noise=True gives them)")
    velocity, sigmas = sampler_velocity(probe, inputs)
    return solve(velocity, inputs["latents"].to(velocity.device, velocity.dtype), sigmas, method)

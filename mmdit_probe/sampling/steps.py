"""One step of the rectified-flow ODE dx/dσ = v(x, σ) from σ to σ_next, per method: ``step(velocity, x, sigma,
following)``. h = σ_next - σ is negative when sampling (σ: 1 -> 0) and positive when inverting (0 -> 1); every
step runs both ways.

- "euler": x + h v(x, σ) (one velocity per step; the pipeline's sampler, and the paper's inversion baseline);
- "heun": a second-order predictor-corrector step (two velocities per step): follows the true ODE more closely;
- "fixed-point": the implicit step x_next = x + h v(x_next, σ_next), by fixed-point iteration from the Euler guess
  (1 + `iterations` velocities per step): run upwards, it inverts the sampler's own Euler step exactly;
- "rf-solver": RF-Solver's second-order Taylor step (two velocities per step; `editing.rf_solver`);
- "fireflow": FireFlow's midpoint step reusing the last midpoint velocity (one per step; `editing.fireflow`).
"""

from __future__ import annotations

import torch


class Euler:
    """One explicit Euler step; one velocity call."""

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        return x + (following - sigma) * velocity(x, sigma)


class Heun:
    """One Heun step (Euler's guess, then the mean of the velocities at both ends); two velocity calls."""

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        v = velocity(x, sigma)
        guess = x + (following - sigma) * v
        return x + (following - sigma) * 0.5 * (v + velocity(guess, following))


class FixedPoint:
    """One implicit Euler step, x_next = x + h v(x_next, σ_next), by `iterations` fixed-point iterations from the
    explicit Euler guess."""

    def __init__(self, iterations: int = 3) -> None:
        self.iterations = iterations

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        guess = x + (following - sigma) * velocity(x, sigma)
        for _ in range(self.iterations):
            guess = x + (following - sigma) * velocity(guess, following)
        return guess


class RFSolver:
    """One RF-Solver step from σ to σ_next (either direction); two velocity calls."""

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        h = following - sigma
        v = velocity(x, sigma)
        v_half = velocity(x + h / 2 * v, sigma + h / 2)
        return x + h * v + 0.5 * h**2 * (v_half - v) / (h / 2)


class FireFlow:
    """FireFlow steps from σ to σ_next (either direction); one velocity call per step after the first.
    Stateful: a fresh solver for every trajectory."""

    def __init__(self) -> None:
        self.velocity: torch.Tensor | None = None  # the last midpoint velocity, reused as the next start

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        h = following - sigma
        v = velocity(x, sigma) if self.velocity is None else self.velocity
        self.velocity = velocity(x + h / 2 * v, sigma + h / 2)
        return x + h * self.velocity


# One class per method of `constants.INVERSION_METHODS`, in its order.
STEPS = {"euler": Euler, "heun": Heun, "fixed-point": FixedPoint, "rf-solver": RFSolver, "fireflow": FireFlow}


def solver(method: str, iterations: int = 3):
    """A fresh step function of a method in `STEPS`: ``step(velocity, x, sigma, following)``; `iterations`
    is "fixed-point"'s."""
    step = STEPS[method]
    return step(iterations) if step is FixedPoint else step()

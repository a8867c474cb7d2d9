"""Step windows: a run's denoising steps in thirds (early, middle, late), as the sweeps, the toy's evaluation and
activation patching (`steps="windows"`) average or patch them."""

from __future__ import annotations


def step_windows(n_steps: int) -> dict[str, list[int]]:
    """The steps of each third of `n_steps` ("early", "middle", "late"; a third may be empty) and "all"."""
    third = n_steps / 3
    return {"early": [s for s in range(n_steps) if s < third],
            "middle": [s for s in range(n_steps) if third <= s < 2 * third],
            "late": [s for s in range(n_steps) if s >= 2 * third],
            "all": list(range(n_steps))}

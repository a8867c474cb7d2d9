"""Real-image inversion: run the rectified-flow ODE backwards from the image to its initial noise.

The sampler integrates dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (image). Inversion integrates
from σ = 0 back to 1 on the same σ grid, with the same transformer call the pipeline makes
(`velocity.sampler_velocity`), with one step method of `steps` (`METHODS`: "euler", "heun",
"fixed-point", "rf-solver", "fireflow"; see `steps` for each). "fixed-point" inverts the sampler's own
Euler step exactly.

The first three invert the pipeline's Euler sampler; "rf-solver" and "fireflow" invert their own
sampler (`solve.sample_latents`), which `invert(check=True)` regenerates with.

>>> inverted = invert(probe, image, "in the center a red circle on a white background", method="fixed-point")
>>> inverted.error, inverted.reconstruction
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import validation
from ..constants import INVERSION_METHODS as METHODS
from ..constants import SOLVERS
from .images import as_image, decode, encode, pixel_error
from .solve import sample_latents, solve
from .velocity import check_own_sampler, sampler_velocity


@dataclass
class Inversion:
    latents: torch.Tensor  # the initial noise that regenerates the image (one prompt's worth)
    method: str
    prompt: str
    error: float | None  # mean absolute pixel error (0-255) of the regenerated image, if checked
    reconstruction: Any  # the regenerated image, if checked


def check_inversion(method: str, iterations: int) -> int:
    """Refuse an unknown method or a bad iteration count before anything runs."""
    if not isinstance(method, str) or method not in METHODS:
        raise validation.InvalidInput(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    return validation.integer("iterations", iterations, minimum=0)


@torch.no_grad()
def invert_latents(probe, latents: torch.Tensor, prompt: str, *, method: str = "fixed-point",
                   iterations: int = 3, **generation: Any) -> torch.Tensor:
    """Run the sampler's ODE backwards from clean latents (in the sampler's layout) to the noise."""
    iterations = check_inversion(method, iterations)
    _check_prompt(prompt)
    check_own_sampler(generation, also=("output_type",))
    if not isinstance(latents, torch.Tensor) or not torch.isfinite(latents).all():
        raise validation.InvalidInput("latents must be a tensor of finite values (the clean latents to invert)")
    velocity, sigmas = sampler_velocity(probe, probe.inputs(prompt, seed=0, **generation))
    return solve(velocity, latents.to(velocity.device, velocity.dtype), sigmas.flip(0), method, iterations=iterations)


def _check_prompt(prompt) -> None:
    validation.prompt("prompt", prompt, empty_ok=False, message="inversion needs the prompt that describes the image "
                      "(got none)")


@torch.no_grad()
def invert(probe, image, prompt: str, *, method: str = "fixed-point", iterations: int = 3, check: bool = True,
           **generation: Any) -> Inversion:
    """The initial latent that regenerates `image` from `prompt` (same steps and guidance).

    generation: steps, guidance, height, width (default: the preset's), as for generation.
    iterations: fixed-point iterations per step (method "fixed-point" only).
    check: regenerate from the latent and report the mean absolute pixel error.
    """
    iterations = check_inversion(method, iterations)
    validation.boolean("check", check)
    _check_prompt(prompt)
    check_own_sampler(generation, also=("output_type", "latents"))
    inputs = probe.inputs(prompt, seed=0, **generation)
    image = as_image(image, (inputs["width"], inputs["height"]))
    clean = encode(probe, image, inputs["height"], inputs["width"])
    x = invert_latents(probe, clean, prompt, method=method, iterations=iterations, **generation)
    error, reconstruction = None, None
    if check:
        if method in SOLVERS:  # regenerate with the sampler this method inverts
            regenerated = sample_latents(probe, {**inputs, "latents": x}, method)
            reconstruction = decode(probe, regenerated, inputs["height"], inputs["width"])[0]
        else:
            reconstruction = probe.pipeline(**{**inputs, "latents": x}).images[0]
        error = pixel_error(reconstruction, image)
    return Inversion(x, method, prompt, error, reconstruction)

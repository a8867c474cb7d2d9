"""Real-image inversion: run the rectified-flow ODE backwards from the image to its initial noise.

The sampler integrates dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (image). Inversion integrates
from σ = 0 back to 1 on the same σ grid, with the same transformer call the pipeline makes (same
text embeddings, guidance, ids), captured from the pipeline itself, so one code path serves
every family:

- "euler": plain Euler steps (one velocity per step; the paper's baseline),
- "heun": a second-order predictor-corrector step (two velocities per step): follows the true
  ODE more closely;
- "fixed-point": inverts the sampler's own Euler step exactly, x_high = x_low + h v(x_high, σ_high),
  by fixed-point iteration from the Euler guess (1 + `iterations` velocities per step);
- "rf-solver": RF-Solver's second-order Taylor step (two velocities per step; `rf_solver`),
- "fireflow": FireFlow's midpoint step reusing the last midpoint velocity (one per step; `fireflow`).

The first three invert the pipeline's Euler sampler; "rf-solver" and "fireflow" invert their own
sampler (`sample_latents`), which `invert(check=True)` regenerates with.

>>> inverted = invert(probe, image, "in the center a red circle on a white background", method="fixed-point")
>>> inverted.error, inverted.reconstruction
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import validation
from ..attention import check_one_call_per_step

METHODS = ("euler", "heun", "fixed-point", "rf-solver", "fireflow")
# Methods with their own sampler: they integrate the ODE with `solve` in both directions.
SOLVERS = ("rf-solver", "fireflow")


class _Captured(Exception):
    """Raised from a hook to stop the pipeline once its transformer call is known."""


@dataclass
class Inversion:
    latents: torch.Tensor  # the initial noise that regenerates the image (one prompt's worth)
    method: str
    prompt: str
    error: float | None  # mean absolute pixel error (0-255) of the regenerated image, if checked
    reconstruction: Any  # the regenerated image, if checked


def as_image(image, size: tuple[int, int], quiet: bool = False) -> Image.Image:
    """An RGB PIL image of `size` (width, height) from a real image, checked first (`validation.real_image`); other
    modes are converted, other sizes resized, with a warning (unless `quiet`)."""
    image = validation.real_image(image)
    if image.mode != "RGB":
        if not quiet:
            warnings.warn(f"converting a {image.mode} image to RGB", stacklevel=3)
        image = image.convert("RGB")
    if image.size != size:
        if not quiet:
            warnings.warn(f"resizing the image from {image.size} to {size} (the model's resolution)", stacklevel=3)
        image = image.resize(size, Image.BICUBIC)
    return image


# Pipeline arguments that the paths integrating the ODE themselves (through `sampler_velocity`: inversion, the
# solvers' edits, FlowEdit, image maps by noising) cannot honour: they call the transformer, not the pipeline's
# sampling loop, so step callbacks never run and the pipeline's own outputs are never made.
PIPELINE_ONLY = ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "return_dict")


def check_own_sampler(generation: dict, also: tuple[str, ...] = ()) -> None:
    """Refuse generation keywords that a path through `sampler_velocity` would ignore: `PIPELINE_ONLY`, the
    path's own `also`, and options adding transformer calls per step (the captured velocity is one call)."""
    for key in (*PIPELINE_ONLY, *also):
        if key in generation:
            raise validation.InvalidInput(f"{key}= would be ignored: this integrates the ODE with the transformer "
                                          f"itself, not through the pipeline's sampling loop; leave {key} out")
    check_one_call_per_step(generation)


def _transformer_call(probe, inputs: dict) -> dict:
    """The keyword arguments of the pipeline's first transformer call (everything but the latents)."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = probe.pipeline.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        probe.pipeline(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


class _Velocity:
    """dx/dσ as the sampler computes it: the pipeline's transformer call, with its guidance."""

    def __init__(self, probe, inputs: dict) -> None:
        self.transformer = probe.pipeline.transformer
        self.call = _transformer_call(probe, inputs)
        scheduler = probe.pipeline.scheduler
        # Flux feeds σ, SD3 feeds 1000 σ: read the convention off the captured call.
        self.timestep_scale = float(self.call["timestep"].flatten()[0]) / float(scheduler.timesteps[0])
        self.doubled = self.call["hidden_states"].shape[0] == 2 * len(inputs["prompt"])  # [uncond | cond]
        self.guidance: float | torch.Tensor = inputs["guidance_scale"]  # a tensor gives each row its own
        self.device, self.dtype = self.call["hidden_states"].device, self.call["hidden_states"].dtype

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        batch = torch.cat([x, x]) if self.doubled else x
        t = torch.full((batch.shape[0],), sigma * 1000 * self.timestep_scale, dtype=self.call["timestep"].dtype,
                       device=x.device)
        v = self.transformer(**{**self.call, "hidden_states": batch, "timestep": t})[0]
        if self.doubled:
            uncond, cond = v.chunk(2)
            v = uncond + self.guidance * (cond - uncond)
        return v


def sampler_velocity(probe, inputs: dict) -> tuple[_Velocity, torch.Tensor]:
    """The pipeline's velocity field for these inputs (one row per prompt) and its σ grid (1 -> 0)."""
    velocity = _Velocity(probe, inputs)
    return velocity, probe.pipeline.scheduler.sigmas.to(torch.float64)


def _encode(probe, image: Image.Image, height: int, width: int) -> torch.Tensor:
    pipe = probe.pipeline
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        z = pipe.vae.encode(pixels).latent_dist.mode()
    z = (z - (pipe.vae.config.shift_factor or 0.0)) * pipe.vae.config.scaling_factor
    return probe.family.pack_latents(z)


@torch.no_grad()
def decode(probe, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """Sampler-layout latents to PIL images, as the pipeline decodes them."""
    pipe = probe.pipeline
    z = probe.family.unpack_latents(latents, height, width).to(pipe.vae.dtype)
    z = z / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
    return pipe.image_processor.postprocess(pipe.vae.decode(z).sample, output_type="pil")


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
    x = latents.to(velocity.device, velocity.dtype)
    if method in SOLVERS:
        return solve(velocity, x, sigmas.flip(0), method)
    for i in reversed(range(len(sigmas) - 1)):
        low, high = float(sigmas[i + 1]), float(sigmas[i])
        v = velocity(x, low)
        guess = x + (high - low) * v
        if method == "heun":
            guess = x + (high - low) * 0.5 * (v + velocity(guess, high))
        elif method == "fixed-point":
            for _ in range(iterations):
                guess = x + (high - low) * velocity(guess, high)
        x = guess
    return x


def solver(method: str):
    """A fresh step function of a method in `SOLVERS`: ``step(velocity, x, sigma, following)``."""
    from .fireflow import FireFlow  # imported here: those modules build on this one
    from .rf_solver import RFSolver

    return {"rf-solver": RFSolver, "fireflow": FireFlow}[method]()


def solve(velocity, x: torch.Tensor, sigmas: torch.Tensor, method: str, before_step=None) -> torch.Tensor:
    """Integrate dx/dσ = velocity(x, σ) over the grid `sigmas` (descending: sampling; ascending:
    inversion) with one solver of `SOLVERS`; `before_step(i)` runs before step i (e.g. to switch a hook)."""
    step = solver(method)
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


def _check_prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise validation.InvalidInput("inversion needs the prompt that describes the image (got none)")


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
    clean = _encode(probe, image, inputs["height"], inputs["width"])
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


def pixel_error(a, b) -> float:
    """Mean absolute difference of two images, in pixel values (0-255)."""
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())

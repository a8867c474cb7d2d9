"""Value sharing, the edit of RF-Solver-Edit and FireFlow: source and target sampled together with a solver of
their own, the target's image values in later blocks the source's for the first steps (the `rf_solver` module
docstring describes it and where ours differs from the published code)."""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import names, validation
from ..families import single_streams
from ..sampling.images import decode
from ..sampling.solve import solve
from ..sampling.velocity import check_own_sampler, sampler_velocity
from .base import EditResult, source_and_target, start_from, start_from_image


@dataclass(frozen=True)
class ValueSharing:
    """A value-sharing edit's published defaults, and how they map onto any SD3 or Flux model.

    paper_steps / paper_inject: the published sampling steps and how many of the first share values;
    `inject_steps(n)` keeps that share of n steps. first_single / paper_singles: the published
    Flux single-stream blocks that share values (first_single..paper_singles-1 of FLUX.1's 38).
    """

    name: str
    solver: str  # the inversion / sampling method in `inversion.METHODS`
    paper_steps: int
    paper_inject: int
    paper_guidance: float  # FLUX.1-dev distilled guidance of the target sampling
    first_single: int
    paper_singles: int = 38
    inversion_guidance: float = 1.0  # guidance of a real image's inversion (published: 1)
    source: str = ""

    def inject_steps(self, n_steps: int) -> int:
        return min(n_steps, max(1, round(n_steps * self.paper_inject / self.paper_steps)))

    def blocks(self, family) -> list[int]:
        """Flux: the same share of its single-stream blocks (exactly the published ones on FLUX.1).
        SD3 has joint blocks only: the last blocks, as large a share of its depth as the published
        blocks are of FLUX.1's 57 (RF-Solver: last 18 of 57, so SD3-M's last 8 of 24; FireFlow: 38 of
        57, SD3-M's last 16)."""
        n = family.num_blocks
        singles = single_streams(family)
        if singles:
            first = n - singles + math.floor(singles * self.first_single / self.paper_singles)
            return list(range(first, n))
        shared = self.paper_singles - self.first_single
        count = max(1, round(n * shared / (19 + self.paper_singles)))
        return list(range(n - count, n))


def check_sharing(probe, source: str, target: str, defaults: ValueSharing, inject: int | None,
                  blocks: list[int] | None, n_steps: int) -> tuple[int, list[int]]:
    """Refuse bad prompts, step counts or blocks before any model call; returns (inject, blocks)."""
    validation.edit_prompts(source, target)
    if inject is None:
        inject = defaults.inject_steps(n_steps)
    inject = validation.integer("inject", inject, minimum=0)
    if inject > n_steps:
        raise validation.InvalidInput(f"inject={inject} is more than the {n_steps} sampling steps: give at most "
                                      f"{n_steps} (the first steps that share the source's values)")
    if blocks is None:
        return inject, defaults.blocks(probe.family)
    return inject, probe.family.check_blocks("blocks", blocks)


@torch.no_grad()
def share_values(probe, source: str, target: str, defaults: ValueSharing, *, image=None, seed: int = 0,
                 inject: int | None = None, blocks: list[int] | None = None, latents: torch.Tensor | None = None,
                 inversion_guidance: float | None = None, output_type: str = "pil", **generation: Any) -> EditResult:
    """Source and target sampled together with `defaults.solver`; the target's image values in `blocks`
    are the source's for its first `inject` steps (see the module docstring).

    image: a real image to edit (inverted with the source prompt and the same solver, at
    `inversion_guidance`, default the published 1); else `latents` (one prompt's initial latent), else
    the noise of `seed`. generation: steps, guidance, height, width, max_sequence_length; the solvers call the
    transformer themselves, so the pipeline's step callbacks are refused rather than never called.
    output_type: "pil" (default) or "latent".
    """
    if image is not None and latents is not None:
        raise validation.InvalidInput("give either image= (to invert) or latents=, not both")
    if image is None and inversion_guidance is not None:
        raise validation.InvalidInput("inversion_guidance= is for image= (the guidance of a real image's inversion): "
                                      "leave it out, or give the image")
    check_own_sampler(generation)
    output_type = validation.choice("output_type", output_type, ("pil", "latent"))
    inversion_guidance = validation.number("inversion_guidance", defaults.inversion_guidance if inversion_guidance
                                           is None else inversion_guidance, low=0.0)
    inputs = probe.inputs([source, target], seed=seed, **generation)
    n_steps = inputs["num_inference_steps"]
    inject, blocks = check_sharing(probe, source, target, defaults, inject, blocks, n_steps)
    if image is not None:
        start_from_image(probe, inputs, image, source, method=defaults.solver,
                         **{**generation, "guidance": inversion_guidance})
    start_from(inputs, latents)

    sharing = {"on": False}

    def share(module, args, v):  # the target's rows (both CFG halves) take the source's values
        return source_and_target(v) if sharing["on"] else None

    velocity, sigmas = sampler_velocity(probe, inputs)
    with ExitStack() as hooks:
        for b in blocks:
            # a callback, not enter_context: a handle is asked only for .remove() (tests' stand-ins have no more)
            hooks.callback(probe.module(names.tap(b, "v_img")).register_forward_hook(share).remove)
        x = solve(velocity, inputs["latents"].to(velocity.device, velocity.dtype), sigmas, defaults.solver,
                  before_step=lambda step: sharing.update(on=step < inject))
    images = x if output_type == "latent" else decode(probe, x, inputs["height"], inputs["width"])
    params = {"method": defaults.name, "source": source, "target": target, "seed": int(seed),
              "solver": defaults.solver, "inject_steps": list(range(inject)), "blocks": blocks, "steps": n_steps,
              "guidance": inputs["guidance_scale"], "defaults": asdict(defaults),
              "inversion_guidance": inversion_guidance if image is not None else None}
    return EditResult(images[0], images[1], [], None, params, inputs)

"""RF-Solver and RF-Solver-Edit (Wang et al., 2024, "Taming Rectified Flow for Inversion and Editing").

The sampler: a second-order Taylor step of the rectified-flow ODE dx/dσ = v(x, σ). The derivative of
the velocity along the path is estimated by a finite difference over half a step,

    v0 = v(x, σ),   v½ = v(x + h/2 v0, σ + h/2),   x_next = x + h v0 + ½ h² (v½ - v0) / (h/2),

two model calls per step (h = σ_next - σ: negative when sampling, positive when inverting; the same
step runs both ways). `inversion.invert(method="rf-solver")` inverts with it and `sample` regenerates.
Algebraically the step is the explicit midpoint rule, x + h v½; it is kept in the paper's form.

The edit (RF-Edit, "feature sharing"): while the target is sampled, for its first `inject` steps the
image stream's values V in the later blocks are the source's. `rf_solver_edit` samples source and
target as one batch from the same initial latent (noise, or a real image inverted with the same
solver) and, through a hook on ``blocks.{i}.attn.hook_v_img``, gives the target's rows the source's
(`patching.replace_rows`). Where ours differs from the published code (FLUX.1-dev, BFL reference code):

- V comes from the source's own sampling run from the same latent, at the same step and call, not
  from features stored during inversion (they coincide for an exact inversion); generated scenes
  need no inversion at all.
- Only the image stream's values are shared; the published single-stream blocks replace the joint
  [text | image] V. The target's text values stay its own, so its prompt still acts through them.
- Under classifier-free guidance (SD3) both the conditional and the unconditional target rows take
  the source's values: both make up the target's velocity. A real image is inverted at guidance 1, as
  published (Flux's distilled guidance 1; for SD3 the conditional velocity alone, no CFG), and sampled
  at the model's guidance: on the Shapes world, inverting at the sampling guidance (4) makes some
  reconstructions diverge (`benchmarks/results/inversion_methods.md`).
- Blocks: see `ValueSharing.blocks` (SD3 has no single-stream blocks: the same share of depth).

>>> result = rf_solver_edit(probe, "in the center a red circle on a white background",
...                         "in the center a blue circle on a white background")
>>> result.source_image, result.edited_image, result.params["inject_steps"]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .. import validation
from .inversion import _encode, as_image, check_own_sampler, decode, invert_latents, sampler_velocity, solve
from .qk_injection import EditResult
from .stable_flow import source_and_target


class RFSolver:
    """One RF-Solver step from σ to σ_next (either direction); two velocity calls."""

    def __call__(self, velocity, x: torch.Tensor, sigma: float, following: float) -> torch.Tensor:
        h = following - sigma
        v = velocity(x, sigma)
        v_half = velocity(x + h / 2 * v, sigma + h / 2)
        return x + h * v + 0.5 * h**2 * (v_half - v) / (h / 2)


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
        singles = n - family.num_double if family.name == "flux" else 0
        if singles:
            first = n - singles + math.floor(singles * self.first_single / self.paper_singles)
            return list(range(first, n))
        shared = self.paper_singles - self.first_single
        count = max(1, round(n * shared / (19 + self.paper_singles)))
        return list(range(n - count, n))


# RF-Solver-Edit's README and scripts: FLUX.1-dev, 25-30 steps, guidance 2, `--inject` 2 to 8 (its
# scripts use 3 of 25), V of single-stream blocks 20-37.
RF_SOLVER_EDIT = ValueSharing("RF-Solver-Edit", "rf-solver", paper_steps=25, paper_inject=3, paper_guidance=2.0,
                              first_single=20, source="github.com/wangjiangshan0725/RF-Solver-Edit (FLUX_Image_Edit)")


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
    blocks = validation.index_list("blocks", blocks, what="block indices")
    try:
        return inject, [probe.family.check_block(b) for b in blocks]
    except IndexError as error:
        raise validation.InvalidInput(str(error)) from None


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
    height, width = inputs["height"], inputs["width"]
    if image is not None:
        clean = _encode(probe, as_image(image, (width, height)), height, width)
        latents = invert_latents(probe, clean, source, method=defaults.solver,
                                 **{**generation, "guidance": inversion_guidance})
    if latents is not None:
        shape = tuple(inputs["latents"].shape[1:])
        validation.latents(latents, ((1, *shape), shape), "one prompt at these sizes (the edit repeats it)")
        inputs["latents"] = latents.to(inputs["latents"]).expand_as(inputs["latents"]).clone()

    sharing = {"on": False}

    def share(module, args, v):  # the target's rows (both CFG halves) take the source's values
        return source_and_target(v) if sharing["on"] else None

    velocity, sigmas = sampler_velocity(probe, inputs)
    handles = [probe.module(f"blocks.{b}.attn.hook_v_img").register_forward_hook(share) for b in blocks]
    try:
        x = solve(velocity, inputs["latents"].to(velocity.device, velocity.dtype), sigmas, defaults.solver,
                  before_step=lambda step: sharing.update(on=step < inject))
    finally:
        for handle in handles:
            handle.remove()
    images = x if output_type == "latent" else decode(probe, x, height, width)
    params = {"method": defaults.name, "source": source, "target": target, "seed": int(seed),
              "solver": defaults.solver, "inject_steps": list(range(inject)), "blocks": blocks, "steps": n_steps,
              "guidance": inputs["guidance_scale"], "defaults": asdict(defaults),
              "inversion_guidance": inversion_guidance if image is not None else None}
    return EditResult(images[0], images[1], [], None, params, inputs)


def rf_solver_edit(probe, source: str, target: str, *, image=None, seed: int = 0, inject: int | None = None,
                   blocks: list[int] | None = None, latents: torch.Tensor | None = None,
                   inversion_guidance: float | None = None, **generation: Any) -> EditResult:
    """RF-Solver-Edit: source and target sampled with RF-Solver, the source's image values shared in the
    later blocks for the first steps (defaults: `RF_SOLVER_EDIT`). With `image`, edits a real image."""
    return share_values(probe, source, target, RF_SOLVER_EDIT, image=image, seed=seed, inject=inject, blocks=blocks,
                        latents=latents, inversion_guidance=inversion_guidance, **generation)


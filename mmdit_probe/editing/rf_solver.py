"""RF-Solver and RF-Solver-Edit (Wang et al., 2024, "Taming Rectified Flow for Inversion and Editing").

The sampler: a second-order Taylor step of the rectified-flow ODE dx/dσ = v(x, σ). The derivative of
the velocity along the path is estimated by a finite difference over half a step,

    v0 = v(x, σ),   v½ = v(x + h/2 v0, σ + h/2),   x_next = x + h v0 + ½ h² (v½ - v0) / (h/2),

two model calls per step (h = σ_next - σ: negative when sampling, positive when inverting; the same
step runs both ways: `sampling.steps.RFSolver`). `invert(method="rf-solver")` inverts with it and
`sample_latents` regenerates. Algebraically the step is the explicit midpoint rule, x + h v½; it is
kept in the paper's form.

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

from typing import Any

import torch

# RFSolver moved to sampling.steps, the value sharing to .value_sharing; these aliases stay one release.
from ..sampling.steps import RFSolver  # noqa: F401
from .base import EditResult
from .value_sharing import ValueSharing, check_sharing, share_values  # noqa: F401

# RF-Solver-Edit's README and scripts: FLUX.1-dev, 25-30 steps, guidance 2, `--inject` 2 to 8 (its
# scripts use 3 of 25), V of single-stream blocks 20-37.
RF_SOLVER_EDIT = ValueSharing("RF-Solver-Edit", "rf-solver", paper_steps=25, paper_inject=3, paper_guidance=2.0,
                              first_single=20, source="github.com/wangjiangshan0725/RF-Solver-Edit (FLUX_Image_Edit)")


def rf_solver_edit(probe, source: str, target: str, *, image=None, seed: int = 0, inject: int | None = None,
                   blocks: list[int] | None = None, latents: torch.Tensor | None = None,
                   inversion_guidance: float | None = None, **generation: Any) -> EditResult:
    """RF-Solver-Edit: source and target sampled with RF-Solver, the source's image values shared in the
    later blocks for the first steps (defaults: `RF_SOLVER_EDIT`). With `image`, edits a real image."""
    return share_values(probe, source, target, RF_SOLVER_EDIT, image=image, seed=seed, inject=inject, blocks=blocks,
                        latents=latents, inversion_guidance=inversion_guidance, **generation)


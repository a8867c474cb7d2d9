"""Real-image inversion: moved to `mmdit_probe.sampling` (`sampling.inversion`, with its plumbing in
`sampling.images`, `.velocity`, `.steps` and `.solve`); these aliases stay one release."""

# ruff: noqa: F401
from ..sampling.images import as_image, decode, pixel_error
from ..sampling.images import encode as _encode
from ..sampling.inversion import METHODS, SOLVERS, Inversion, _check_prompt, check_inversion, invert, invert_latents
from ..sampling.solve import sample_latents, solve
from ..sampling.steps import solver
from ..sampling.velocity import (
    PIPELINE_ONLY,
    _Captured,
    _transformer_call,
    _Velocity,
    check_own_sampler,
    sampler_velocity,
)

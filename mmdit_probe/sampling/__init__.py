"""Generation plumbing shared by inversion, the editors and image maps: the sampler's ODE outside the pipeline.

- `images`: a real image checked and sized (`as_image`), VAE `encode` / `decode`, `pixel_error`;
- `velocity`: the pipeline's own transformer call as the velocity field (`sampler_velocity`);
- `steps`: one ODE step per method (Euler, Heun, fixed-point, RF-Solver, FireFlow; `solver(method)`);
- `solve`: integrating over a σ grid, either way (`solve`, `sample_latents`);
- `inversion`: the initial noise that regenerates a real image (`invert`, `invert_latents`).

>>> from mmdit_probe.sampling import invert, sampler_velocity, solve
"""

from .._lazy import lazy

# Each name from its module, imported on first use: `sampling.windows` (the sweep's step windows) imports
# without torch.
_LAZY = {
    **dict.fromkeys(["as_image", "encode", "decode", "pixel_error"], ".images"),
    **dict.fromkeys(["PIPELINE_ONLY", "check_own_sampler", "sampler_velocity"], ".velocity"),
    **dict.fromkeys(["STEPS", "solver", "Euler", "Heun", "FixedPoint", "RFSolver", "FireFlow"], ".steps"),
    **dict.fromkeys(["solve", "sample_latents"], ".solve"),
    **dict.fromkeys(["METHODS", "SOLVERS", "Inversion", "check_inversion", "invert_latents", "invert"], ".inversion"),
}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy(__name__, _LAZY)

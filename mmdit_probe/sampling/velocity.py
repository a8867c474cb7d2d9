"""The sampler's velocity field dx/dσ, as a function of the latents: the pipeline's own transformer call (same text
embeddings, guidance, ids), captured from the pipeline itself, so one code path serves every family."""

from __future__ import annotations

from contextlib import suppress

import torch

from .. import validation

# Pipeline arguments that the paths integrating the ODE themselves (through `sampler_velocity`: inversion, the
# solvers' edits, FlowEdit, image maps by noising) cannot honour: they call the transformer, not the pipeline's
# sampling loop, so step callbacks never run and the pipeline's own outputs are never made.
PIPELINE_ONLY = ("callback_on_step_end", "callback_on_step_end_tensor_inputs", "return_dict")


class _Captured(Exception):
    """Raised from a hook to stop the pipeline once its transformer call is known."""


def check_own_sampler(generation: dict, also: tuple[str, ...] = ()) -> None:
    """Refuse generation keywords that a path through `sampler_velocity` would ignore: `PIPELINE_ONLY`, the
    path's own `also`, and options adding transformer calls per step (the captured velocity is one call)."""
    for key in (*PIPELINE_ONLY, *also):
        if key in generation:
            raise validation.InvalidInput(f"{key}= would be ignored: this integrates the ODE with the transformer "
                                          f"itself, not through the pipeline's sampling loop; leave {key} out")
    validation.one_call_per_step(generation)


def _transformer_call(probe, inputs: dict) -> dict:
    """The keyword arguments of the pipeline's first transformer call (everything but the latents)."""
    captured: dict = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    # The hook's handle removes it on leaving the `with`.
    with probe.pipeline.transformer.register_forward_pre_hook(grab, with_kwargs=True), suppress(_Captured):
        probe.pipeline(**inputs)
    return captured


class _Velocity:
    """dx/dσ as the sampler computes it: the pipeline's transformer call, with its guidance."""

    def __init__(self, probe, inputs: dict) -> None:
        probe.family.check_one_call_per_step(inputs)  # one captured call is the whole velocity only then
        self.transformer = probe.pipeline.transformer
        self.family = probe.family
        self.call = _transformer_call(probe, inputs)
        scheduler = probe.pipeline.scheduler
        # Flux feeds σ, SD3 feeds 1000 σ: read the convention off the captured call.
        self.timestep_scale = float(self.call["timestep"].flatten()[0]) / float(scheduler.timesteps[0])
        self.doubled = self.call["hidden_states"].shape[0] == 2 * len(inputs["prompt"])  # [uncond | cond]
        self.guidance: float | torch.Tensor = inputs["guidance_scale"]  # a tensor gives each row its own
        self.device, self.dtype = self.call["hidden_states"].device, self.call["hidden_states"].dtype

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        batch = self.family.transformer_input(torch.cat([x, x]) if self.doubled else x)
        # Tokens the pipeline appends to the latents' (Kontext's context image) stay as captured; the velocity is
        # the latents' rows of the output, as the pipeline slices it.
        n = batch.shape[1] if batch.ndim == 3 else None
        if n is not None and self.call["hidden_states"].shape[1] > n:
            batch = torch.cat([batch, self.call["hidden_states"][:, n:]], dim=1)
        t = torch.full((batch.shape[0],), sigma * 1000 * self.timestep_scale, dtype=self.call["timestep"].dtype,
                       device=x.device)
        v = self.transformer(**{**self.call, "hidden_states": batch, "timestep": t})[0]
        v = self.family.transformer_output(v if n is None else v[:, :n], x)
        if self.doubled:
            uncond, cond = v.chunk(2)
            v = uncond + self.guidance * (cond - uncond)
        return v


def sampler_velocity(probe, inputs: dict) -> tuple[_Velocity, torch.Tensor]:
    """The pipeline's velocity field for these inputs (one row per prompt) and its σ grid (1 -> 0)."""
    velocity = _Velocity(probe, inputs)
    return velocity, probe.pipeline.scheduler.sigmas.to(torch.float64)

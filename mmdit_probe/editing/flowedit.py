"""FlowEdit (Kulikov et al., 2024): inversion-free editing, the baseline for real-image edits.

Instead of inverting, FlowEdit moves the clean source latent along the difference between the
target- and source-conditioned velocities, evaluated on matched noisy versions of both:

    z_src(σ) = (1 - σ) x_src + σ ε,   z_tar(σ) = z_edit + z_src(σ) - x_src,
    z_edit  += (σ_next - σ) * (v(z_tar, σ | target) - v(z_src, σ | source))

starting at an intermediate noise level (the first `skip` of the steps are skipped), with fresh
noise ε each step.

>>> edited = flowedit(probe, image, "a red circle ...", "a blue circle ...")
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .. import validation
from ..sampling.images import as_image, decode, encode
from ..sampling.velocity import check_own_sampler, sampler_velocity


@torch.no_grad()
def flowedit(probe, image, source: str, target: str, *, skip: float = 0.33, source_guidance: float | None = None,
             target_guidance: float | None = None, seed: int = 0, **generation: Any) -> Image.Image:
    """Edit a real image from `source` to `target` without inversion; returns the edited image (PIL).

    generation: steps, guidance, height, width, max_sequence_length. FlowEdit calls the transformer itself, so
    the pipeline's step callbacks and output options are refused rather than ignored.
    """
    validation.edit_prompts(source, target)
    check_own_sampler(generation, also=("output_type", "latents"))
    skip = validation.fraction("skip", skip, " (the share of the steps FlowEdit skips)")
    for name, value in (("source_guidance", source_guidance), ("target_guidance", target_guidance)):
        if value is not None:
            validation.number(name, value, low=0.0)
    inputs = probe.inputs([source, target], seed=seed, **generation)
    image = as_image(image, (inputs["width"], inputs["height"]))
    velocity, sigmas = sampler_velocity(probe, inputs)
    clean = encode(probe, image, inputs["height"], inputs["width"]).to(velocity.device, velocity.dtype)
    scales = [inputs["guidance_scale"] if value is None else value for value in (source_guidance, target_guidance)]
    velocity.guidance = torch.tensor(scales, device=clean.device, dtype=clean.dtype).view(-1, *([1] * (clean.ndim - 1)))
    generator = torch.Generator("cpu").manual_seed(seed)
    edited = clean.clone()
    first = int(round(skip * (len(sigmas) - 1)))
    for i in range(first, len(sigmas) - 1):
        sigma, following = float(sigmas[i]), float(sigmas[i + 1])
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        noisy_source = (1 - sigma) * clean + sigma * noise
        noisy_target = edited + noisy_source - clean
        v = velocity(torch.cat([noisy_source, noisy_target]), sigma)
        edited = edited + (following - sigma) * (v[1:] - v[:1])
    return decode(probe, edited, inputs["height"], inputs["width"])[0]

"""Concept, T2I and I2T maps of a real image, by two routes.

- ``method="noise"`` (ConceptAttention's route): encode the image, add the seed's noise up to `sigma`
  (x = (1 - sigma) x0 + sigma noise, the rectified-flow path), run the transformer once at that
  sigma with the prompt (and guidance, as the sampler would), and read that one call's maps.
- ``method="inversion"`` (ours): invert the image to the initial noise that regenerates it
  (`Probe.invert`), then generate from it while recording: maps of every step, on a run whose
  result is (close to) the image itself.

>>> maps = image_maps(probe, image, "a red circle on a white background", ["circle", "background"])
>>> maps.concept("circle")
"""

from __future__ import annotations

from typing import Any

import torch

from . import validation
from .attention import AttentionRecorder
from .concepts import check_concepts
from .constants import IMAGE_MAP_METHODS as METHODS
from .maps import AttentionMaps
from .names import tap
from .sampling.images import as_image, encode
from .sampling.velocity import check_own_sampler, sampler_velocity


def check_sigma(method: str, sigma: float | None) -> float | None:
    """The noise level of method="noise" (default 0.5, in (0, 1]); "inversion" has none, and refuses one given."""
    if method == "inversion":
        if sigma is not None:
            raise validation.InvalidInput(f"sigma={sigma!r} is the noise level of method='noise'; method='inversion' "
                                          f"regenerates the image from its inverted noise and takes no sigma")
        return None
    sigma = 0.5 if sigma is None else validation.number("sigma", sigma, low=0.0)
    if not 0 < sigma <= 1:
        raise validation.InvalidInput(f"sigma={sigma} is not allowed: the noise level is in (0, 1] (1: pure noise)")
    return sigma


def image_maps(probe, image, prompt: str, concepts, *, method: str = "noise", sigma: float | None = None,
               seed: int = 0, record: dict | None = None, inversion: dict | None = None,
               **generation: Any) -> AttentionMaps:
    """Maps of a real image (PIL or uint8 array) with `prompt` (may be "") and `concepts`.

    method: "noise" (ConceptAttention's: one forward at `sigma` in (0, 1], default 0.5) or "inversion" (ours,
    which takes no `sigma`).
    record: `AttentionRecorder` options (blocks, rows, dtype, ...); "noise" records its one call as step 0.
    inversion: options for `Probe.invert` (method, iterations). `generation`: steps, guidance, height,
    width, max_sequence_length, as for `Probe.generate`.
    """
    validation.choice("method", method, METHODS)
    validation.prompt("prompt", prompt, message="{name}={value!r} is not allowed: give the image's caption (str), "
                      "or ''")
    check_concepts(concepts, 1)  # before the inversion or the text encoders run
    record = dict(record or {})
    for key in ("concepts", "steps"):
        if key in record:
            raise validation.InvalidInput(f"record[{key!r}] is set by image_maps; pass {key} otherwise")
    sigma = check_sigma(method, sigma)
    if method == "inversion":
        inverted = probe.invert(image, prompt, **(inversion or {}), **generation)
        return probe.generate(prompt, seed=seed, latents=inverted.latents, record=record or True, concepts=concepts,
                              **generation).maps
    if inversion:
        raise validation.InvalidInput("inversion= options are for method='inversion'")
    check_own_sampler(generation, also=("output_type",))
    inputs = probe.inputs([prompt], seed=seed, **generation)
    height, width = inputs["height"], inputs["width"]
    image = as_image(image, (width, height))  # checked before the first model call
    velocity, _ = sampler_velocity(probe, inputs)  # the pipeline's own transformer call, captured
    recorder = AttentionRecorder(probe, inputs, steps=[0], concepts=concepts, **record)
    taps: dict = {}
    handles = [probe.module(tap(b, name)).register_forward_hook(
        lambda m, i, out, key=(b, name): taps.__setitem__(key, out))
        for b in recorder.blocks for name in AttentionRecorder.TAPS]
    try:
        clean = encode(probe, image, height, width)
        x = (1 - sigma) * clean + sigma * inputs["latents"].to(clean)
        with torch.no_grad():
            velocity(x, sigma)
        for b in recorder.blocks:
            recorder.record_block(0, b, **{name: taps[(b, name)] for name in AttentionRecorder.TAPS})
    finally:
        for handle in handles:
            handle.remove()
        recorder.close()
    maps = recorder.maps()
    maps.images = [image]
    return maps

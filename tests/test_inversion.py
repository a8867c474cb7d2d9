"""Inversion recovers the initial noise of a generated latent; images are checked and edited."""

import numpy as np
import pytest
import torch
from conftest import tiny_inputs
from PIL import Image

from mmdit_probe.editing.inversion import METHODS, invert_latents
from mmdit_probe.validation import InvalidInput

PROMPT = "a red cat on a mat"


def generation(kind, steps=4):
    from mmdit_probe.testing import TINY_GENERATION_KWARGS

    kw = TINY_GENERATION_KWARGS[kind]
    return {"steps": steps, "guidance": kw["guidance_scale"], "height": kw["height"], "width": kw["width"],
            "max_sequence_length": kw["max_sequence_length"]}


def test_inversion_recovers_the_initial_noise(probe, kind):
    inputs = tiny_inputs(probe, kind, PROMPT, num_inference_steps=4)
    noise = inputs["latents"]
    clean = probe.pipeline(**inputs).images
    clean = probe.family.pack_latents(clean) if clean.ndim == 4 and kind.startswith("flux") else clean
    clean = probe.family.transformer_output(clean, noise)  # Flux.2 dev's latent output is packed, its noise a grid
    # Flux.2's schedule (its empirical mu) ends on a long step (sigma 0.7 -> 0 at 4 steps), so its fixed point
    # contracts more slowly per iteration; tests/test_flux2.py checks it converges to float rounding.
    iterations = 6 if kind.startswith("flux2") else 3
    errors = {m: ((invert_latents(probe, clean, PROMPT, method=m, iterations=iterations, **generation(kind)) - noise)
                  .abs().mean() / noise.abs().mean()).item() for m in METHODS}
    # The fixed point inverts the sampler's own Euler steps: near exact even with 4 steps.
    assert errors["fixed-point"] < 1e-2 < errors["heun"] < errors["euler"]


def test_invert_an_image_and_regenerate_it(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    image = probe.generate(PROMPT, **generation("sd3")).images[0]
    inverted = probe.invert(image, PROMPT, **generation("sd3"))
    assert inverted.latents.shape == (1, 16, 8, 8) and inverted.method == "fixed-point"
    assert inverted.error is not None and inverted.reconstruction.size == image.size
    result = probe.edit_image(image, PROMPT, "a blue cat on a mat", **generation("sd3"))
    assert result.params["inversion"] == "fixed-point" and result.edited_image.size == image.size


def test_bad_images_and_prompts_are_refused_or_fixed(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    with pytest.raises(ValueError, match="needs the prompt"):
        probe.invert(Image.new("RGB", (64, 64)), "", **generation("sd3"))
    with pytest.raises(InvalidInput, match="expected a PIL image"):
        probe.invert("photo.png", PROMPT, **generation("sd3"))
    with pytest.raises(ValueError, match="unknown inversion method"):
        probe.invert(Image.new("RGB", (64, 64)), PROMPT, method="ddim", **generation("sd3"))
    grey = Image.fromarray(np.zeros((40, 50), dtype=np.uint8))
    with pytest.warns(UserWarning) as caught:
        inverted = probe.invert(grey, PROMPT, check=False, **generation("sd3"))
    messages = " ".join(str(w.message) for w in caught)
    assert "converting a L image to RGB" in messages and "resizing the image from (50, 40) to (64, 64)" in messages
    assert torch.isfinite(inverted.latents).all()


def test_flowedit_with_an_unchanged_prompt_returns_the_source(tiny_dirs):
    import mmdit_probe
    from mmdit_probe.editing.flowedit import flowedit
    from mmdit_probe.editing.inversion import _encode, decode

    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    image = probe.generate(PROMPT, **generation("flux-dev")).images[0]
    unchanged = flowedit(probe, image, PROMPT, PROMPT, **generation("flux-dev"))
    roundtrip = decode(probe, _encode(probe, image, 64, 64), 64, 64)[0]
    # z_edit + (z_src - x_src) equals z_src only up to float rounding, so the source comes back
    # up to rounding too: at most one grey level anywhere.
    difference = np.abs(np.asarray(unchanged, dtype=int) - np.asarray(roundtrip, dtype=int))
    assert difference.max() <= 1
    edited = flowedit(probe, image, PROMPT, "a blue dog on a mat", **generation("flux-dev"))
    assert np.abs(np.asarray(edited, dtype=int) - np.asarray(roundtrip, dtype=int)).max() > 10

"""Stable Flow, vital-layer detection and KV-Edit on every tiny family: exact limits, and each method checked
against the same intervention written by hand with plain torch hooks (no nnsight, no patching helpers)."""

import numpy as np
import pytest
import torch
from conftest import tiny_inputs
from torch import nn

import mmdit_probe
from mmdit_probe.editing import kv_edit, stable_flow, vital_layers
from mmdit_probe.editing.vital_layers import VitalLayers, bypassed, dino_features, judge_change
from mmdit_probe.validation import InvalidInput

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"


def generation(probe, kind, **overrides):
    kw = tiny_inputs(probe, kind, [SOURCE, TARGET])
    return {"steps": kw["num_inference_steps"], "guidance": kw["guidance_scale"], "height": kw["height"],
            "width": kw["width"], "max_sequence_length": kw["max_sequence_length"], "output_type": "latent",
            **overrides}


def plain(probe, inputs):
    """The pipeline on an edit's inputs without its callbacks: both prompts, the same batch layout."""
    return probe.pipeline(**{k: v for k, v in inputs.items() if not k.startswith("callback")}).images


def source_into_target(x, positions=None):
    """By hand: the target's rows (1, and 3 under guidance) take the source's (0, and 2), at `positions`."""
    x = x.clone()
    pairs = [(0, 1)] if x.shape[0] == 2 else [(0, 1), (2, 3)]
    for s, t in pairs:
        if positions is None:
            x[t] = x[s]
        else:
            x[t, :, positions] = x[s, :, positions]
    return x


def run_with_hooks(probe, inputs, taps, positions=None, callback=None):
    """The pipeline with plain torch forward hooks on the named taps (and an optional step callback)."""
    handles = [probe.module(name).register_forward_hook(lambda m, a, out: source_into_target(out, positions))
               for name in taps]
    args = {k: v for k, v in inputs.items() if not k.startswith("callback")}
    if callback is not None:
        args.update(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    try:
        return probe.pipeline(**args).images
    finally:
        for handle in handles:
            handle.remove()


# -- Stable Flow ----------------------------------------------------------------------------------------

def test_stable_flow_without_layers_is_the_plain_generation(probe, kind):
    result = stable_flow(probe, SOURCE, TARGET, layers=[], **generation(probe, kind))
    images = plain(probe, result.inputs)
    assert torch.equal(result.source_image, images[0]) and torch.equal(result.edited_image, images[1])
    assert result.params["layers"] == [] and result.masks == []


def test_stable_flow_with_one_prompt_reproduces_the_source(probe, kind):
    every = list(range(probe.family.num_blocks))
    result = stable_flow(probe, SOURCE, SOURCE, layers=every, **generation(probe, kind))
    assert torch.equal(result.edited_image, result.source_image)


def test_stable_flow_equals_hand_hooked_key_value_injection(probe, kind):
    layers = [0, probe.family.num_blocks - 1]  # Flux: a double- and a single-stream block
    result = stable_flow(probe, SOURCE, TARGET, layers=layers, **generation(probe, kind))
    taps = [f"blocks.{b}.attn.hook_{t}_img" for b in layers for t in ("k", "v")]
    expected = run_with_hooks(probe, result.inputs, taps)
    assert torch.equal(result.source_image, expected[0]) and torch.equal(result.edited_image, expected[1])
    assert not torch.equal(result.edited_image, plain(probe, result.inputs)[1])


def test_stable_flow_of_a_real_image_starts_from_its_inversion(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    gen = generation(probe, "flux-dev")
    image = (np.random.default_rng(0).random((gen["height"], gen["width"], 3)) * 255).astype(np.uint8)
    result = stable_flow(probe, SOURCE, TARGET, layers=[], image=image, **gen)
    sizes = {k: gen[k] for k in ("steps", "guidance", "height", "width", "max_sequence_length")}
    noise = probe.invert(image, SOURCE, check=False, **sizes).latents
    assert torch.equal(result.inputs["latents"][0], noise[0]) and torch.equal(result.inputs["latents"][1], noise[0])
    assert torch.equal(result.source_image, plain(probe, result.inputs)[0])
    assert result.params["inversion"] == "fixed-point"


def test_stable_flow_takes_a_vital_layers_result(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    found = VitalLayers({"pixel": np.array([0.1, 0.4, 0.2, 0.3])}, {}, ["a", "b", "c", "d"], "pixel", 2, ["x"])
    assert list(found) == [1, 3] and found.ranking == [1, 3, 2, 0] and found.top(3) == [1, 3, 2]
    result = stable_flow(probe, SOURCE, TARGET, layers=found, **generation(probe, "flux-dev"))
    assert result.params["layers"] == [1, 3]


def test_stable_flow_refuses_bad_input(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    gen = generation(probe, "sd3")
    with pytest.raises(InvalidInput, match="no published vital layers.*probe.vital_layers"):
        stable_flow(probe, SOURCE, TARGET, **gen)
    with pytest.raises(InvalidInput, match="block 7 is out of range"):
        stable_flow(probe, SOURCE, TARGET, layers=[0, 7], **gen)
    with pytest.raises(InvalidInput, match="block -1 is out of range"):
        stable_flow(probe, SOURCE, TARGET, layers=[-1], **gen)
    with pytest.raises(InvalidInput, match="layers='01'"):
        stable_flow(probe, SOURCE, TARGET, layers="01", **gen)
    with pytest.raises(InvalidInput, match="target prompt"):
        stable_flow(probe, SOURCE, "  ", layers=[0], **gen)
    with pytest.raises(InvalidInput, match="unknown inversion method"):
        stable_flow(probe, SOURCE, TARGET, layers=[0], image=np.zeros((64, 64, 3), np.uint8), inversion="ddim", **gen)


def test_the_published_flux_layers_are_the_papers():
    from mmdit_probe.editing.stable_flow import PUBLISHED_LAYERS

    double, single = [0, 1, 17, 18], [6, 9, 34, 35, 37]  # Stable Flow's code: 19 double, 38 single blocks
    assert list(PUBLISHED_LAYERS["flux.1-dev"]) == double + [19 + s for s in single]


# -- vital layers ---------------------------------------------------------------------------------------

class _Removed(nn.Module):
    """A block that is not there: hands on its inputs (as the transformer's loop unpacks them)."""

    def forward(self, hidden_states, encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is None:  # Chroma's and Flux.2's single-stream blocks: one joint sequence in and out
            return hidden_states
        return encoder_hidden_states, hidden_states


def without_block(probe, block, inputs):
    """A run with block `block` replaced by `_Removed` in the transformer's module list."""
    parent, index = probe.family.block_path(block).rsplit(".", 1)
    blocks = probe.pipeline.transformer.get_submodule(parent)
    kept = blocks[int(index)]
    blocks[int(index)] = _Removed()
    try:
        return probe.pipeline(**inputs).images
    finally:
        blocks[int(index)] = kept


def test_bypassing_a_block_equals_removing_it(probe, kind):
    inputs = tiny_inputs(probe, kind, [SOURCE])
    full = probe.pipeline(**inputs).images
    for block in range(probe.family.num_blocks):
        with bypassed(probe, [block]):
            skipped = probe.pipeline(**inputs).images
        assert torch.equal(skipped, without_block(probe, block, inputs)), block
        assert not torch.equal(skipped, full), block
    assert torch.equal(probe.pipeline(**inputs).images, full)  # the hooks are gone


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_vital_layers_scores_are_the_pixel_changes_of_removed_blocks(tiny_dirs, kind):
    probe = mmdit_probe.load(tiny_dirs[kind])
    gen = {k: v for k, v in generation(probe, kind).items() if k != "output_type"}
    prompts = [SOURCE, "a green bird"]
    found = vital_layers(probe, prompts, measures=["pixel"], keep=2, progress=False, **gen)
    inputs = probe.inputs(prompts, seed=0, **gen)
    reference = probe.pipeline(**inputs).images
    for block in range(probe.family.num_blocks):
        images = without_block(probe, block, inputs)
        by_hand = [np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(reference, images)]
        np.testing.assert_allclose(found.per_prompt["pixel"][block], by_hand, rtol=0, atol=1e-12)
    assert found.ranking == sorted(range(probe.family.num_blocks), key=lambda b: (-found.scores["pixel"][b], b))
    again = vital_layers(probe, prompts, measures=["pixel"], keep=2, progress=False, **gen)
    assert again.ranking == found.ranking and np.array_equal(again.scores["pixel"], found.scores["pixel"])
    assert list(found) == sorted(found.ranking[:2])
    assert len(found.figure().data[0].x) == probe.family.num_blocks == len(found.labels)


def tiny_dino():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32)
    return Dinov2Model(config).eval()


def test_dino_measure_with_a_tiny_dinov2(tiny_dirs):
    from PIL import Image

    model = tiny_dino()
    rng = np.random.default_rng(0)
    a, b = (Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(2))
    features = dino_features(model, [a, a, b], size=32)
    assert torch.equal(features[0], features[1]) and not torch.equal(features[0], features[2])

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    gen = {k: v for k, v in generation(probe, "sd3").items() if k != "output_type"}
    found = vital_layers(probe, [SOURCE], measures=["dino", "pixel"], dino=model, progress=False, **gen)
    reference = probe.pipeline(**probe.inputs([SOURCE], seed=0, **gen)).images
    for block in range(probe.family.num_blocks):
        with bypassed(probe, [block]):
            image = probe.pipeline(**probe.inputs([SOURCE], seed=0, **gen)).images
        pair = dino_features(model, reference + image)
        expected = 1 - torch.nn.functional.cosine_similarity(pair[:1], pair[1:]).item()
        assert found.scores["dino"][block] == pytest.approx(expected, abs=1e-6)
    assert found.rank_by == "dino" and set(found.scores) == {"dino", "pixel"}


def test_judge_change_counts_objects_and_background():
    from mmdit_probe.toy.world import Scene, Shape, render

    left = Shape(shape="circle", colour="red", size="large", position="left")
    right = Shape(shape="square", colour="blue", size="small", position="right")
    scene = Scene((left, right), "white")
    recoloured = Scene((left, Shape(shape="square", colour="green", size="small", position="right")), "white")
    image = render(scene)[0]
    assert judge_change(image, image) == 0.0
    assert judge_change(image, render(recoloured)[0]) == pytest.approx(1 / 3)  # 2 objects + background, 1 changed
    assert judge_change(image, render(Scene((left, right), "black"))[0]) == pytest.approx(1 / 3)


def test_vital_layers_on_the_toy_with_the_judge():
    probe = mmdit_probe.load("toy")
    found = vital_layers(probe, ["on the left a large red circle on a white background"], measures=["judge", "pixel"],
                         steps=4, progress=False)
    assert found.scores["judge"].shape == (probe.family.num_blocks,)
    assert ((found.scores["judge"] >= 0) & (found.scores["judge"] <= 1)).all()
    assert found.keep == 1 and found.labels[0] == "block 0"
    by_default = stable_flow(probe, "on the left a large red circle on a white background",
                             "on the left a large green circle on a white background", steps=4, output_type="latent")
    assert by_default.params["layers"] == [3]  # MEASURED_LAYERS["toy"], reports/toy_vital_layers


def test_vital_layers_refuses_bad_input(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    with pytest.raises(InvalidInput, match="empty"):
        vital_layers(probe, [""])
    with pytest.raises(InvalidInput, match="prompts"):
        vital_layers(probe, [])
    with pytest.raises(InvalidInput, match="choose one or more of"):
        vital_layers(probe, [SOURCE], measures=["lpips"])
    with pytest.raises(InvalidInput, match="needs dino="):
        vital_layers(probe, [SOURCE], measures=["dino"])
    with pytest.raises(InvalidInput, match="local directory"):
        vital_layers(probe, [SOURCE], dino="facebook/dinov2-base", height=64, width=64)
    with pytest.raises(InvalidInput, match="keep=9 is more than"):
        vital_layers(probe, [SOURCE], keep=9)
    with pytest.raises(InvalidInput, match="Shapes-world images of 32x32"):
        vital_layers(probe, [SOURCE], measures=["judge"], height=64, width=64)
    with pytest.raises(InvalidInput, match="output_type"):
        vital_layers(probe, [SOURCE], output_type="latent")


# -- KV-Edit --------------------------------------------------------------------------------------------

def corner_mask(probe, kind):
    gen = generation(probe, kind)
    mask = np.zeros(probe.grid(gen["height"], gen["width"]))
    mask[:2, :2] = 1
    return mask


def test_kv_edit_with_a_zero_mask_gives_the_source(probe, kind):
    gen = generation(probe, kind)
    result = kv_edit(probe, SOURCE, TARGET, mask=np.zeros(probe.grid(gen["height"], gen["width"])), **gen)
    assert torch.equal(result.edited_image, result.source_image)
    assert torch.equal(result.source_image, plain(probe, result.inputs)[0])


def test_kv_edit_with_a_full_mask_gives_the_plain_target(probe, kind):
    gen = generation(probe, kind)
    result = kv_edit(probe, SOURCE, TARGET, mask=np.ones(probe.grid(gen["height"], gen["width"])), **gen)
    images = plain(probe, result.inputs)
    assert torch.equal(result.source_image, images[0]) and torch.equal(result.edited_image, images[1])


def test_kv_edit_equals_hand_hooked_background_keys_and_values(probe, kind):
    mask = corner_mask(probe, kind)
    result = kv_edit(probe, SOURCE, TARGET, mask=mask, **generation(probe, kind))
    background = torch.tensor(np.flatnonzero(mask.flatten() == 0))
    taps = [f"blocks.{a.block}.{a.name}.hook_{t}_img" for a in probe.family.attentions for t in ("k", "v")]
    mask_tensor = torch.tensor(mask, dtype=torch.float32)
    keep = probe.family.mask_to_latents(mask_tensor, result.source_image.shape) == 0

    def paste_background(pipeline, step, timestep, tensors):
        latents = tensors["latents"].clone()
        # The sampler's latents (Flux.2 Klein's latent output is the VAE's, not the sampler's).
        kept = probe.family.mask_to_latents(mask_tensor, latents.shape[1:]) == 0
        latents[1] = torch.where(kept, latents[0], latents[1])
        return {"latents": latents}

    expected = run_with_hooks(probe, result.inputs, taps, background, paste_background)
    assert torch.equal(result.source_image, expected[0]) and torch.equal(result.edited_image, expected[1])
    assert torch.equal(result.edited_image[keep.expand_as(result.edited_image)],
                       result.source_image[keep.expand_as(result.source_image)])
    assert not torch.equal(result.edited_image, result.source_image)
    assert np.array_equal(result.masks[0], mask)


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_kv_edit_foreground_never_reads_the_targets_own_background(tiny_dirs, kind, monkeypatch):
    # The paper runs only foreground queries; ours runs all, so the target's background must not leak.
    probe = mmdit_probe.load(tiny_dirs[kind])
    mask = corner_mask(probe, kind)
    gen = generation(probe, kind)
    first = kv_edit(probe, SOURCE, TARGET, mask=mask, **gen)
    inputs = probe.inputs

    def scrambled_background(prompts, **kwargs):
        args = inputs(prompts, **kwargs)
        noise = torch.randn(args["latents"][1].shape, generator=torch.Generator().manual_seed(5))
        keep = probe.family.mask_to_latents(torch.tensor(mask, dtype=torch.float32), noise.shape) == 0
        args["latents"][1] = torch.where(keep, noise, args["latents"][1])
        return args

    monkeypatch.setattr(probe, "inputs", scrambled_background)
    second = kv_edit(probe, SOURCE, TARGET, mask=mask, **gen)
    assert not torch.equal(first.inputs["latents"], second.inputs["latents"])
    assert torch.equal(first.edited_image, second.edited_image)


def test_kv_edit_pools_pixel_masks_and_masks_from_words(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    gen = generation(probe, "sd3")
    pixels = np.zeros((gen["height"], gen["width"]))
    pixels[17, 40] = 1  # one pixel: its token (16 pixels a side) becomes foreground
    result = kv_edit(probe, SOURCE, TARGET, mask=pixels, **gen)
    expected = np.zeros(probe.grid(gen["height"], gen["width"]))
    expected[17 // 16, 40 // 16] = 1
    assert np.array_equal(result.masks[0], expected)

    from_words = kv_edit(probe, SOURCE, TARGET, **gen)
    assert from_words.params["source_words"] == ["red", "cat"] and from_words.params["target_words"] == ["blue", "dog"]
    assert from_words.masks[0].shape == expected.shape and set(np.unique(from_words.masks[0])) <= {0.0, 1.0}
    with pytest.raises(InvalidInput, match="differ in no word"):
        kv_edit(probe, SOURCE, SOURCE, **gen)


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_kv_edit_of_a_real_image_keeps_its_encoded_background(tiny_dirs, kind):
    from mmdit_probe.editing.base import _encoded
    from mmdit_probe.editing.inversion import invert_latents

    probe = mmdit_probe.load(tiny_dirs[kind])
    gen = generation(probe, kind)
    image = (np.random.default_rng(0).random((gen["height"], gen["width"], 3)) * 255).astype(np.uint8)
    zero = np.zeros(probe.grid(gen["height"], gen["width"]))
    result = kv_edit(probe, SOURCE, TARGET, mask=zero, image=image, **gen)
    clean = _encoded(probe, image, gen["height"], gen["width"])
    assert torch.equal(result.edited_image, clean[0].to(result.edited_image))
    sizes = {k: gen[k] for k in ("steps", "guidance", "height", "width", "max_sequence_length")}
    noise = invert_latents(probe, clean, SOURCE, **sizes)
    assert torch.equal(result.inputs["latents"][0], noise[0]) and torch.equal(result.inputs["latents"][1], noise[0])


def test_kv_edit_refuses_bad_masks_and_prompts(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    gen = generation(probe, "sd3")
    with pytest.raises(InvalidInput, match=r"fits neither the token grid \(4, 4\) nor the image \(64, 64\)"):
        kv_edit(probe, SOURCE, TARGET, mask=np.zeros((8, 8)), **gen)
    with pytest.raises(InvalidInput, match="NaN"):
        kv_edit(probe, SOURCE, TARGET, mask=np.full((4, 4), np.nan), **gen)
    with pytest.raises(InvalidInput, match="2-D array"):
        kv_edit(probe, SOURCE, TARGET, mask="everywhere", **gen)
    with pytest.raises(InvalidInput, match="source prompt"):
        kv_edit(probe, "", TARGET, mask=np.zeros((4, 4)), **gen)
    with pytest.raises(InvalidInput, match="do not pass it"):
        kv_edit(probe, SOURCE, TARGET, mask=np.zeros((4, 4)), latents=torch.zeros(1), **gen)
    with pytest.raises(InvalidInput, match=r"mask_blocks=\[0, 9\] is out of range"):
        kv_edit(probe, SOURCE, TARGET, mask_blocks=[0, 9], **gen)

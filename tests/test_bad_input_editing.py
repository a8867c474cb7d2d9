"""Bad input to the real-image, editing and patching entry points (issue 25): refused with `InvalidInput` before
any model call (text encoders, transformer or VAE), never a silent wrong result."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mmdit_probe
from mmdit_probe.editing import fireflow_edit, flowedit, kv_edit, rf_solver_edit, stable_flow, vital_layers
from mmdit_probe.editing.qk_injection import check_edit
from mmdit_probe.editing.vital_layers import VitalLayers
from mmdit_probe.patching import activation_patching
from mmdit_probe.testing import TINY_GENERATION_KWARGS
from mmdit_probe.validation import InvalidInput

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"
_KW = TINY_GENERATION_KWARGS["sd3"]
GENERATION = {"steps": _KW["num_inference_steps"], "guidance": _KW["guidance_scale"], "height": _KW["height"],
              "width": _KW["width"], "max_sequence_length": _KW["max_sequence_length"]}
IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.fixture(scope="module")
def sd3(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["sd3"])


class ModelCalls:
    """Counts forward calls of every model of the pipeline: text encoders, transformer, VAE encoder and decoder."""

    def __init__(self, probe):
        pipeline = probe.pipeline
        models = [m for m in pipeline.components.values() if isinstance(m, nn.Module) and m is not pipeline.vae]
        models += [pipeline.vae.encoder, pipeline.vae.decoder]
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._seen) for m in models]

    def _seen(self, module, args):
        self.count += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture
def calls(sd3):
    counter = ModelCalls(sd3)
    yield counter
    counter.remove()


def refused(calls, match, call, *args, **kwargs):
    with pytest.raises(InvalidInput, match=match):
        call(*args, **kwargs)
    assert calls.count == 0, f"a model ran {calls.count} times before the error"


# -- real images ---------------------------------------------------------------------------------------------
REAL_IMAGE_PATHS = {
    "invert": lambda p, image: p.invert(image, SOURCE, **GENERATION),
    "image_maps noise": lambda p, image: p.image_maps(image, SOURCE, ["cat", "mat"], **GENERATION),
    "image_maps inversion": lambda p, image: p.image_maps(image, SOURCE, ["cat", "mat"], method="inversion",
                                                          **GENERATION),
    "edit_image": lambda p, image: p.edit_image(image, SOURCE, TARGET, **GENERATION),
    "stable_flow": lambda p, image: stable_flow(p, SOURCE, TARGET, layers=[0], image=image, **GENERATION),
    "kv_edit": lambda p, image: kv_edit(p, SOURCE, TARGET, mask=np.zeros((4, 4)), image=image, **GENERATION),
    "rf_solver_edit": lambda p, image: rf_solver_edit(p, SOURCE, TARGET, image=image, **GENERATION),
    "fireflow_edit": lambda p, image: fireflow_edit(p, SOURCE, TARGET, image=image, **GENERATION),
    "flowedit": lambda p, image: flowedit(p, image, SOURCE, TARGET, **GENERATION),
}
BAD_IMAGES = {
    "empty PIL": (Image.new("RGB", (0, 0)), r"image is empty \(0x0 pixels\)"),
    "no rows": (Image.new("RGB", (64, 0)), r"image is empty \(64x0 pixels\)"),
    "empty array": (np.zeros((0, 0, 3), np.uint8), r"image is empty \(0x0 pixels\)"),
    "float image": (Image.fromarray(np.full((64, 64), 0.8, np.float32)), "mode 'F', .* convert it to 8-bit RGB"),
    "16-bit image": (Image.fromarray(np.full((64, 64), 40000, np.uint16)), "mode 'I;16', .* convert it to 8-bit RGB"),
    "channels first": (np.zeros((3, 64, 64), np.uint8), r"shape \(3, 64, 64\) .* channels-first.*transpose\(1, 2, 0\)"),
    "float array": (np.zeros((64, 64, 3), np.float32), "image arrays must be uint8 .* got float32"),
    "a path": ("photo.png", "expected a PIL image or a uint8 array"),
}


@pytest.mark.parametrize("path", list(REAL_IMAGE_PATHS))
@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_bad_real_images_are_refused_before_any_model_call(sd3, calls, path, bad):
    image, match = BAD_IMAGES[bad]
    refused(calls, match, REAL_IMAGE_PATHS[path], sd3, image)


def test_eight_bit_images_are_converted_as_before():
    from mmdit_probe.editing.inversion import as_image

    grey = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    with pytest.warns(UserWarning, match="converting a L image to RGB"):
        converted = as_image(grey, (64, 64))
    assert np.array_equal(np.asarray(converted), np.repeat(grey[..., None], 3, axis=2))
    rgba = np.dstack([np.full((8, 8, 3), 77, np.uint8), np.zeros((8, 8), np.uint8)])
    assert np.asarray(as_image(rgba, (8, 8), quiet=True)).max() == 77


# -- sizes the transformer cannot take ----------------------------------------------------------------------
def test_sizes_beyond_the_positional_table_are_refused_before_any_model_call(sd3, calls, tiny_dirs):
    # Tiny SD3: pos_embed_max_size 32 patches x patch 2 x VAE factor 8 = 512 pixels a side.
    assert sd3.family.max_image_side == 512
    too_big = r"height=528 is not allowed: this transformer's positional table covers at most 512 pixels a side"
    refused(calls, too_big, sd3.generate, SOURCE, **{**GENERATION, "height": 528})
    refused(calls, "width=1024 is not allowed: .* at most 512 pixels", sd3.inputs, SOURCE,
            **{**GENERATION, "width": 1024})
    refused(calls, too_big, sd3.invert, IMAGE, SOURCE, **{**GENERATION, "height": 528})
    refused(calls, too_big, sd3.edit, SOURCE, TARGET, **{**GENERATION, "height": 528})
    refused(calls, too_big, stable_flow, sd3, SOURCE, TARGET, layers=[0], **{**GENERATION, "height": 528})
    assert sd3.inputs(SOURCE, **{**GENERATION, "height": 512})["height"] == 512  # the table's edge is fine
    assert mmdit_probe.load(tiny_dirs["flux-schnell"]).family.max_image_side is None  # RoPE: no table


def test_the_toy_refuses_sizes_beyond_its_table():
    toy = mmdit_probe.load("toy")
    assert toy.family.max_image_side == 32
    with pytest.raises(InvalidInput, match="height=64 is not allowed: .* at most 32 pixels a side"):
        toy.inputs("a red circle", height=64)


# -- editors -----------------------------------------------------------------------------------------------
def watch(pipeline, step, timestep, tensors):
    raise AssertionError("never called")


@pytest.mark.parametrize("editor", [rf_solver_edit, fireflow_edit])
def test_solver_edits_refuse_a_step_callback_they_cannot_call(sd3, calls, editor):
    refused(calls, "callback_on_step_end= would be ignored", editor, sd3, SOURCE, TARGET, callback_on_step_end=watch,
            **GENERATION)
    refused(calls, "callback_on_step_end_tensor_inputs= would be ignored", editor, sd3, SOURCE, TARGET,
            callback_on_step_end_tensor_inputs=["latents"], **GENERATION)


def test_paths_that_integrate_the_ode_themselves_refuse_pipeline_only_options(sd3, calls):
    refused(calls, "callback_on_step_end= would be ignored", sd3.invert, IMAGE, SOURCE, callback_on_step_end=watch,
            **GENERATION)
    refused(calls, "output_type= would be ignored", sd3.invert, IMAGE, SOURCE, output_type="latent", **GENERATION)
    refused(calls, "latents= would be ignored", sd3.invert, IMAGE, SOURCE, latents=torch.zeros(1, 16, 8, 8),
            **GENERATION)
    refused(calls, "callback_on_step_end= would be ignored", flowedit, sd3, IMAGE, SOURCE, TARGET,
            callback_on_step_end=watch, **GENERATION)
    refused(calls, "output_type= would be ignored", flowedit, sd3, IMAGE, SOURCE, TARGET, output_type="latent",
            **GENERATION)
    refused(calls, "callback_on_step_end= would be ignored", sd3.image_maps, IMAGE, SOURCE, ["cat", "mat"],
            callback_on_step_end=watch, **GENERATION)


@pytest.mark.parametrize("source, target, match", [
    (SOURCE, "", "target=''"), (SOURCE, "   ", "target='   '"), ("", TARGET, "source=''"), (" \n", TARGET, "source"),
])
def test_the_qk_editor_refuses_empty_prompts_like_every_editor(sd3, calls, source, target, match):
    refused(calls, match + ".* give the (source|target) prompt", sd3.edit, source, target, output_type="latent",
            **GENERATION)
    refused(calls, match, check_edit, sd3, source, target)
    refused(calls, match, sd3.edit_image, IMAGE, source, target, **GENERATION)


@pytest.mark.parametrize("argv", [["edit", "toy", "a red circle", " "], ["maps", "toy", "a red circle", "--edit", ""]])
def test_the_cli_refuses_an_empty_edit_prompt(tmp_path, capsys, argv):
    from mmdit_probe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--steps", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "give the target prompt" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_editor_options_that_would_be_ignored_are_refused(sd3, calls):
    mask = np.zeros((4, 4))
    refused(calls, "inversion_guidance= is for image=", rf_solver_edit, sd3, SOURCE, TARGET, inversion_guidance=1.0,
            **GENERATION)
    refused(calls, "inversion_guidance= is for image=", fireflow_edit, sd3, SOURCE, TARGET, inversion_guidance=2.0,
            **GENERATION)
    refused(calls, "theta= .* unused with mask=", kv_edit, sd3, SOURCE, TARGET, mask=mask, theta=0.5, **GENERATION)
    refused(calls, "mask_blocks= .* unused with mask=", kv_edit, sd3, SOURCE, TARGET, mask=mask, mask_blocks=[0],
            **GENERATION)
    refused(calls, "inversion= is for image=", kv_edit, sd3, SOURCE, TARGET, mask=mask, inversion="euler",
            **GENERATION)
    refused(calls, "iterations= is for image=", stable_flow, sd3, SOURCE, TARGET, layers=[0], iterations=2,
            **GENERATION)
    refused(calls, "inversion= is for image=", stable_flow, sd3, SOURCE, TARGET, layers=[0], inversion="heun",
            **GENERATION)


def test_inversion_options_still_reach_a_real_image_edit(sd3):
    result = stable_flow(sd3, SOURCE, TARGET, layers=[], image=IMAGE, inversion="euler", iterations=0,
                         output_type="latent", **GENERATION)
    noise = sd3.invert(IMAGE, SOURCE, method="euler", check=False, **GENERATION).latents
    assert result.params["inversion"] == "euler" and torch.equal(result.inputs["latents"][1], noise[0])
    plain = stable_flow(sd3, SOURCE, TARGET, layers=[], output_type="latent", **GENERATION)
    assert plain.params["inversion"] is None


# -- vital layers --------------------------------------------------------------------------------------------
def test_vital_layers_refuses_options_it_would_ignore(sd3, calls):
    refused(calls, "progress=2 is not allowed: give True or False", vital_layers, sd3, [SOURCE], progress=2,
            **GENERATION)
    refused(calls, "dino= is for the 'dino' measure", vital_layers, sd3, [SOURCE], measures=["pixel"],
            dino=object(), **GENERATION)
    found = VitalLayers({"pixel": np.array([0.1, 0.4, 0.2, 0.3])}, {}, ["a", "b", "c", "d"], "pixel", 2, ["x"])
    assert found.top(4) == [1, 3, 2, 0]
    with pytest.raises(InvalidInput, match="k=100 is not allowed: there are only 4 blocks"):
        found.top(100)
    with pytest.raises(InvalidInput, match="k=0 is not allowed"):
        found.top(0)


# -- activation patching masks -------------------------------------------------------------------------------
def patching(probe, mask, **options):
    kw = TINY_GENERATION_KWARGS["sd3"]
    return activation_patching(probe, "a red cat", "a blue cat", "v_img", positions=[mask], blocks=[0],
                               num_steps=kw["num_inference_steps"], guidance=kw["guidance_scale"], height=kw["height"],
                               width=kw["width"], max_sequence_length=kw["max_sequence_length"], progress=False,
                               output="latent", **options)


@pytest.mark.parametrize("mask, match", [
    (torch.where(torch.eye(4, dtype=bool), 1.0, float("nan")), "NaN"),
    (-torch.ones(4, 4), r"outside \[0, 1\]"),
    (np.full((4, 4), 255, np.uint8), r"outside \[0, 1\] .* mask > 0"),
    (torch.full((4, 4), 0.3), "selects no token"),
    (torch.zeros(4, 4, dtype=torch.complex64), "real numbers"),
])
def test_image_region_masks_are_boolean_or_in_zero_one(sd3, calls, mask, match):
    refused(calls, match, patching, sd3, mask)


def test_a_soft_region_mask_selects_tokens_at_half_or_more(sd3):
    soft = torch.full((4, 4), 0.3)
    soft[0, 1], soft[2, 3] = 0.5, 1.0
    assert patching(sd3, soft).joint["position"] == [[1, 11]]
    assert patching(sd3, soft >= 0.5).joint["position"] == [[1, 11]]

"""Guidance as a second transformer call per step (Chroma and Flux.2 Klein base at guidance > 1, true CFG on Qwen-Image
and Flux.1): recording, patching and the q/k editor over both calls; what stays refused.

References never use the taps: the stock processors run (taps removed) while a wrapper around their
`dispatch_attention_fn` keeps the q, k and mask each hands the kernel, call after call (the conditional call of a step
first, then the unconditional one, per diffusers 0.42.1), and the maps are the explicit softmax(q k^T / sqrt(d) + mask)
over the whole joint sequence.
"""

import pytest
import torch
from conftest import record_all_calls, stock_kernel_calls
from diffusers.models.transformers import transformer_flux, transformer_flux2, transformer_qwenimage
from PIL import Image

import mmdit_probe
from mmdit_probe import names
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.editing import kv_edit, rf_solver_edit, stable_flow
from mmdit_probe.patching import activation_patching, patch, replace_rows
from mmdit_probe.sampling.velocity import sampler_velocity
from mmdit_probe.validation import InvalidInput

PROMPTS = ["a red cat", "a big blue dog on a mat, sitting"]  # different lengths: different padding per row
SIZE = {"height": 64, "width": 96}  # a 4 x 6 token grid
N_IMAGE = 24
# Qwen-Image's unconditional text is the negative prompts' own, as long as the longer one: these cover every real
# position of the prompts, and their lengths differ, so the unconditional call masks padding of its own.
QWEN_NEGATIVE = ["blurry", "a dark blurry photo of a cat on a bed, with low quality and noise"]

# kind -> (stock attention module, generation options)
CASES = {
    "chroma": (transformer_flux, {"guidance": 3.0, "max_sequence_length": 16}),
    "qwen-image": (transformer_qwenimage, {"guidance": 4.0, "max_sequence_length": 16,
                                           "negative_prompt": QWEN_NEGATIVE}),
    "flux2-klein": (transformer_flux2, {"guidance": 4.0, "max_sequence_length": 32}),
    "flux-dev": (transformer_flux, {"guidance": 3.5, "max_sequence_length": 16, "true_cfg_scale": 4.0,
                                    "negative_prompt": "a blurry photo"}),
}


def load(tiny_dirs, kind):
    probe = mmdit_probe.load(tiny_dirs[kind])
    if kind == "flux2-klein":
        probe.pipeline.register_to_config(is_distilled=False)  # a Klein base model: guidance runs a second call
    return probe


def generation(kind, **overrides):
    return {"steps": 2, **SIZE, "output_type": "latent", **CASES[kind][1], **overrides}


def explicit(q, k, mask):
    """softmax(q k^T / sqrt(d) + mask) over every key, as scaled_dot_product_attention applies a mask."""
    q, k = q.double(), k.double()
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("kind", list(CASES))
def test_both_calls_maps_equal_the_softmax_of_the_stock_q_and_k(tiny_dirs, kind, monkeypatch):
    probe = load(tiny_dirs, kind)
    inputs = probe.inputs(PROMPTS, seed=0, **generation(kind))
    assert probe.family.calls_per_step(inputs) == 2
    calls, stock = stock_kernel_calls(probe, inputs, monkeypatch, CASES[kind][0])
    n, n_blocks, n_steps = len(PROMPTS), probe.family.num_blocks, inputs["num_inference_steps"]
    assert len(calls) == 2 * n_steps * n_blocks  # two transformer calls per step
    assert torch.equal(probe.pipeline(**inputs).images, stock)  # the taps change no output bit
    positions = "real" if kind == "qwen-image" else "all"
    recorder = AttentionRecorder(probe, inputs, rows="both", heads="all", positions=positions, dtype=torch.float32)
    assert recorder.calls == 2 * n_steps
    maps, output = record_all_calls(probe, inputs, recorder)
    assert torch.equal(output.images, stock)  # nor does recording both calls
    assert maps.t2i.shape[:3] == (n_steps, n_blocks, 2 * n) and maps.rows == "both"
    text = torch.tensor(maps.positions)
    masked = 0
    for step in range(n_steps):
        for second, rows in ((0, slice(n, 2 * n)), (1, slice(0, n))):  # cond call first; rows [uncond | cond]
            for block in range(n_blocks):
                q, k, mask = calls[(2 * step + second) * n_blocks + block]
                p = explicit(q, k, mask)
                n_text = p.shape[-1] - N_IMAGE
                t2i = p[:, :, n_text:][..., text]
                i2t = p[:, :, text][..., n_text:].transpose(-1, -2)
                torch.testing.assert_close(maps.t2i[step, block, rows].double(), t2i, rtol=0, atol=2e-6)
                torch.testing.assert_close(maps.i2t[step, block, rows].double(), i2t, rtol=0, atol=2e-6)
                masked += mask is not None
    if kind in ("chroma", "qwen-image"):  # each call's own padding mask took part, the negative prompt's included
        assert masked == 2 * n_steps * n_blocks
        uncond, cond = calls[n_blocks][2], calls[0][2]
        assert uncond.shape != cond.shape or not torch.equal(uncond, cond)


@pytest.mark.parametrize("kind", ["chroma", "qwen-image"])
def test_rows_cond_uncond_and_both_share_one_layout(tiny_dirs, kind):
    probe = load(tiny_dirs, kind)
    options = generation(kind, negative_prompt=" ") if kind == "qwen-image" else generation(kind)
    inputs = probe.inputs(PROMPTS, seed=0, **options)
    plain = probe.pipeline(**inputs).images
    common = {"positions": [0, 1, 2], "concepts": ["cat", "dog"]}
    both, cond, uncond = (probe.generate(PROMPTS, seed=0, record={"rows": rows, "dtype": torch.float32, **common},
                                         **options) for rows in ("both", "cond", "uncond"))
    n = len(PROMPTS)
    for out in (both, cond, uncond):
        assert torch.equal(out.images, plain)  # recording, concepts included, changes no bit
    for kind_ in ("t2i", "i2t", "concept", "concept_xattn"):
        assert torch.equal(both.maps.tensor(kind_)[:, :, n:], cond.maps.tensor(kind_))
        assert torch.equal(both.maps.tensor(kind_)[:, :, :n], uncond.maps.tensor(kind_))
    assert torch.equal(both.maps.word("cat", half="uncond"), uncond.maps.word("cat", half="uncond"))
    assert not torch.equal(both.maps.t2i[:, :, :n], both.maps.t2i[:, :, n:])


def test_the_unconditional_call_is_the_negative_prompts_own_run(tiny_dirs):
    """At step 0 Chroma's unconditional call sees the latents and timestep of a guidance-1 run of the negative
    prompt ("" by default): its maps, concept maps included, are that run's, bit for bit."""
    probe = load(tiny_dirs, "chroma")
    options = {"record": {"rows": "uncond", "positions": [0, 1, 2], "dtype": torch.float32, "steps": [0]},
               "concepts": ["cat", "dog"], **generation("chroma", guidance=1.0)}
    negative = probe.generate(["", ""], seed=0, **{**options, "record": {**options["record"], "rows": "cond"}})
    guided = probe.generate(PROMPTS, seed=0, **{**options, "guidance": 3.0})
    for kind in ("t2i", "i2t", "concept", "concept_xattn"):
        assert torch.equal(guided.maps.tensor(kind), negative.maps.tensor(kind))


def test_maps_need_every_call_of_a_recorded_step(tiny_dirs):
    probe = load(tiny_dirs, "chroma")
    inputs = probe.inputs(PROMPTS, seed=0, **generation("chroma"))
    recorder = AttentionRecorder(probe, inputs, rows="both", kinds=["t2i"])
    with probe.model.generate(**inputs) as tracer:
        for call in tracer.iter[list(range(0, recorder.calls, 2))]:  # the conditional calls only
            recorder.record(call)
    with pytest.raises(RuntimeError, match="both of its transformer calls"):
        recorder.maps()


@pytest.mark.parametrize("kind", ["chroma", "qwen-image"])
def test_self_patching_changes_nothing_in_either_call(tiny_dirs, kind):
    probe = load(tiny_dirs, kind)
    options = generation(kind, negative_prompt=" ") if kind == "qwen-image" else generation(kind)
    options["num_steps"] = options.pop("steps")
    options["output"] = options.pop("output_type")
    hooks = ["q_img", "k_img", "v_img", "q_txt", "v_txt", "out_img", "out_txt"]
    result = activation_patching(probe, PROMPTS[0], PROMPTS[0], hooks, over=("hook", "half"), metric="distance",
                                 progress=False, batch_size=len(hooks) * 3, **options)
    assert result.labels["half"] == ["cond", "uncond", "both"]
    assert torch.count_nonzero(result.values) == 0
    for cell in result.outputs.flatten(0, 1):
        assert torch.equal(cell, result.clean)


@pytest.mark.parametrize("kind", ["chroma", "qwen-image"])
def test_a_half_patches_the_calls_of_its_half(tiny_dirs, kind):
    """At step 0 the clean and corrupt runs' unconditional calls are the same computation (same latents, same negative
    prompt): patching half 'uncond' there changes nothing, half 'cond' does. At step 1 their latents differ, and
    the unconditional patch changes the output too."""
    probe = load(tiny_dirs, kind)
    options = generation(kind, negative_prompt=" ") if kind == "qwen-image" else generation(kind)
    options["num_steps"] = options.pop("steps")
    options["output"] = options.pop("output_type")
    result = activation_patching(probe, "a red cat", "a blue cat", "v_txt", over=("step", "half"), metric="distance",
                                 progress=False, **options)
    first, second = (dict(zip(result.labels["half"], row)) for row in result.values.tolist())
    assert first["uncond"] == 0 and first["cond"] > 0 and first["both"] > 0
    assert torch.equal(result.outputs[0, 1], result.clean)
    assert second["uncond"] > 0 and second["cond"] > 0


def test_patching_refuses_what_the_negative_prompts_cannot_give(tiny_dirs):
    """The unconditional call's text is the negative prompt's: a shorter one on Qwen-Image has fewer positions, and
    a list of negative prompts is one for both prompts or one each."""
    probe = load(tiny_dirs, "qwen-image")
    options = generation("qwen-image", negative_prompt=" ")
    options["num_steps"] = options.pop("steps")
    options["output"] = options.pop("output_type")
    run = dict(hooks="v_txt", positions=["mat"], metric="distance", progress=False)
    activation_patching(probe, "a red cat sitting on a mat", "a blue cat sitting on a mat", half="cond", **run,
                        **options)
    for half in ("uncond", "both"):
        with pytest.raises(InvalidInput, match="patches the unconditional call, whose text is the negative prompt"):
            activation_patching(probe, "a red cat sitting on a mat", "a blue cat sitting on a mat", half=half, **run,
                                **options)
    with pytest.raises(InvalidInput, match="3 negative prompts for the clean and corrupt prompts"):
        activation_patching(probe, "a red cat", "a blue cat", **{**run, "positions": None},
                            **{**options, "negative_prompt": [" ", "blurry", "dark"]})
    one = activation_patching(probe, "a red cat", "a blue cat", **{**run, "positions": None},
                              **{**options, "negative_prompt": [" "]})
    same = activation_patching(probe, "a red cat", "a blue cat", **{**run, "positions": None}, **options)
    assert torch.equal(one.values, same.values)  # one negative prompt in a list serves both, as the pipeline takes it


@pytest.mark.parametrize("kind", ["chroma", "qwen-image", "flux2-klein"])
def test_edit_source_row_and_tau_zero(tiny_dirs, kind):
    probe = load(tiny_dirs, kind)
    options = generation(kind, negative_prompt=" ") if kind == "qwen-image" else generation(kind)
    source, target = "a red cat on a mat", "a blue dog on a mat"
    plain = probe.pipeline(**probe.inputs([source, target], seed=0, **options)).images
    edited = probe.edit(source, target, tau=1.0, eta=1.0, theta=0.3, **options)
    assert torch.equal(edited.source_image, plain[0]) and not torch.equal(edited.edited_image, plain[1])
    assert len(edited.masks) == 2 and edited.maps.rows == "cond"
    untouched = probe.edit(source, target, tau=0.0, local_blend=False, **options)
    assert torch.equal(untouched.source_image, plain[0]) and torch.equal(untouched.edited_image, plain[1])


def test_qk_injection_patches_both_calls_of_a_step(tiny_dirs):
    """The editor's target equals a hand-written trace injecting the source's image q and k into the target's row in
    every call, and differs from injecting in the conditional calls only."""
    probe = load(tiny_dirs, "chroma")
    source, target = "a red cat on a mat", "a blue dog on a mat"
    blocks = list(range(probe.family.num_blocks))
    edited = probe.edit(source, target, tau=1.0, local_blend=False, inject_blocks=blocks, **generation("chroma"))
    inputs = probe.inputs([source, target], seed=0, **generation("chroma"))

    def injected(calls):
        with probe.model.generate(**inputs) as tracer:
            for _ in tracer.iter[calls]:
                for block in blocks:
                    for name in ("q_img", "k_img"):
                        patch(probe, names.tap(block, name), lambda x: replace_rows(x, [0], [1]))
            output = probe.model.output.save()
        return output.images

    assert torch.equal(edited.edited_image, injected([0, 1, 2, 3])[1])
    assert not torch.equal(edited.edited_image, injected([0, 2])[1])


def test_the_blend_mask_comes_from_the_conditional_call(tiny_dirs):
    probe = load(tiny_dirs, "chroma")
    source, target = "a red cat on a mat", "a blue dog on a mat"
    edited = probe.edit(source, target, tau=0.0, eta=1.0, theta=0.3, **generation("chroma"))
    recorded = probe.generate([source, target], seed=0, record={"rows": "cond", "kinds": ["t2i"],
                                                                "dtype": torch.float32,
                                                                "positions": edited.maps.positions,
                                                                "blocks": edited.params["blend_blocks"], "steps": [0]},
                              **generation("chroma"))
    # Step 0 runs before any blending: the editor's maps of it are the conditional call's of a plain recording.
    assert torch.equal(edited.maps.t2i[0], recorded.maps.t2i[0])


def test_calls_per_step_is_the_one_authority(tiny_dirs):
    chroma = load(tiny_dirs, "chroma")
    assert chroma.family.calls_per_step({"guidance_scale": 1.0}) == 1
    assert chroma.family.calls_per_step({"guidance_scale": 3.0}) == 2
    qwen = load(tiny_dirs, "qwen-image")
    assert qwen.family.calls_per_step({"true_cfg_scale": 4.0}) == 1  # no negative prompt: no true CFG
    assert qwen.family.calls_per_step({"true_cfg_scale": 4.0, "negative_prompt": " "}) == 2
    assert qwen.family.calls_per_step({"true_cfg_scale": 1.0, "negative_prompt": " "}) == 1
    klein = mmdit_probe.load(tiny_dirs["flux2-klein"])
    assert klein.family.calls_per_step({"guidance_scale": 4.0}) == 1  # distilled: guidance is ignored
    klein.pipeline.register_to_config(is_distilled=False)
    assert klein.family.calls_per_step({"guidance_scale": 4.0}) == 2
    assert mmdit_probe.load(tiny_dirs["flux2-dev"]).family.calls_per_step({"guidance_scale": 4.0}) == 1
    sd3 = mmdit_probe.load(tiny_dirs["sd3"])
    assert sd3.family.calls_per_step({"guidance_scale": 7.0}) == 1  # a doubled batch, one call
    with pytest.raises(InvalidInput, match="skip_guidance_layers"):
        sd3.family.calls_per_step({"guidance_scale": 7.0, "skip_guidance_layers": [1]})


def test_what_takes_one_call_as_the_whole_velocity_refuses_two(tiny_dirs):
    chroma = load(tiny_dirs, "chroma")
    options = generation("chroma")
    inputs = chroma.inputs(PROMPTS, seed=0, **options)
    image = Image.new("RGB", (SIZE["width"], SIZE["height"]))
    del options["output_type"]  # which the paths integrating the ODE themselves refuse first
    for run in (lambda: sampler_velocity(chroma, inputs),
                lambda: chroma.invert(image, PROMPTS[0], **options),
                lambda: kv_edit(chroma, PROMPTS[0], "a blue cat", **options),
                lambda: rf_solver_edit(chroma, PROMPTS[0], "a blue cat", **options),
                # Its generated-image path patches one call per step: with two it would patch half the steps.
                lambda: stable_flow(chroma, PROMPTS[0], "a blue cat", layers=[0], **options)):
        with pytest.raises(InvalidInput, match=r"second transformer call per step.*use guidance 1"):
            run()
    qwen = load(tiny_dirs, "qwen-image")
    with pytest.raises(InvalidInput, match="twice per step"):
        qwen.invert(image, PROMPTS[0], steps=2, **SIZE, negative_prompt=" ", guidance=4.0)


def test_unconditional_rows_the_negative_prompt_cannot_give_are_refused(tiny_dirs):
    qwen = load(tiny_dirs, "qwen-image")
    inputs = qwen.inputs(PROMPTS, seed=0, **generation("qwen-image", negative_prompt=" "))
    AttentionRecorder(qwen, inputs)  # the conditional rows: the prompts' own text
    with pytest.raises(InvalidInput, match="negative prompt: text positions .* are past this batch's text"):
        AttentionRecorder(qwen, inputs, rows="both")
    embeds = {**inputs, "negative_prompt": None, "negative_prompt_embeds": torch.zeros(2, 4, 32)}
    with pytest.raises(InvalidInput, match="pass negative_prompt as text"):
        AttentionRecorder(qwen, embeds, rows="uncond", positions=[0])
    with pytest.raises(InvalidInput, match="3 negative prompts for 2 prompts"):
        AttentionRecorder(qwen, {**inputs, "negative_prompt": [" "] * 3}, rows="uncond", positions=[0])


def test_qwen_image_edit_reference_maps_of_both_calls(monkeypatch):
    """Qwen-Image-Edit's true CFG: each call holds [text | image | reference], the negative prompt's text with the
    input image's vision tokens; every region of both calls against the stock q, k and mask."""
    from diffusers import QwenImageEditPipeline
    from test_qwen_image_edit import _build

    probe = mmdit_probe.load(_build(QwenImageEditPipeline))
    pixels = (torch.rand(96, 128, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(pixels)
    inputs = probe.inputs(PROMPTS, steps=2, height=64, width=64, image=[image] * 2, max_sequence_length=32,
                          output_type="latent", guidance=4.0, negative_prompt=QWEN_NEGATIVE)
    calls, stock = stock_kernel_calls(probe, inputs, monkeypatch, transformer_qwenimage)
    kinds = ["t2i", "i2r", "t2r"]  # text keys under each call's mask, reference keys, reference queries
    recorder = AttentionRecorder(probe, inputs, rows="both", heads="all", dtype=torch.float32, kinds=kinds)
    maps, output = record_all_calls(probe, inputs, recorder)
    assert torch.equal(output.images, stock)
    n, n_blocks, n_image = len(PROMPTS), probe.family.num_blocks, 16
    n_ref = maps.reference_grid[0] * maps.reference_grid[1]
    text = torch.tensor(maps.positions)
    assert len(calls) == 2 * 2 * n_blocks
    for step in range(2):
        for second, rows in ((0, slice(n, 2 * n)), (1, slice(0, n))):
            for block in range(n_blocks):
                q, k, mask = calls[(2 * step + second) * n_blocks + block]
                p = explicit(q, k, mask)
                n_text = p.shape[-1] - n_image - n_ref
                img, ref = slice(n_text, n_text + n_image), slice(n_text + n_image, None)
                expected = {"t2i": p[:, :, img][..., text], "i2r": p[:, :, ref, img].transpose(-1, -2),
                            "t2r": p[:, :, ref][..., text]}
                for kind, m in expected.items():
                    torch.testing.assert_close(maps.tensor(kind)[step, block, rows].double(), m, rtol=0, atol=2e-6)


def test_a_transformer_call_before_the_generation_moves_no_concept_map(tiny_dirs):
    """The concept stream counts the transformer calls of the generation, as `tracer.iter` does: one more call between
    building the recorder and the trace (an odd one: it would swap the halves) leaves every concept map in place."""
    probe = load(tiny_dirs, "chroma")
    inputs = probe.inputs(PROMPTS, seed=0, **generation("chroma"))
    options = {"rows": "both", "positions": [0, 1, 2], "dtype": torch.float32, "concepts": ["cat", "dog"]}
    expected, _ = record_all_calls(probe, inputs, AttentionRecorder(probe, inputs, **options))
    n = len(PROMPTS)
    for kind in ("concept", "concept_xattn"):  # the halves differ: a swap would show
        assert not torch.equal(expected.tensor(kind)[:, :, :n], expected.tensor(kind)[:, :, n:])
    call = {}
    transformer = probe.pipeline.transformer
    with transformer.register_forward_pre_hook(lambda m, a, kw: call.update(kw), with_kwargs=True):
        probe.pipeline(**inputs)
    recorder = AttentionRecorder(probe, inputs, **options)
    with torch.no_grad():
        transformer(**call)  # the last call of that run, once more, after the recorder's hooks are in
    maps, _ = record_all_calls(probe, inputs, recorder)
    for kind in ("t2i", "concept", "concept_xattn"):
        assert torch.equal(maps.tensor(kind), expected.tensor(kind))


@pytest.mark.parametrize("kind", ["chroma", "qwen-image", "flux2-klein"])
def test_inputs_without_a_guidance_scale_count_the_calls_the_pipeline_runs(tiny_dirs, kind):
    probe = load(tiny_dirs, kind)
    negative = {"negative_prompt": " "} if kind == "qwen-image" else {}  # one prompt, one negative prompt
    inputs = probe.inputs(PROMPTS[:1], seed=0, **generation(kind, **negative))
    bare = {k: v for k, v in inputs.items() if k not in ("guidance_scale", "true_cfg_scale")}
    calls = []
    with probe.pipeline.transformer.register_forward_pre_hook(lambda *args: calls.append(1)):
        probe.pipeline(**bare)
    # The pipelines' own defaults: ChromaPipeline guidance_scale 5.0, QwenImagePipeline true_cfg_scale 4.0 (with a
    # negative prompt), Flux2KleinPipeline guidance_scale 4.0: two calls per step each.
    assert len(calls) == 2 * inputs["num_inference_steps"]
    assert probe.family.calls_per_step(bare) == 2


def test_a_doubled_batch_without_a_guidance_scale_is_the_pipelines_default():
    sd3 = mmdit_probe.load(mmdit_probe.testing.tiny_pipeline("sd3"))
    assert sd3.family.with_pipeline_defaults({}) == {"guidance_scale": 7.0}  # StableDiffusion3Pipeline's default
    assert sd3.family.doubles_batch({}) and not sd3.family.doubles_batch({"guidance_scale": 1.0})

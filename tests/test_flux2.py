"""Flux.2 (`families.flux2`) on the tiny dev and Klein pipelines: maps against the stock processors' own q and k, taps
and recording change no bit, the chat templates' tokens, Flux.2's latent normalisation, and what is refused."""

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import first_noise_prediction, record_all_calls, stock_kernel_calls, tiny_inputs
from diffusers.models.transformers import transformer_flux2
from PIL import Image

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.editing import kv_edit
from mmdit_probe.editing.inversion import invert_latents
from mmdit_probe.presets import find_preset, preset
from mmdit_probe.sampling.images import decode, encode
from mmdit_probe.sampling.velocity import _transformer_call, sampler_velocity
from mmdit_probe.sweep import sweep
from mmdit_probe.testing import TINY_GENERATION_KWARGS
from mmdit_probe.validation import InvalidInput

KIND = "flux2-klein"
PROMPTS = ["a red cat on a mat", "a blue dog, sitting"]


@pytest.fixture(params=["flux2-dev", "flux2-klein"])
def flux2(request, tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs[request.param])
    probe.kind = request.param
    return probe


@pytest.fixture
def klein(tiny_dirs):
    return mmdit_probe.load(tiny_dirs[KIND])


def non_square(probe, prompts=PROMPTS, kind=KIND, **overrides):
    return tiny_inputs(probe, kind, prompts, width=96, **overrides)  # a 4 x 6 token grid


def test_maps_equal_the_softmax_of_the_stock_processors_q_and_k(flux2, monkeypatch):
    inputs = non_square(flux2, kind=flux2.kind)
    seen, stock = stock_kernel_calls(flux2, inputs, monkeypatch, transformer_flux2)
    recorder = AttentionRecorder(flux2, inputs, heads="all", positions="all", dtype=torch.float32)
    maps, output = record_all_calls(flux2, inputs, recorder)
    assert torch.equal(output.images, stock)  # recording changes no bit either
    n_blocks, n_text = flux2.family.num_blocks, inputs["max_sequence_length"]
    assert maps.grid == (4, 6) and len(seen) == n_blocks * inputs["num_inference_steps"]
    for step in range(inputs["num_inference_steps"]):
        for block in range(n_blocks):
            q, k = (t.double() for t in seen[step * n_blocks + block][:2])  # (batch, heads, tokens, d)
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            assert p.shape[-1] == n_text + 24
            t2i, i2t = p[:, :, n_text:, :n_text], p[:, :, :n_text, n_text:].transpose(-1, -2)
            torch.testing.assert_close(maps.t2i[step, block].double(), t2i, rtol=0, atol=2e-6)
            torch.testing.assert_close(maps.i2t[step, block].double(), i2t, rtol=0, atol=2e-6)


def test_taps_change_no_output_bit(flux2, monkeypatch):
    inputs = non_square(flux2, kind=flux2.kind)
    _, stock = stock_kernel_calls(flux2, inputs, monkeypatch, transformer_flux2)
    assert torch.equal(flux2.pipeline(**inputs).images, stock)
    with flux2.model.generate(**inputs):
        output = flux2.model.output.save()
    assert torch.equal(output.images, stock)


@pytest.mark.parametrize("references", [False, True], ids=["plain", "with_references"])
def test_patching_every_tap_with_itself_changes_nothing(flux2, references):
    inputs = with_references(flux2) if references else non_square(flux2, kind=flux2.kind)
    plain = flux2.pipeline(**inputs).images
    assert not references or any(name.endswith("hook_q_ref") for name in flux2.hook_names)
    with flux2.model.generate(**inputs) as tracer:
        for _ in tracer.iter[0:inputs["num_inference_steps"]]:
            for name in flux2.hook_names:
                hook = flux2.hook(name)
                hook.output = hook.output.clone()
        output = flux2.model.output.save()
    assert torch.equal(output.images, plain)


def test_word_positions_are_the_pipelines_own_tokens(flux2):
    prompt, length = "a photo of a red cat, sitting.", {"flux2-dev": 64, "flux2-klein": 32}[flux2.kind]
    ids = []
    handle = flux2.pipeline.text_encoder.register_forward_pre_hook(
        lambda m, args, kwargs: ids.append(kwargs["input_ids"].clone()), with_kwargs=True)
    try:
        flux2.pipeline.encode_prompt(prompt, max_sequence_length=length)
    finally:
        handle.remove()
    table = flux2.tokens(prompt, max_sequence_length=length)
    tokenizer = flux2.pipeline.tokenizer
    pieces = tokenizer.convert_ids_to_tokens(ids[0][0].tolist())
    assert [t.piece for t in table.tokens] == [pieces[t.position] for t in table.tokens]
    # The chat template's tokens come first (dev: <s>, the system message, [INST]; Klein: <|im_start|> user \n),
    # then the prompt's; its words are only the prompt's; padding is not a real token.
    first = table.positions(0)[0]  # the prompt's first word
    assert pieces[first - 1] == {"flux2-dev": "[INST]", "flux2-klein": "Ċ"}[flux2.kind]
    assert pieces[:2] == {"flux2-dev": ["<s>", "[SYSTEM_PROMPT]"], "flux2-klein": ["<|im_start|>", "user"]}[flux2.kind]
    assert table.positions("a") == [first, first + 3] and pieces[first] == "a"
    assert table.positions("cat") == [first + 5] and pieces[first + 5] == "Ġcat"
    assert [t.word for t in table.tokens if t.word] == ["a", "photo", "of", "a", "red", "cat", "sitting"]
    with pytest.raises(KeyError, match="not in the prompt"):
        table.positions("pig")
    assert len(table.tokens) < length and all(pieces[p] == tokenizer.pad_token for p in range(len(table.tokens),
                                                                                              length))


def test_encode_and_decode_follow_the_pipelines_normalisation(flux2):
    inputs = non_square(flux2, [PROMPTS[0]], kind=flux2.kind)
    final = {}

    def keep(pipe, step, timestep, tensors):
        final["latents"] = tensors["latents"].clone()
        return {}

    image = flux2.pipeline(**{**inputs, "output_type": "pil", "callback_on_step_end": keep}).images[0]
    packed = final["latents"]  # the sampler's tokens after the last step
    grid = flux2.family.unpack_tokens(packed, 4, 6)
    assert torch.equal(flux2.family.transformer_input(grid), packed)
    for latents in (grid, packed):
        assert decode(flux2, latents, 64, 96)[0].tobytes() == image.tobytes()
    # Encoding: the VAE's mode, patchified and normalised by its batch norm, as the pipeline encodes references.
    pipe = flux2.pipeline
    pixels = pipe.image_processor.preprocess(image, height=64, width=96)
    expected = pipe._encode_vae_image(pixels, generator=None)
    assert torch.equal(encode(flux2, image, 64, 96), expected)
    assert expected.shape == (1, 128, 4, 6)


def test_fixed_point_inversion_converges_to_float_rounding(klein):
    inputs = tiny_inputs(klein, KIND, PROMPTS[0], num_inference_steps=4)
    clean = klein.family.pack_latents(klein.pipeline(**inputs).images)  # Klein's latent output is the VAE's
    generation = {"steps": 4, "guidance": 1.0, "height": 64, "width": 64, "max_sequence_length": 32}
    noise = inputs["latents"]
    errors = [((invert_latents(klein, clean, PROMPTS[0], iterations=n, **generation) - noise).abs().mean()
               / noise.abs().mean()).item() for n in (3, 6, 20)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5


def reference_images(kind):
    """Klein: one 64 x 80 reference (a 4 x 5 token grid); dev: two, 64 x 80 and 96 x 80, stacked into 10 x 5."""
    generator = np.random.default_rng(0)
    sizes = [(64, 80)] if kind == "flux2-klein" else [(64, 80), (96, 80)]
    images = [Image.fromarray(generator.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    return images[0] if len(images) == 1 else images


def with_references(probe, prompts=PROMPTS, **overrides):
    return non_square(probe, prompts, kind=probe.kind, **{"image": reference_images(probe.kind), **overrides})


def test_reference_maps_equal_the_softmax_of_the_stock_processors_q_and_k(flux2, monkeypatch):
    inputs = with_references(flux2)
    seen, stock = stock_kernel_calls(flux2, inputs, monkeypatch, transformer_flux2)
    assert torch.equal(flux2.pipeline(**inputs).images, stock)  # the taps change no bit
    kinds = ["t2i", "i2t", "r2i", "i2r", "t2r"]
    recorder = AttentionRecorder(flux2, inputs, kinds=kinds, heads="all", positions="all", dtype=torch.float32)
    maps, output = record_all_calls(flux2, inputs, recorder)
    assert torch.equal(output.images, stock)  # nor does recording
    # The pipeline's own reference ids: T = 10 + 10 i, each reference's rows and columns from 0, in raster order.
    call = _transformer_call(flux2, inputs)
    ids = call["img_ids"][0][24:]
    grid = (10, 5) if flux2.kind == "flux2-dev" else (4, 5)
    assert maps.reference_grid == grid and flux2.family.reference_length(call) == len(ids) == grid[0] * grid[1]
    times = sorted(set(ids[:, 0].tolist()))
    assert times == [10, 20][:len(times)]
    stacked = torch.cat([ids[ids[:, 0] == t][:, 1:3] + torch.tensor([4 * i, 0]) for i, t in enumerate(times)])  # the
    # first reference has 4 rows
    assert torch.equal(stacked, torch.cartesian_prod(torch.arange(grid[0]), torch.arange(grid[1])))
    n_blocks, n_text, n_image = flux2.family.num_blocks, inputs["max_sequence_length"], 24
    assert len(seen) == n_blocks * inputs["num_inference_steps"]
    text, image, ref = slice(0, n_text), slice(n_text, n_text + n_image), slice(n_text + n_image, None)
    for step in range(inputs["num_inference_steps"]):
        for block in range(n_blocks):
            q, k = (t.double() for t in seen[step * n_blocks + block][:2])  # (batch, heads, tokens, d)
            p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
            assert p.shape[-1] == n_text + n_image + grid[0] * grid[1]
            expected = {"t2i": p[:, :, image, text], "i2t": p[:, :, text, image].transpose(-1, -2),
                        "r2i": p[:, :, image, ref], "i2r": p[:, :, ref, image].transpose(-1, -2),
                        "t2r": p[:, :, ref, text]}
            for kind, m in expected.items():
                torch.testing.assert_close(maps.tensor(kind)[step, block].double(), m, rtol=0, atol=2e-6)


def test_concepts_and_text_maps_with_references(flux2, monkeypatch):
    """Concept tokens and T2I alone (the reference taps left unread) on a run with reference tokens: the images are
    the plain ones and T2I equals the stock softmax's image x text block."""
    inputs = with_references(flux2, [PROMPTS[0]])
    seen, plain = stock_kernel_calls(flux2, inputs, monkeypatch, transformer_flux2)
    recorder = AttentionRecorder(flux2, inputs, kinds=["t2i"], concepts=["cat", "red"], dtype=torch.float32,
                                 positions="all")
    maps, output = record_all_calls(flux2, inputs, recorder)
    assert torch.equal(output.images, plain)
    assert maps.concept("cat").shape == (4, 6) and maps.reference_grid is None
    n_text = inputs["max_sequence_length"]
    for block in range(flux2.family.num_blocks):
        q, k = (t.double() for t in seen[block][:2])
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        torch.testing.assert_close(maps.t2i[0, block].double(), p[:, :, n_text:n_text + 24, :n_text].mean(1),
                                   rtol=0, atol=2e-6)


def test_references_of_different_widths_are_refused_for_reference_maps(klein):
    klein.kind = KIND
    images = [Image.new("RGB", (80, 64)), Image.new("RGB", (96, 64))]  # 5 and 6 tokens wide
    inputs = with_references(klein, image=images)
    assert klein.family.reference_grids(inputs) == [(4, 5), (4, 6)]
    with pytest.raises(InvalidInput, match="same width in tokens"):
        AttentionRecorder(klein, inputs, kinds=["r2i"])
    AttentionRecorder(klein, inputs, kinds=["t2i"])  # maps of the other regions need no reference grid
    with pytest.raises(InvalidInput, match="carry no reference image"):
        AttentionRecorder(klein, non_square(klein), kinds=["r2i"])


def test_edit_source_row_and_tau_zero_with_references(flux2):
    kw = TINY_GENERATION_KWARGS[flux2.kind]
    generation = {"steps": 2, "guidance": kw["guidance_scale"], "height": 64, "width": 96,
                  "max_sequence_length": kw["max_sequence_length"], "output_type": "latent",
                  "image": reference_images(flux2.kind)}
    target = "a blue dog on a mat"
    plain = flux2.pipeline(**with_references(flux2, [PROMPTS[0], target])).images
    edited = flux2.edit(PROMPTS[0], target, tau=1.0, eta=1.0, theta=0.3, **generation)
    assert torch.equal(edited.source_image, plain[0]) and not torch.equal(edited.edited_image, plain[1])
    untouched = flux2.edit(PROMPTS[0], target, tau=0.0, local_blend=False, **generation)
    assert torch.equal(untouched.source_image, plain[0]) and torch.equal(untouched.edited_image, plain[1])


def test_the_velocity_keeps_the_reference_tokens(flux2):
    """The sampler's velocity is the pipeline's own first noise prediction: the latents' rows of one transformer
    call on [latents | reference latents], in the sampler's grid."""
    inputs = with_references(flux2, [PROMPTS[0]])
    first = first_noise_prediction(flux2, inputs)
    velocity, sigmas = sampler_velocity(flux2, inputs)
    grid = flux2.family.initial_noise(1, 64, 96, 0)
    v = velocity(grid, float(sigmas[0]))
    assert v.shape == grid.shape and first.shape[1] > 24
    assert torch.equal(flux2.family.transformer_input(v), first[:, :24])


def test_inversion_and_solver_edits_take_references_as_context_image(klein):
    """Inversion integrates the captured velocity, which keeps the reference tokens: its fixed point recovers the
    noise of a latent generated with a reference; `context_image=` is the reference where `image=` is the image
    to edit."""
    from mmdit_probe.editing import rf_solver_edit

    reference = reference_images(KIND)
    inputs = tiny_inputs(klein, KIND, PROMPTS[0], num_inference_steps=4, image=reference)
    clean = klein.family.pack_latents(klein.pipeline(**inputs).images)
    generation = {"steps": 4, "guidance": 1.0, "height": 64, "width": 64, "max_sequence_length": 32}
    noise = inputs["latents"]

    def error(**extra):
        inverted = invert_latents(klein, clean, PROMPTS[0], iterations=20, **generation, **extra)
        return ((inverted - noise).abs().mean() / noise.abs().mean()).item()

    assert error(context_image=reference) < 1e-5 < error()  # the reference matters
    plain = rf_solver_edit(klein, PROMPTS[0], "a blue dog on a mat", **generation, output_type="latent")
    with_reference = rf_solver_edit(klein, PROMPTS[0], "a blue dog on a mat", context_image=reference,
                                    **generation, output_type="latent")
    assert with_reference.source_image.shape == plain.source_image.shape
    assert not torch.equal(with_reference.source_image, plain.source_image)


def test_base_model_guidance_is_a_second_call_per_step(klein):
    inputs = non_square(klein, [PROMPTS[0]])
    klein.pipeline.register_to_config(is_distilled=False)  # a Klein base model
    try:
        guided = {**inputs, "guidance_scale": 4.0}
        # Recording lays both calls out (tests/test_two_call_guidance.py); the velocity paths take one call.
        assert klein.family.calls_per_step(guided) == 2 and klein.family.calls_per_step(inputs) == 1
        with pytest.raises(InvalidInput, match="second transformer call per step"):
            klein.family.check_one_call_per_step(guided)
        tapped = klein.pipeline(**guided).images
        klein.family.remove_taps()
        assert torch.equal(tapped, klein.pipeline(**guided).images)  # the taps change no bit in either call
    finally:
        klein.family.install_taps()
        klein.pipeline.register_to_config(is_distilled=True)


def test_layout_labels_and_presets(klein):
    family = klein.family
    assert family.name == "flux2" and family.num_double == 2 and family.num_blocks == 4
    assert family.block_labels() == ["0 double", "1 double", "2 single 0", "3 single 1"]
    assert klein.module_path("blocks.2.attn.hook_q_txt") == (
        "transformer.single_transformer_blocks.0.attn.processor.hook_q_txt")
    assert family.max_image_side is None and family.token_pixels == 16
    assert klein.preset.name == "flux.2-klein-4b" and klein.preset.steps == 4 and klein.preset.guidance == 1.0
    dev = {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48, "guidance_embeds": True}
    assert find_preset("/models/x", "flux2", dev).name == "flux.2-dev"
    assert find_preset("black-forest-labs/FLUX.2-klein-9B", "flux2").steps == 4
    assert find_preset("some/finetune", "flux2").name == "flux2 (family defaults)"


def test_image_maps_by_noising_at_sigma_one_are_the_first_steps_maps(flux2):
    # At sigma = 1 the noised image is the noise itself, so the one captured transformer call is the generation's
    # first: its maps (through the sampler's velocity, which packs Flux.2's grid) equal the recorded step 0.
    generation = {"steps": 2, "guidance": TINY_GENERATION_KWARGS[flux2.kind]["guidance_scale"], "height": 64,
                  "width": 96, "max_sequence_length": TINY_GENERATION_KWARGS[flux2.kind]["max_sequence_length"]}
    out = flux2.generate(PROMPTS[0], record={"dtype": torch.float32}, concepts=["cat", "background"], **generation)
    maps = flux2.image_maps(out.images[0], PROMPTS[0], ["cat", "background"], sigma=1.0,
                            record={"dtype": torch.float32}, **generation)
    assert maps.grid == out.maps.grid == (4, 6)
    for kind in ("t2i", "i2t", "concept", "concept_xattn"):
        torch.testing.assert_close(maps.tensor(kind)[0], out.maps.tensor(kind)[0], rtol=0, atol=1e-5)


def test_a_sweep_and_the_explorer_run_on_flux2(tiny_dirs, tmp_path):
    from mmdit_probe.sweep.masks import FolderMasks
    from mmdit_probe.viz import Explorer

    probe = mmdit_probe.load(tiny_dirs[KIND], preset=replace(preset("flux.2-klein-4b"), max_sequence_length=32))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat on a mat\n")
    (tmp_path / "masks" / "p00000").mkdir(parents=True)
    square = np.zeros((64, 64), np.uint8)
    square[16:48, 16:48] = 255
    Image.fromarray(square).save(tmp_path / "masks" / "p00000" / "cat.png")
    result = sweep(probe, str(prompts), tmp_path / "out", masks=FolderMasks(tmp_path / "masks"), words=["cat"],
                   resolution=64, num_steps=2, progress=False)
    table = pq.read_table(result.table).to_pandas()
    assert result.complete and set(table["word"]) == {"cat"} and set(table["block"]) == set(range(4))
    maps = probe.generate("a red cat on a mat", steps=2, height=64, width=64, max_sequence_length=32,
                          record=True).maps
    explorer = Explorer(maps)
    assert explorer.word.value == "red"  # the first content word, not the article
    flat = explorer.image.value
    explorer.block.value = 3
    assert explorer.image.value != flat and "block 3" in explorer.caption.value


def test_kv_edit_of_a_real_image_keeps_its_encoded_background(flux2):
    # The last step pastes the encoded image's background, which Flux.2's step callbacks need packed into tokens.
    kw = TINY_GENERATION_KWARGS[flux2.kind]
    generation = {"steps": 2, "guidance": kw["guidance_scale"], "height": 64, "width": 96,
                  "max_sequence_length": kw["max_sequence_length"], "output_type": "latent"}
    image = flux2.generate(PROMPTS[0], **{**generation, "output_type": "pil"}).images[0]
    mask = np.zeros((4, 6))
    mask[:2, :3] = 1
    result = kv_edit(flux2, PROMPTS[0], "a blue dog on a mat", mask=mask, image=image, **generation)
    clean = encode(flux2, image, 64, 96)
    edited = result.edited_image if result.edited_image.ndim == 4 else result.edited_image[None]
    if flux2.kind == "flux2-klein":  # the VAE's latents: back to the grid
        edited = flux2.family.pack_latents(edited)
    else:
        edited = flux2.family.unpack_tokens(edited, 4, 6)
    background = torch.tensor(mask == 0)[None, None].expand_as(clean)
    torch.testing.assert_close(edited[background], clean[background], rtol=0, atol=1e-5)
    assert not torch.allclose(edited[~background], clean[~background])

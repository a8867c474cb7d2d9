"""Chroma and Flux.1 Kontext: maps against the stock processors' own q, k and mask; the reference region.

The references here never use the taps: the stock `FluxAttnProcessor` runs (taps removed) while a wrapper
around its `dispatch_attention_fn` keeps the q, k and attention mask it hands the kernel, and the maps are
the explicit softmax(q k^T / sqrt(d) + mask) over the whole joint sequence, every block, step and head.
"""

import pytest
import torch
from conftest import first_noise_prediction, record_all_calls, stock_kernel_calls
from diffusers.models.transformers import transformer_flux

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.kernels import attention_with_lse
from mmdit_probe.maps import AttentionMaps
from mmdit_probe.patching import activation_patching
from mmdit_probe.sampling.velocity import _transformer_call, sampler_velocity
from mmdit_probe.validation import InvalidInput

PROMPTS = ["a red cat on a mat", "a blue dog, sitting"]  # different lengths: different pad masks per row
SIZE = {"height": 64, "width": 96, "max_sequence_length": 16}  # a 4 x 6 token grid
REFERENCE_GRID = (3, 5)  # the 48 x 80 context image, kept at its size


def context_image(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 48, 80, generator=generator)


def chroma_inputs(probe, prompts=PROMPTS, **overrides):
    options = {"steps": 2, "guidance": 1.0, **SIZE, "output_type": "latent", **overrides}
    return probe.inputs(prompts, seed=0, **options)


def kontext_inputs(probe, prompts=PROMPTS, **overrides):
    options = {"steps": 2, "guidance": 2.5, **SIZE, "output_type": "latent", "image": context_image(),
               "_auto_resize": False, **overrides}
    return probe.inputs(prompts, seed=0, **options)


@pytest.fixture
def chroma(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["chroma"])


@pytest.fixture
def kontext(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["flux-kontext"])


def stock_calls(probe, inputs, monkeypatch):
    """The stock Flux processors' (q, k, mask) per kernel call, in call order, and the stock output."""
    return stock_kernel_calls(probe, inputs, monkeypatch, transformer_flux)


def explicit(q, k, mask):
    """softmax(q k^T / sqrt(d) + mask) over every key, as scaled_dot_product_attention applies a mask."""
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask
    return logits.softmax(dim=-1)


def record(probe, inputs, **options):
    recorder = AttentionRecorder(probe, inputs, dtype=torch.float32, heads="all", positions="all", **options)
    maps, output = record_all_calls(probe, inputs, recorder)
    return maps, output.images


def test_each_pipeline_gets_its_family(tiny_dirs):
    assert mmdit_probe.load(tiny_dirs["chroma"]).family.name == "chroma"
    # Kontext shares Flux.1's transformer class: the pipeline tells them apart.
    assert mmdit_probe.load(tiny_dirs["flux-kontext"]).family.name == "flux-kontext"
    assert mmdit_probe.load(tiny_dirs["flux-dev"]).family.name == "flux"
    kontext = mmdit_probe.load(tiny_dirs["flux-kontext"])
    assert "blocks.0.attn.hook_q_ref" in kontext.hook_names and "blocks.3.attn.hook_out_ref" in kontext.hook_names
    assert not any("_ref" in name for name in mmdit_probe.load(tiny_dirs["flux-dev"]).hook_names)


def test_chroma_maps_equal_the_masked_softmax_of_the_stock_q_and_k(chroma, monkeypatch):
    inputs = chroma_inputs(chroma)
    calls, plain = stock_calls(chroma, inputs, monkeypatch)
    maps, images = record(chroma, inputs)
    assert torch.equal(images, plain)  # recording changes no output bit
    assert torch.equal(chroma.pipeline(**inputs).images, plain)  # nor do the taps alone
    n_blocks, n_text, n_image = chroma.family.num_blocks, SIZE["max_sequence_length"], 24
    assert maps.grid == (4, 6) and len(calls) == 2 * n_blocks
    masks = [mask for _, _, mask in calls]
    assert all(m is not None and m.dtype == torch.float32 for m in masks)
    # Real tokens plus the first pad token are kept, per prompt: the pad masks differ between the rows.
    assert not torch.equal(masks[0][0], masks[0][1])
    for step in range(2):
        for block in range(n_blocks):
            q, k, mask = calls[step * n_blocks + block]
            p = explicit(q, k, mask)
            text, image = slice(0, n_text), slice(n_text, n_text + n_image)
            torch.testing.assert_close(maps.t2i[step, block], p[:, :, image, text], rtol=0, atol=2e-6)
            torch.testing.assert_close(maps.i2t[step, block], p[:, :, text, image].transpose(-1, -2), rtol=0,
                                       atol=2e-6)
            unmasked = explicit(q, k, None)[:, :, image, text]
            assert not torch.allclose(maps.t2i[step, block], unmasked, atol=1e-4)  # the mask matters here


def test_kontext_reference_maps_equal_the_softmax_of_the_stock_q_and_k(kontext, monkeypatch):
    inputs = kontext_inputs(kontext)
    calls, plain = stock_calls(kontext, inputs, monkeypatch)
    maps, images = record(kontext, inputs, kinds=["t2i", "i2t", "r2i", "i2r", "t2r"])
    assert torch.equal(images, plain)  # recording changes no output bit
    assert torch.equal(kontext.pipeline(**inputs).images, plain)  # nor do the taps alone
    n_blocks, n_text, n_image, n_ref = kontext.family.num_blocks, SIZE["max_sequence_length"], 24, 15
    assert maps.reference_grid == REFERENCE_GRID and maps.reference_kinds == ("r2i", "i2r", "t2r")
    assert calls[0][0].shape[2] == n_text + n_image + n_ref and calls[0][2] is None
    text, image, ref = slice(0, n_text), slice(n_text, n_text + n_image), slice(n_text + n_image, None)
    for step in range(2):
        for block in range(n_blocks):
            q, k, _ = calls[step * n_blocks + block]
            p = explicit(q, k, None)
            expected = {"t2i": p[:, :, image, text], "i2t": p[:, :, text, image].transpose(-1, -2),
                        "r2i": p[:, :, image, ref], "i2r": p[:, :, ref, image].transpose(-1, -2),
                        "t2r": p[:, :, ref, text]}
            for kind, m in expected.items():
                torch.testing.assert_close(maps.tensor(kind)[step, block], m, rtol=0, atol=2e-6)


def test_reference_map_accessors_and_files(kontext, tmp_path):
    inputs = kontext_inputs(kontext)
    recorder = AttentionRecorder(kontext, inputs, kinds=["t2i", "r2i", "i2r", "t2r"], dtype=torch.float32)
    with kontext.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:2]:
            recorder.record(step)
    maps = recorder.maps()
    patch = maps.reference([(1, 2)], blocks=[0], steps=[1])
    assert patch.shape == (4, 6)
    torch.testing.assert_close(patch, maps.r2i[1, 0, 0, :, 1 * 5 + 2].reshape(4, 6), rtol=0, atol=0)
    whole = maps.reference(kind="i2r")
    torch.testing.assert_close(whole, maps.i2r[:, :, 0].mean(dim=(0, 1)).mean(-1).reshape(4, 6))
    region = torch.zeros(REFERENCE_GRID, dtype=torch.bool)
    region[0, :2] = True
    torch.testing.assert_close(maps.reference(region), maps.reference([(0, 0), (0, 1)]))
    cat = maps.word("cat", kind="t2r")
    assert cat.shape == REFERENCE_GRID  # over the reference image's grid
    assert maps.per_block("cat", kind="t2r").shape == (kontext.family.num_blocks, *REFERENCE_GRID)
    loaded = AttentionMaps.load(maps.save(tmp_path / "maps.safetensors"))
    assert loaded.reference_grid == REFERENCE_GRID
    for kind in ("t2i", "r2i", "i2r", "t2r"):
        assert torch.equal(loaded.tensor(kind), maps.tensor(kind))
    with pytest.raises(IndexError, match="outside the reference grid"):
        maps.reference([(3, 0)])
    with pytest.raises(InvalidInput, match="boolean"):
        maps.reference(torch.ones(4, 6, dtype=torch.bool))


@pytest.mark.parametrize("auto_resize", [True, False])
def test_the_reference_grid_is_the_one_the_pipeline_makes(kontext, auto_resize):
    """The grid predicted before the run (for memory estimates) against the pipeline's own call: its reference
    tokens (RoPE axis 0 = 1) and their rows and columns."""
    image = torch.rand(1, 3, 40, 90)  # not whole tokens, and an aspect ratio to round to a Kontext resolution
    inputs = kontext_inputs(kontext, prompts=[PROMPTS[0]], image=image, _auto_resize=auto_resize)
    call = _transformer_call(kontext, inputs)
    grid = kontext.family.reference_grid(inputs)
    ids = call["img_ids"][call["img_ids"][:, 0] != 0]
    assert kontext.family.reference_length(call) == grid[0] * grid[1] == len(ids)
    assert (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1) == grid
    # The image is cut to whole tokens first (32 x 80, aspect 2.5): resized to 672 x 1568 (aspect 2.33), or kept.
    assert grid == ((42, 98) if auto_resize else (2, 5))


def test_reference_kinds_are_refused_where_there_is_no_reference(kontext, chroma):
    with pytest.raises(InvalidInput, match="carry no reference image"):
        AttentionRecorder(kontext, kontext_inputs(kontext, image=None), kinds=["r2i"])
    with pytest.raises(InvalidInput, match="non-empty subset of"):
        AttentionRecorder(chroma, chroma_inputs(chroma), kinds=["r2i"])


def test_chroma_guidance_is_a_second_call_and_refused_where_one_call_is_the_velocity(chroma):
    inputs = chroma_inputs(chroma, guidance=3.0)
    # Recording lays the two calls out (tests/test_two_call_guidance.py); the velocity paths take one call.
    assert AttentionRecorder(chroma, inputs).calls == 2 * inputs["num_inference_steps"]
    with pytest.raises(InvalidInput, match="second transformer call per step"):
        sampler_velocity(chroma, inputs)
    # Plain generation with the taps installed is the stock one, guidance included.
    tapped = chroma.pipeline(**inputs).images
    chroma.family.remove_taps()
    assert torch.equal(tapped, chroma.pipeline(**inputs).images)


@pytest.mark.parametrize("which", ["chroma", "flux-kontext"])
def test_self_patching_changes_nothing(tiny_dirs, which):
    probe = mmdit_probe.load(tiny_dirs[which])
    hooks = ["q_img", "k_img", "v_img", "q_txt", "out_img", "out_txt"]
    extra = {"image": context_image(), "_auto_resize": False} if which == "flux-kontext" else {}
    if which == "flux-kontext":
        hooks += ["q_ref", "k_ref", "v_ref", "out_ref"]
    result = activation_patching(probe, PROMPTS[0], PROMPTS[0], hooks, over=("hook",), metric="distance",
                                 num_steps=2, guidance=1.0 if which == "chroma" else 2.5, progress=False,
                                 batch_size=len(hooks), **SIZE, **extra)
    assert torch.count_nonzero(result.values) == 0
    for cell in result.outputs.flatten(0, 0):
        assert torch.equal(cell, result.clean)


@pytest.mark.parametrize("which", ["chroma", "flux-kontext"])
def test_edit_source_row_and_tau_zero(tiny_dirs, which):
    probe = mmdit_probe.load(tiny_dirs[which])
    make = chroma_inputs if which == "chroma" else kontext_inputs
    extra = {"image": context_image(), "_auto_resize": False} if which == "flux-kontext" else {}
    guidance = 1.0 if which == "chroma" else 2.5
    target = "a blue dog on a mat"
    plain = probe.pipeline(**make(probe, [PROMPTS[0], target])).images
    edited = probe.edit(PROMPTS[0], target, steps=2, guidance=guidance, output_type="latent", tau=1.0, eta=1.0,
                        theta=0.3, **SIZE, **extra)
    assert torch.equal(edited.source_image, plain[0]) and not torch.equal(edited.edited_image, plain[1])
    untouched = probe.edit(PROMPTS[0], target, steps=2, guidance=guidance, output_type="latent", tau=0.0,
                           local_blend=False, **SIZE, **extra)
    assert torch.equal(untouched.source_image, plain[0]) and torch.equal(untouched.edited_image, plain[1])


def test_kontext_velocity_keeps_the_context_tokens(kontext):
    """The sampler's velocity is the pipeline's own first noise prediction: the latents' rows of one transformer
    call on [latents | context latents]."""
    inputs = kontext_inputs(kontext, prompts=[PROMPTS[0]])
    first = first_noise_prediction(kontext, inputs)
    velocity, sigmas = sampler_velocity(kontext, inputs)
    v = velocity(inputs["latents"], float(sigmas[0]))
    assert v.shape == inputs["latents"].shape
    assert torch.equal(v, first[:, :inputs["latents"].shape[1]])


def test_chroma_concept_maps_leave_the_generation_unchanged(chroma):
    inputs = chroma_inputs(chroma, prompts=[PROMPTS[0]])
    plain = chroma.pipeline(**inputs).images
    recorder = AttentionRecorder(chroma, inputs, concepts=["cat", "red"])
    with chroma.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:2]:
            recorder.record(step)
        output = chroma.model.output.save()
    maps = recorder.maps()
    assert torch.equal(output.images, plain)
    assert maps.concept("cat").shape == (4, 6)
    sums = maps.concept_tensors["concept"].float().sum(-1)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=2e-3)


def test_masked_kernel_matches_sdpa_for_boolean_and_float_masks():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=generator) for _ in range(3))
    keep = torch.rand(2, 1, 1, 12, generator=generator) > 0.3
    keep[..., 0] = True
    for mask in (keep.expand(2, 1, 12, 12), keep.expand(2, 1, 12, 12).float()):
        out, lse = attention_with_lse(q, k, v, attn_mask=mask)
        assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        logits = q @ k.transpose(-1, -2) / 4
        logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask
        torch.testing.assert_close(lse, logits.logsumexp(-1), rtol=0, atol=1e-5)


def test_kontext_concepts_and_text_maps_with_a_context_image(kontext, monkeypatch):
    """Concept tokens and T2I alone (the reference taps left unread) on a run with reference tokens: the images are
    the plain ones and T2I equals the stock softmax's image x text block."""
    inputs = kontext_inputs(kontext, prompts=[PROMPTS[0]])
    calls, plain = stock_calls(kontext, inputs, monkeypatch)
    recorder = AttentionRecorder(kontext, inputs, kinds=["t2i"], concepts=["cat", "red"], dtype=torch.float32,
                                 positions="all")
    with kontext.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:2]:
            recorder.record(step)
        output = kontext.model.output.save()
    maps = recorder.maps()
    assert torch.equal(output.images, plain)
    assert maps.concept("cat").shape == (4, 6) and maps.reference_grid is None
    n_text, n_image = SIZE["max_sequence_length"], 24
    for block in range(kontext.family.num_blocks):
        q, k, _ = calls[block]
        expected = explicit(q, k, None)[:, :, n_text:n_text + n_image, :n_text].mean(1)
        torch.testing.assert_close(maps.t2i[0, block], expected, rtol=0, atol=2e-6)


def test_kontext_inversion_with_a_context_image_recovers_the_noise(kontext):
    """Inversion integrates the captured velocity, which keeps the context tokens: the fixed point recovers the
    initial noise of a latent generated with a context image."""
    from mmdit_probe.editing.inversion import METHODS, invert_latents

    inputs = kontext_inputs(kontext, prompts=[PROMPTS[0]], steps=4)
    noise, clean = inputs["latents"], kontext.pipeline(**inputs).images
    generation = {"steps": 4, "guidance": 2.5, **SIZE, "image": context_image(), "_auto_resize": False}
    errors = {m: ((invert_latents(kontext, clean, PROMPTS[0], method=m, **generation) - noise).abs().mean()
                  / noise.abs().mean()).item() for m in METHODS}
    assert errors["fixed-point"] < 1e-2 < errors["heun"] < errors["euler"]
    without = invert_latents(kontext, clean, PROMPTS[0], method="fixed-point",
                             **{k: v for k, v in generation.items() if k not in ("image", "_auto_resize")})
    assert ((without - noise).abs().mean() / noise.abs().mean()).item() > 1e-2  # the context matters


def test_the_explorer_shows_reference_maps(kontext):
    from mmdit_probe.viz import Explorer

    out = kontext.generate(PROMPTS[0], record={"kinds": ["t2i", "r2i", "i2r", "t2r"]}, steps=2, guidance=2.5, **SIZE,
                           image=context_image(), _auto_resize=False)
    explorer = Explorer(out.maps)
    assert explorer.kind.options == ("T2I", "R2I", "I2R", "T2R")
    explorer.kind.value = "R2I"
    whole = explorer.image.value
    assert "the whole reference" in explorer.caption.value
    explorer.patch.value = (1, 2)
    assert explorer.image.value != whole and "reference patch (1, 2)" in explorer.caption.value
    torch.testing.assert_close(explorer.current_map(), out.maps.reference([(1, 2)], blocks=[explorer.block.value]))
    explorer.kind.value = "T2R"
    assert explorer.current_map().shape == REFERENCE_GRID


def test_context_image_keyword_reaches_every_path(kontext, chroma):
    """`context_image=` is Kontext's `image=` where a method takes the image to edit or invert as `image`."""
    from mmdit_probe.editing import rf_solver_edit

    by_alias = kontext_inputs(kontext, image=None, context_image=context_image())
    assert torch.equal(by_alias["image"], context_image()) and "context_image" not in by_alias
    with pytest.raises(InvalidInput, match="given twice"):
        kontext_inputs(kontext, context_image=context_image())
    with pytest.raises(InvalidInput, match="context_image= is for models with a context image"):
        chroma_inputs(chroma, context_image=context_image())
    generation = {"steps": 2, "guidance": 2.5, **SIZE, "output_type": "latent"}
    plain = rf_solver_edit(kontext, PROMPTS[0], "a blue dog on a mat", **generation)
    with_context = rf_solver_edit(kontext, PROMPTS[0], "a blue dog on a mat", context_image=context_image(),
                                  _auto_resize=False, **generation)
    assert with_context.source_image.shape == plain.source_image.shape
    assert not torch.equal(with_context.source_image, plain.source_image)  # the context tokens took part


def test_a_chroma_sweep_at_guidance_above_one_records_the_conditional_calls(chroma, tmp_path):
    from PIL import Image

    from mmdit_probe.sweep import FolderMasks, PromptItem, sweep

    (tmp_path / "masks" / "p0").mkdir(parents=True)
    for word in ("red", "cat"):
        Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "p0" / f"{word}.png")
    result = sweep(chroma, [PromptItem("p0", "a red cat", 0)], tmp_path / "out", masks=FolderMasks(tmp_path / "masks"),
                   num_steps=2, resolution=64, guidance=3.0, progress=False)
    assert result.done == 1 and not result.failed

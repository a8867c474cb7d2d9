"""Concept tokens (`mmdit_probe.concepts`): the image untouched, and every block's concept stream and maps equal
an independent computation from the tapped q/k/v and the block's own modules applied by hand."""

import pytest
import torch
from conftest import tiny_inputs

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.maps import AttentionMaps
from mmdit_probe.testing import TINY_GENERATION_KWARGS
from mmdit_probe.validation import InvalidInput

PROMPT = "on the left a red circle"
CONCEPTS = ["circle", "red", "background"]


def _generate(probe, kind, concepts=None, record=True, prompts=(PROMPT,), **record_options):
    inputs = tiny_inputs(probe, kind, list(prompts))
    options = {k: inputs.pop(k) for k in ("num_inference_steps", "guidance_scale", "height", "width")}
    return probe.generate(inputs.pop("prompt"), steps=options["num_inference_steps"],
                          guidance=options["guidance_scale"], height=options["height"], width=options["width"],
                          record=record_options or record, concepts=concepts, **inputs)


def test_concepts_change_no_bit_of_the_image(probe, kind):
    plain = _generate(probe, kind, record=False)
    recorded = _generate(probe, kind)
    with_concepts = _generate(probe, kind, CONCEPTS)
    assert torch.equal(plain.images, with_concepts.images)
    assert torch.equal(recorded.maps.t2i, with_concepts.maps.t2i)
    assert torch.equal(recorded.maps.i2t, with_concepts.maps.i2t)
    assert with_concepts.maps.concepts == [CONCEPTS]
    # Hooks and processor state are gone afterwards: the next run is the plain one again.
    assert torch.equal(_generate(probe, kind, record=False).images, plain.images)
    assert all(probe.pipeline.transformer.get_submodule(a.path).processor.concepts is None
               for a in probe.family.attentions)


def test_recording_some_blocks_and_steps_gives_those_maps_of_a_full_recording(probe, kind):
    # The concept stream skips steps nobody records and blocks past the last recorded one: the maps kept stay
    # those of the whole run.
    full = _generate(probe, kind, CONCEPTS, dtype=torch.float32).maps
    some = _generate(probe, kind, CONCEPTS, dtype=torch.float32, blocks=[1], steps=[1]).maps
    for name in ("concept", "concept_xattn"):
        assert torch.equal(some.tensor(name)[0, 0], full.tensor(name)[1, 1])


def test_any_aspect_ratio(probe, kind):
    inputs = tiny_inputs(probe, kind, [PROMPT], width=128)
    steps, guidance = inputs.pop("num_inference_steps"), inputs.pop("guidance_scale")
    args = dict(steps=steps, guidance=guidance, height=inputs.pop("height"), width=inputs.pop("width"),
                latents=inputs.pop("latents"), **{k: v for k, v in inputs.items() if k != "prompt"})
    plain = probe.generate(PROMPT, **args)
    out = probe.generate(PROMPT, record=True, concepts=CONCEPTS, **args)
    assert torch.equal(plain.images, out.images)
    assert out.maps.grid == (4, 8) and out.maps.concept("circle").shape == (4, 8)


def _attention(q, k, v, bias=None):
    """Explicit softmax(q k^T / sqrt(d) + bias) v, (batch, heads, tokens, dim) -> (batch, tokens, heads x dim)."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    p = torch.softmax(logits if bias is None else logits + bias, dim=-1)
    return (p @ v).transpose(1, 2).flatten(2)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _norm(norm, x):
    return x if norm is None else norm(x)  # SD3 (not 3.5) has no qk-norm


def _reference_qwen_block(block, c, temb, k_img, v_img, freqs):
    """Qwen-Image's text stream by hand, the concepts rotated as the prompt's first text token."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    attn = block.attn
    (shift, scale, gate), (shift2, scale2, gate2) = (m.chunk(3, dim=-1) for m in block.txt_mod(temb).chunk(2, dim=-1))
    n = block.txt_norm1(c) * (1 + scale[:, None]) + shift[:, None]
    q, k, v = (f(n).unflatten(-1, (attn.heads, -1)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    rotation = freqs[:1].expand(c.shape[1], -1)
    q, k = (apply_rotary_emb_qwen(norm(t), rotation, use_real=False).transpose(1, 2)
            for norm, t in ((attn.norm_added_q, q), (attn.norm_added_k, k)))
    v = v.transpose(1, 2)
    o = _attention(q, torch.cat([k_img, k], 2), torch.cat([v_img, v], 2))
    c = c + gate[:, None] * attn.to_add_out(o)
    m = block.txt_norm2(c) * (1 + scale2[:, None]) + shift2[:, None]
    return c + gate2[:, None] * block.txt_mlp(m), o, k


def _reference_flux2_block(block, single: bool, c, temb, k_img, v_img):
    """Flux.2's blocks by hand: modulation chunks (shift, scale, gate) of the block's temb_mod; single-stream blocks
    project q/k/v and the MLP input with one fused linear layer and project both back with another."""
    attn = block.attn
    chunks = (temb.unsqueeze(1) if temb.ndim == 2 else temb).chunk(3 if single else 6, dim=-1)
    shift, scale, gate = chunks[:3]
    if single:
        n = block.norm(c) * (1 + scale) + shift
        qkv, mlp = attn.to_qkv_mlp_proj(n).split([3 * attn.inner_dim, 2 * attn.mlp_hidden_dim], dim=-1)
        q, k, v = (_heads(x, attn.heads) for x in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
    else:
        n = block.norm1_context(c) * (1 + scale) + shift
        q, k, v = (_heads(f(n), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q, k = attn.norm_added_q(q), attn.norm_added_k(k)
    o = _attention(q, torch.cat([k_img, k], 2), torch.cat([v_img, v], 2))  # zero ids: RoPE is the identity
    if single:
        return c + gate * attn.to_out(torch.cat([o, attn.mlp_act_fn(mlp)], dim=-1)), o, k
    c = c + gate * attn.to_add_out(o)
    shift_mlp, scale_mlp, gate_mlp = chunks[3:]
    return c + gate_mlp * block.ff_context(block.norm2_context(c) * (1 + scale_mlp) + shift_mlp), o, k


def _reference_block(block, single: bool, c, temb, k_img, v_img, freqs=None):
    """The concept stream through one block by hand: (stream out or None, concept attention output, concept keys)."""
    if hasattr(block, "txt_mod"):
        return _reference_qwen_block(block, c, temb, k_img, v_img, freqs)
    attn, pre_only = block.attn, getattr(block, "context_pre_only", False)  # SD3's last block
    if single:
        n, gate = block.norm(c, emb=temb)
        q, k, v = (_heads(f(n), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
    else:
        if pre_only:
            n = block.norm1_context(c, temb)
        else:
            n, gate, shift, scale, gate_mlp = block.norm1_context(c, emb=temb)
        q, k, v = (_heads(f(n), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q, k = _norm(attn.norm_added_q, q), _norm(attn.norm_added_k, k)
    o = _attention(q, torch.cat([k_img, k], 2), torch.cat([v_img, v], 2))  # zero ids: RoPE is the identity
    if single:
        mlp = block.act_mlp(block.proj_mlp(n))
        return c + gate.unsqueeze(1) * block.proj_out(torch.cat([o, mlp], dim=2)), o, k
    if pre_only:
        return None, o, k
    c = c + gate.unsqueeze(1) * attn.to_add_out(o)
    m = block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None]
    return c + gate_mlp.unsqueeze(1) * block.ff_context(m), o, k


def test_concept_stream_and_maps_equal_an_independent_computation(probe, kind):
    family, transformer = probe.family, probe.pipeline.transformer
    taps: dict = {}
    calls: dict = {}
    masks: dict = {}
    handles = []
    for a in family.attentions:
        if a.name != "attn":
            continue
        for name in ("q_img", "k_img", "v_img", "q_txt", "k_txt", "v_txt"):
            module = probe.module(f"blocks.{a.block}.attn.hook_{name}")
            handles.append(module.register_forward_hook(
                lambda m, i, o, key=(a.block, name): taps.setdefault(key, []).append(o.detach().clone())))
        block = transformer.get_submodule(family.block_path(a.block))

        def seen(m, args, kwargs, output, b=a.block):
            if "encoder_hidden_states" not in kwargs:  # Chroma's single-stream blocks: [concepts | dummy] joint
                if kwargs["hidden_states"].shape[1] == len(CONCEPTS) + 1:
                    n = len(CONCEPTS)
                    calls.setdefault(b, []).append((kwargs["hidden_states"][:, :n].clone(), kwargs["temb"],
                                                    output[:, :n].clone()))
                elif kwargs.get("attention_mask") is not None:
                    masks.setdefault(b, []).append(kwargs["attention_mask"])
                return
            text = kwargs["encoder_hidden_states"]  # None in Flux.2's single-stream blocks' own calls
            if text is not None and text.shape[1] == len(CONCEPTS):  # the concept call
                # Flux.2: the blocks take modulations (temb_mod_txt, temb_mod); single-stream ones return the joint
                # [text | image] sequence.
                temb = kwargs.get("temb", kwargs.get("temb_mod_txt", kwargs.get("temb_mod")))
                stream = output[0] if isinstance(output, tuple) else output[:, :len(CONCEPTS)]
                calls.setdefault(b, []).append((text.clone(), temb, None if stream is None else stream.clone()))
            elif kwargs.get("attention_mask") is not None:  # Chroma's key vector over [text | image]
                masks.setdefault(b, []).append(kwargs["attention_mask"])
        handles.append(block.register_forward_hook(seen, with_kwargs=True))
    try:
        out = _generate(probe, kind, CONCEPTS, dtype=torch.float32)
    finally:
        for h in handles:
            h.remove()
    maps = out.maps
    cond = 1 if taps[(0, "q_img")][0].shape[0] == 2 else 0  # SD3 runs [uncond | cond]
    freqs = None
    if family.name == "qwen_image":  # the text positions' rotations start after the image grid's
        freqs = transformer.pos_embed([[(1, *maps.grid)]], max_txt_seq_len=1, device=torch.device("cpu"))[1]
    checked = 0
    for a in [a for a in family.attentions if a.name == "attn"]:
        block = transformer.get_submodule(family.block_path(a.block))
        single = hasattr(family, "is_single") and family.is_single(a.block)
        for step, (c, temb, stream_out) in enumerate(calls[a.block]):
            q_img, k_img, v_img, k_txt, v_txt = (taps[(a.block, n)][step] for n in
                                                 ("q_img", "k_img", "v_img", "k_txt", "v_txt"))
            bias = None
            if a.block in masks:  # Chroma: the block's outer-product mask m m^T, added; image tokens have m = 1
                m = masks[a.block][step]
                bias = torch.cat([torch.ones_like(m[:, k_txt.shape[2]:]), m[:, :k_txt.shape[2]]], 1)[:, None, None]
            if family.name == "chroma" and not single:
                temb = temb[:, 6:]  # Chroma's double blocks modulate the text with the second half
            with torch.no_grad():
                if family.name == "flux2":
                    expected, o, k_concepts = _reference_flux2_block(block, single, c, temb, k_img, v_img)
                else:
                    expected, o, k_concepts = _reference_block(block, single, c, temb, k_img, v_img, freqs)
                image_out = _attention(q_img, torch.cat([k_img, k_txt], 2), torch.cat([v_img, v_txt], 2), bias)
            if expected is None:
                assert stream_out is None
            else:
                torch.testing.assert_close(stream_out, expected)
            concept = torch.softmax(image_out[cond] @ o[cond].T, dim=-1)
            xattn = torch.softmax(q_img[cond] @ k_concepts[cond].transpose(-1, -2) * q_img.shape[-1] ** -0.5,
                                  dim=-1).mean(0)
            index = maps.blocks.index(a.block)
            torch.testing.assert_close(maps.tensor("concept")[step, index, 0], concept)
            torch.testing.assert_close(maps.tensor("concept_xattn")[step, index, 0], xattn)
            checked += 1
    assert checked == family.num_blocks * len(maps.steps)


def test_concept_maps_select_save_and_load(tiny_dirs, tmp_path):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    maps = _generate(probe, "sd3", ["Circle", "background"]).maps
    assert maps.concepts == [["circle", "background"]] and maps.concept_kinds == ("concept", "concept_xattn")
    full = maps.tensor("concept")
    torch.testing.assert_close(maps.concept("circle"), full[..., 0].float().mean(dim=(0, 1)).reshape(maps.grid))
    torch.testing.assert_close(maps.concept("background", kind="concept_xattn", blocks=[1], steps=[0]),
                               maps.tensor("concept_xattn")[0, 1, 0, :, 1].float().reshape(maps.grid))
    # Each image token's concept probabilities sum to one.
    torch.testing.assert_close(full.float().sum(-1), torch.ones(full.shape[:-1]), atol=2e-3, rtol=0)
    assert maps.per_block("circle", kind="concept").shape == (len(maps.blocks), *maps.grid)
    loaded = AttentionMaps.load(maps.save(tmp_path / "maps.safetensors"))
    assert loaded.concepts == maps.concepts
    for kind in ("t2i", "concept", "concept_xattn"):
        assert torch.equal(loaded.tensor(kind), maps.tensor(kind))
    with pytest.raises(KeyError, match="not recorded for prompt 0"):
        maps.concept("square")
    with pytest.raises(InvalidInput, match="kind"):
        maps.concept("circle", kind="t2i")
    with pytest.raises(ValueError, match="concepts="):
        _generate(probe, "sd3").maps.concept("circle")


def test_one_concept_list_per_prompt_equals_each_prompt_alone(probe, kind):
    prompts = [PROMPT, "on the right a blue square"]
    concepts = [["circle", "red", "background"], ["square", "background"]]
    together = _generate(probe, kind, concepts, prompts=prompts, dtype=torch.float32).maps
    assert together.concepts == concepts
    for i, (prompt, own) in enumerate(zip(prompts, concepts)):
        alone = _generate(probe, kind, own, prompts=[prompt], dtype=torch.float32).maps
        for k in ("concept", "concept_xattn"):
            torch.testing.assert_close(together.tensor(k)[:, :, i, :, :len(own)], alone.tensor(k)[:, :, 0])
            # A shorter list's spare slot has probability zero.
            assert (together.tensor(k)[:, :, i, :, len(own):] == 0).all()
    with pytest.raises(KeyError, match="for prompt 1"):
        together.concept("circle", prompt=1)


@pytest.mark.parametrize("concepts, message", [
    ([["circle"]], "1 concept lists for 2 prompt"),
    ([], "empty"), ("circle", "list of words"), (["circle", 3], "is not allowed"),
    (["circle", "Circle"], "twice"), (["red circle"], "one word"), ([""], "one word")])
def test_bad_concepts_are_refused_before_running(tiny_dirs, concepts, message):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    inputs = tiny_inputs(probe, "sd3", [PROMPT, PROMPT])
    with pytest.raises(InvalidInput, match=message):
        AttentionRecorder(probe, inputs, concepts=concepts)
    assert all(probe.pipeline.transformer.get_submodule(a.path).processor.concepts is None
               for a in probe.family.attentions)


def test_concepts_need_recording(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    with pytest.raises(InvalidInput, match="record=True"):
        probe.generate(PROMPT, concepts=["circle"])


def test_concept_maps_the_stream_did_not_make_are_said_to_be_missing(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    inputs = probe.inputs(["a red cat"], seed=0, steps=2, height=64, width=64, output_type="latent")
    recorder = AttentionRecorder(probe, inputs, concepts=["cat", "red"])
    recorder.concepts.remove()  # the stream's hooks gone: record() still fills t2i and i2t, nothing fills concept maps
    with probe.model.generate(**inputs) as tracer:
        for call in tracer.iter[0:recorder.calls]:
            recorder.record(call)
    with pytest.raises(RuntimeError, match="concept maps are missing .* the concept stream did not run"):
        recorder.maps()


def test_real_image_maps_by_noise_and_by_inversion(probe, kind):
    from mmdit_probe.image_maps import image_maps

    generation = {k: v for k, v in TINY_GENERATION_KWARGS[kind].items()}
    steps, guidance = generation.pop("num_inference_steps"), generation.pop("guidance_scale")
    options = dict(steps=steps, guidance=guidance, **generation)
    image = probe.generate(PROMPT, **options).images[0]
    # At sigma = 1 the noised latent is the seed's noise itself: the one call is the generation's first step.
    noised = image_maps(probe, image, PROMPT, CONCEPTS, sigma=1.0, record={"dtype": torch.float32}, **options)
    generated = probe.generate(PROMPT, record={"dtype": torch.float32, "steps": [0]}, concepts=CONCEPTS,
                               **options).maps
    assert noised.steps == [0] and noised.concepts == [CONCEPTS]
    for k in ("t2i", "i2t", "concept", "concept_xattn"):
        torch.testing.assert_close(noised.tensor(k), generated.tensor(k))
    halfway = probe.image_maps(image, PROMPT, CONCEPTS, sigma=0.5, **options)  # the Probe method: the same function
    assert not torch.equal(halfway.tensor("concept"), noised.tensor("concept").half())
    inverted = image_maps(probe, image, PROMPT, CONCEPTS, method="inversion", inversion={"method": "euler"},
                          **options)
    assert inverted.steps == list(range(steps)) and inverted.concept("circle").shape == tuple(inverted.grid)
    with pytest.raises(InvalidInput, match="sigma"):
        image_maps(probe, image, PROMPT, CONCEPTS, sigma=0.0, **options)
    with pytest.raises(InvalidInput, match="method"):
        image_maps(probe, image, PROMPT, CONCEPTS, method="denoise", **options)


def test_average_precision_equals_the_mean_precision_at_each_target_pixel():
    import numpy as np

    from mmdit_probe.segmentation import average_precision

    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.integers(0, 6, size=50).astype(float)  # many ties
        target = rng.random(50) < 0.4
        target[0] = True
        expected = np.mean([(target & (scores >= s)).sum() / (scores >= s).sum() for s in scores[target]])
        assert average_precision(scores, target) == pytest.approx(expected, abs=1e-12)


def test_segmentation_scores_by_hand():
    import numpy as np

    from mmdit_probe.segmentation import segmentation_scores

    mask = np.array([[True, False], [False, False]])
    perfect = segmentation_scores([mask.astype(float)], [mask])
    assert perfect == {"pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0, "images": 1}
    # Mean 0.4: pixels 0.9 and 0.5 are foreground; one of them right. Background IoU 2/3, foreground 1/2.
    scores = segmentation_scores([np.array([[0.9, 0.5], [0.1, 0.1]])], [mask])
    assert scores["pixel_accuracy"] == 0.75 and scores["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores["map"] == 1.0
    with pytest.raises(InvalidInput, match="upsample"):
        segmentation_scores([np.zeros((4, 4))], [mask])


def test_segmentation_harness_on_rendered_shapes_world_scenes(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from mmdit_probe.image_maps import image_maps
    from mmdit_probe.maps import upsample
    from mmdit_probe.segmentation import segment_folder, segmentation_scores
    from mmdit_probe.toy.world import render, sample_scene

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng, labels = np.random.default_rng(3), {}
    while len(labels) < 3:
        scene = sample_scene(rng)
        if len(scene.objects) != 1:
            continue
        image, (mask,) = render(scene)
        name = f"scene{len(labels)}"
        Image.fromarray(image).save(tmp_path / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{name}.png")
        labels[name] = scene.objects[0].shape
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    result = segment_folder(probe, tmp_path, concepts=["background"], labels=tmp_path / "labels.json", sigma=0.6)
    assert result["images"] == 3 and [r["target"] for r in result["per_image"]] == list(labels.values())
    for key in ("pixel_accuracy", "miou", "map"):
        assert 0 <= result[key] <= 1
    # The first image's score, recomputed from its own map.
    image = Image.open(tmp_path / "images" / "scene0.png")
    mask = np.asarray(Image.open(tmp_path / "masks" / "scene0.png")) > 0
    m = image_maps(probe, image, "", [labels["scene0"], "background"], sigma=0.6).concept(labels["scene0"])
    expected = segmentation_scores([upsample(m, mask.shape).numpy()], [mask])
    assert {k: result["per_image"][0][k] for k in expected} == expected
    with pytest.raises(FileNotFoundError, match="images/ and a masks/"):
        segment_folder(probe, tmp_path / "images", concepts=["background"])


def test_three_kinds_figure_and_explorer_show_concept_maps(tiny_dirs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmdit_probe.viz import Explorer, three_kinds

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    out = _generate(probe, "sd3", ["circle", "background"])
    fig = three_kinds(out.maps, ["circle", "red"], blocks=[0, 1])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "circle (concept)" in titles and "circle (concept x-attn)" in titles and "red (T2I)" in titles
    assert "red (concept)" not in titles  # "red" is no concept here
    plt.close(fig)
    explorer = Explorer(out.maps)
    assert explorer.kind.options == ("T2I", "I2T", "CONCEPT", "CONCEPT_XATTN")
    explorer.block.value = 0
    explorer.kind.value = "CONCEPT"
    explorer.concept.value = "background"
    assert "<b>CONCEPT</b> of <b>background</b>" in explorer.caption.value
    torch.testing.assert_close(explorer.current_map(), out.maps.concept("background", blocks=[0]))
    with pytest.raises(ValueError, match="concepts="):
        three_kinds(_generate(probe, "sd3").maps, ["circle"])


def test_toy_evaluation_reads_each_word_from_its_concept():
    import numpy as np

    from mmdit_probe.toy.evaluate import map_target, scene_concepts
    from mmdit_probe.toy.world import WORD_TYPE, caption, sample_split_scene

    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    scene = sample_split_scene(np.random.default_rng(0), held_out=True)
    own = scene_concepts(scene)
    assert own[-1] == "background" and set(own[:-1]) == {w for o in scene.objects for w in (o.shape, o.colour)}
    maps = probe.generate(caption(scene), steps=2, record=True, concepts=[own]).maps
    for index, word in enumerate(maps.tables[0].words):
        assert map_target("t2i", maps, index, index) == index
        expected = {"shape": word, "colour": word, "background": "background"}.get(WORD_TYPE.get(word))
        assert map_target("concept", maps, 0, index) == expected

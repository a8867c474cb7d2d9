"""Qwen-Image: the chat-template tokens, the key mask over padded text, the video VAE's latents.

References are independent of the taps: the stock `QwenDoubleStreamAttnProcessor2_0`'s own joint q, k and mask are
caught where it hands them to `dispatch_attention_fn`, and the maps are compared with the explicit masked softmax.
"""

import numpy as np
import pytest
import torch
from conftest import record_all_calls
from diffusers.models.transformers import transformer_qwenimage

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.sampling.images import decode, encode
from mmdit_probe.testing import TINY_GENERATION_KWARGS

# Different lengths: the batch's text is padded to the longer prompt and the pipeline masks the padding.
PROMPTS = ["a red cat", "a big blue dog on a mat, sitting"]
SIZE = {"height": 64, "width": 96}  # non-square: 4 x 6 image tokens
LENGTH = 16


@pytest.fixture
def qwen(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["qwen-image"])


def _inputs(probe, prompts=PROMPTS, **extra):
    return probe.inputs(prompts, seed=0, steps=2, max_sequence_length=LENGTH, output_type="latent", **SIZE, **extra)


def _stock_attention(monkeypatch):
    """Every joint q, k (batch, tokens, heads, dim) and mask the stock processor hands to the attention kernel."""
    calls = []
    original = transformer_qwenimage.dispatch_attention_fn

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone(), None if attn_mask is None else attn_mask.clone()))
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(transformer_qwenimage, "dispatch_attention_fn", spy)
    return calls


def test_the_chat_template_prefix_is_34_tokens_and_words_point_at_their_text_positions(qwen):
    pipe = qwen.pipeline
    tokenizer, drop = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert drop == 34 and len(tokenizer(prefix)["input_ids"]) == drop
    prompt = "a big blue dog, on a mat!"
    table = qwen.tokens(prompt, LENGTH)
    ids = tokenizer(pipe.prompt_template_encode.format(prompt))["input_ids"][drop:]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # The pipeline's text sequence, position by position: the prompt's tokens, then the template's closing tokens.
    assert [t.piece for t in table.tokens] == pieces[:LENGTH]
    assert pieces[:2] == ["a", "Ġbig"]  # the first word follows "user\n": no leading space
    for word, piece in (("dog", "Ġdog"), ("blue", "Ġblue"), ("a", "a")):
        assert [pieces[p] for p in table.positions(word)][0] == piece
    # A word out of the vocabulary is its bytes; the space byte before it is no part of it.
    assert "".join(pieces[p] for p in table.positions("mat")) == "mat" and len(table.positions("mat")) > 1
    assert pieces[table.positions("mat")[0] - 1] == "Ġ"
    assert table.positions("dog,") == table.positions("dog") == [3]
    assert table.positions("a") == [0, 6]
    assert [t.word for t in table.tokens[-5:]] == [None] * 5  # <|im_end|> \n <|im_start|> assistant \n
    # The real positions are exactly the pipeline's unmasked ones.
    _, mask = pipe.encode_prompt(PROMPTS, max_sequence_length=LENGTH)
    for row, prompt in enumerate(PROMPTS):
        real = qwen.tokens(prompt, LENGTH).real_positions
        assert real == mask[row].nonzero().flatten().tolist()


def test_a_long_prompt_is_cut_where_the_pipeline_cuts_it(qwen):
    table = qwen.tokens("a red cat on a mat and a blue dog", 4)
    assert table.real_positions == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="cut off"):
        table.positions("dog")


def test_maps_equal_the_masked_softmax_of_the_stock_q_and_k(qwen, monkeypatch):
    inputs = _inputs(qwen)
    calls = _stock_attention(monkeypatch)
    qwen.family.remove_taps()
    stock = qwen.pipeline(**inputs).images
    qwen.family.install_taps()
    n_blocks, n_steps = qwen.family.num_blocks, inputs["num_inference_steps"]
    assert len(calls) == n_blocks * n_steps and calls[0][2] is not None  # the padding is masked
    recorder = AttentionRecorder(qwen, inputs, heads="all", dtype=torch.float32)
    maps, output = record_all_calls(qwen, inputs, recorder)
    assert torch.equal(output.images, stock)  # taps and recording change no output bit
    tables = [qwen.tokens(p, LENGTH) for p in PROMPTS]
    n_text = max(len(t.real_positions) for t in tables)
    assert maps.positions == list(range(n_text)) and maps.grid == (4, 6)
    padded = [p for p in maps.positions if p not in tables[0].real_positions]
    assert padded  # the short prompt's padding is recorded, and must read 0 in T2I as in the kernel
    for step in range(n_steps):
        for block in range(n_blocks):
            q, k, mask = calls[step * n_blocks + block]
            q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
            logits = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
            p = logits.masked_fill(~mask, -torch.inf).softmax(dim=-1)
            t2i, i2t = p[:, :, n_text:, :n_text], p[:, :, :n_text, n_text:].transpose(-1, -2)
            torch.testing.assert_close(maps.t2i[step, block], t2i, rtol=0, atol=2e-6)
            torch.testing.assert_close(maps.i2t[step, block], i2t, rtol=0, atol=2e-6)
            assert (maps.t2i[step, block, 0][..., padded] == 0).all()


def test_the_key_mask_is_none_when_no_prompt_is_padded(qwen, monkeypatch):
    calls = _stock_attention(monkeypatch)
    same = ["a red cat", "a blue dog"]
    inputs = _inputs(qwen, same)
    recorder = AttentionRecorder(qwen, inputs, dtype=torch.float32, kinds=["t2i"])
    with qwen.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:2]:
            recorder.record(step)
    maps = recorder.maps()
    assert qwen.family.text_key_mask(recorder.tables, maps.positions) is None
    assert maps.t2i.sum(-1).max() < 1  # the image keys take the rest of each row's mass
    del calls


def test_positions_past_the_batch_text_are_refused(qwen):
    with pytest.raises(mmdit_probe.validation.InvalidInput, match="past this batch's text"):
        AttentionRecorder(qwen, _inputs(qwen, ["a red cat", "a blue dog"]), positions="all")


def test_one_step_is_refused(qwen):
    with pytest.raises(mmdit_probe.validation.InvalidInput, match="shift_terminal"):
        qwen.inputs("a red cat", steps=1)


def test_patching_a_run_with_itself_changes_nothing(qwen):
    inputs = _inputs(qwen)
    plain = qwen.pipeline(**inputs).images
    with qwen.model.generate(**inputs) as tracer:
        for _ in tracer.iter[0:2]:
            for name in qwen.hook_names:
                hook = qwen.hook(name)
                hook.output = hook.output.clone()
        output = qwen.model.output.save()
    assert torch.equal(output.images, plain)


@pytest.mark.parametrize("source, target", [("a red cat on a mat", "a blue cat on a mat"),
                                             ("a cat", "a big fluffy red cat")])  # the second pair is padded
def test_an_edit_keeps_the_source_row_and_tau_zero_is_the_plain_target(qwen, source, target):
    generation = {"steps": 2, "max_sequence_length": LENGTH, "output_type": "latent", **SIZE}
    result = qwen.edit(source, target, seed=0, **generation)
    plain = qwen.pipeline(**_inputs(qwen, [source, target])).images
    assert torch.equal(result.source_image, plain[0])
    untouched = qwen.edit(source, target, seed=0, tau=0.0, eta=0.0, **generation)
    assert torch.equal(untouched.edited_image, plain[1])


def test_images_round_trip_through_the_video_vae(qwen):
    inputs = _inputs(qwen, ["a red cat"])
    latents = qwen.pipeline(**inputs).images
    image = decode(qwen, latents, **SIZE)[0]
    assert image.size == (96, 64)
    inputs["output_type"] = "pil"
    assert np.array_equal(np.asarray(image), np.asarray(qwen.pipeline(**inputs).images[0]))  # as the pipeline decodes
    encoded = encode(qwen, image, **SIZE)
    assert encoded.shape == latents.shape and torch.isfinite(encoded).all()
    assert qwen.family.unpack_latents(encoded, **SIZE).shape == (1, 16, 1, 8, 12)


def test_load_finds_the_family_and_its_preset_by_shape(qwen):
    from mmdit_probe.presets import find_preset

    assert qwen.family.name == "qwen_image" and qwen.family.num_blocks == 3
    assert qwen.hook_names[:2] == ["blocks.0.attn.hook_q_img", "blocks.0.attn.hook_k_img"]
    config = {"num_layers": 60, "num_attention_heads": 24}
    assert find_preset("/models/qwen", "qwen_image", config).name == "qwen-image"
    assert TINY_GENERATION_KWARGS["qwen-image"]["guidance_scale"] == 1.0


def test_taps_hold_exactly_the_stock_processors_q_k_v(qwen, monkeypatch):
    inputs = _inputs(qwen)
    calls = _stock_attention(monkeypatch)
    qwen.family.remove_taps()
    qwen.pipeline(**inputs)
    qwen.family.install_taps()
    stock_calls = list(calls)
    taps, handles = {}, []
    for name in qwen.hook_names:
        handles.append(qwen.module(name).register_forward_hook(
            lambda m, i, out, name=name: taps.setdefault(name, []).append(out.detach().clone())))
    qwen.pipeline(**inputs)
    for h in handles:
        h.remove()
    n_blocks, n_text = qwen.family.num_blocks, stock_calls[0][2].shape[-1] - 4 * 6  # 4 x 6 image tokens
    for call, (q, k, _) in enumerate(stock_calls):
        step, block = divmod(call, n_blocks)
        for name, joint in (("q", q), ("k", k)):
            joint = joint.transpose(1, 2)
            assert torch.equal(taps[f"blocks.{block}.attn.hook_{name}_txt"][step], joint[:, :, :n_text])
            assert torch.equal(taps[f"blocks.{block}.attn.hook_{name}_img"][step], joint[:, :, n_text:])


def test_true_cfg_is_a_second_call_per_step(qwen):
    inputs = _inputs(qwen, ["a red cat"], guidance=4.0, negative_prompt=" ")
    assert inputs["true_cfg_scale"] == 4.0
    # Recording lays both calls out (tests/test_two_call_guidance.py); the velocity paths take one call.
    assert AttentionRecorder(qwen, inputs).calls == 2 * inputs["num_inference_steps"]
    with pytest.raises(mmdit_probe.validation.InvalidInput, match="twice per step"):
        qwen.family.check_one_call_per_step(inputs)
    assert qwen.pipeline(**inputs).images.isfinite().all()


def test_a_sweep_and_the_explorer_run_on_qwen_image(qwen, tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from mmdit_probe.sweep import FolderMasks, sweep
    from mmdit_probe.viz.explorer import Explorer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat on a mat\n")
    folder = tmp_path / "masks" / "p00000"
    folder.mkdir(parents=True)
    cat = np.zeros((64, 64), np.uint8)
    cat[16:48, 16:48] = 255
    Image.fromarray(cat).save(folder / "cat.png")
    result = sweep(qwen, str(prompts), tmp_path / "out", masks=FolderMasks(tmp_path / "masks"), words=["cat"],
                   resolution=64, num_steps=2, kinds=["t2i"], progress=False)
    table = pq.read_table(result.table)
    assert set(table.column("word").to_pylist()) == {"cat"}
    assert set(table.column("block").to_pylist()) == set(range(qwen.family.num_blocks))
    maps = qwen.generate("a red cat on a mat", steps=2, height=64, width=64, record=True).maps
    explorer = Explorer(maps)
    assert explorer.word.value == "red"
    explorer.block.value = 2
    assert "block 2" in explorer.caption.value


def test_real_images_invert_edit_and_flowedit_through_the_video_vae(qwen):
    from mmdit_probe.editing.flowedit import flowedit

    prompt = "a red cat on a mat"
    generation = {"steps": 2, "max_sequence_length": LENGTH, **SIZE}
    image = qwen.generate(prompt, **generation).images[0]
    inverted = qwen.invert(image, prompt, **generation)
    assert inverted.latents.shape == (1, 24, 64) and inverted.reconstruction.size == image.size
    result = qwen.edit_image(image, prompt, "a blue cat on a mat", **generation)
    assert result.params["inversion"] == "fixed-point" and result.edited_image.size == image.size
    unchanged = flowedit(qwen, image, prompt, prompt, **generation)
    roundtrip = decode(qwen, encode(qwen, image, **SIZE), **SIZE)[0]
    # z_edit + (z_src - x_src) equals z_src up to float rounding: at most one grey level anywhere.
    assert np.abs(np.asarray(unchanged, dtype=int) - np.asarray(roundtrip, dtype=int)).max() <= 1

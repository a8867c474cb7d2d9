"""Recorded T2I / I2T maps equal softmax(QK^T / sqrt(d)) computed independently from the same q and k."""

from collections import defaultdict

import pytest
import torch
from conftest import record_all_calls, stock_kernel_calls, tiny_inputs
from diffusers.models.transformers import transformer_flux, transformer_flux2

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.maps import AttentionMaps, normalise, smooth

PROMPTS = ["a red cat on a mat", "a blue dog, sitting"]


def record_with_reference(probe, kind, **options):
    """One traced generation that records maps, while plain torch hooks keep every q and k."""
    inputs = tiny_inputs(probe, kind, PROMPTS)
    seen, handles = defaultdict(list), []
    for block in range(probe.family.num_blocks):
        for name in ("q_img", "k_img", "q_txt", "k_txt"):
            tap = f"blocks.{block}.attn.hook_{name}"
            handles.append(probe.module(tap).register_forward_hook(
                lambda m, i, out, key=(block, name): seen[key].append(out.detach().clone())))
        if probe.family.masks_attention:  # Chroma: the mask each attention call hands its kernel
            attention = probe.pipeline.transformer.get_submodule(probe.family.attention(block).path)
            handles.append(attention.register_forward_pre_hook(
                lambda m, a, kw, key=(block, "mask"): seen[key].append(kw.get("attention_mask")), with_kwargs=True))
    recorder = AttentionRecorder(probe, inputs, dtype=torch.float32, **options)
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record(step)
        output = probe.model.output.save()
    for h in handles:
        h.remove()
    return recorder.maps(), seen, inputs, output


def reference(seen, block, step):
    """Explicit joint softmax; returns T2I (batch, heads, image, text) and I2T transposed alike."""
    q_img, k_img, q_txt, k_txt = (seen[(block, n)][step] for n in ("q_img", "k_img", "q_txt", "k_txt"))
    if seen.get((block, "mask")):  # a mask over the joint [text | image] order, applied as the kernel applies it
        mask = seen[(block, "mask")][step]
        q, k = torch.cat([q_txt, q_img], dim=2), torch.cat([k_txt, k_img], dim=2)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        p = torch.softmax(logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask, -1)
        n_txt = q_txt.shape[2]
        return p[:, :, n_txt:, :n_txt], p[:, :, :n_txt, n_txt:].transpose(-1, -2)
    q, k = torch.cat([q_img, q_txt], dim=2), torch.cat([k_img, k_txt], dim=2)
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    n_img = q_img.shape[2]
    return p[:, :, :n_img, n_img:], p[:, :, n_img:, :n_img].transpose(-1, -2)


def cfg_rows(kind):
    return "both" if kind.startswith("sd3") else "cond"


def test_per_head_maps_equal_the_explicit_softmax(probe, kind):
    maps, seen, inputs, _ = record_with_reference(probe, kind, heads="all", rows=cfg_rows(kind), positions="all")
    assert maps.blocks == list(range(probe.family.num_blocks))  # Flux single-stream blocks included
    for step in range(inputs["num_inference_steps"]):
        for block in maps.blocks:
            t2i, i2t = reference(seen, block, step)
            torch.testing.assert_close(maps.t2i[step, block], t2i, rtol=0, atol=2e-6)
            torch.testing.assert_close(maps.i2t[step, block], i2t, rtol=0, atol=2e-6)


def test_head_mean_conditional_real_tokens_by_default(probe, kind):
    maps, seen, inputs, _ = record_with_reference(probe, kind)
    real = sorted(set(probe.tokens(PROMPTS[0], inputs["max_sequence_length"]).real_positions)
                  | set(probe.tokens(PROMPTS[1], inputs["max_sequence_length"]).real_positions))
    assert maps.positions == real and maps.rows == "cond" and maps.heads == "mean"
    cond = slice(2, 4) if inputs["guidance_scale"] > 1 and kind.startswith("sd3") else slice(0, 2)
    for block in maps.blocks:
        t2i, i2t = reference(seen, block, 1)
        torch.testing.assert_close(maps.t2i[1, block], t2i[cond].mean(1)[..., real], rtol=0, atol=2e-6)
        torch.testing.assert_close(maps.i2t[1, block], i2t[cond].mean(1)[..., real], rtol=0, atol=2e-6)


def test_unconditional_half_is_recorded_on_request(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    maps, seen, _, _ = record_with_reference(probe, "sd3", rows="uncond", positions="all")
    t2i, _ = reference(seen, 0, 0)
    torch.testing.assert_close(maps.t2i[0, 0], t2i[:2].mean(1), rtol=0, atol=2e-6)


def test_a_word_map_is_the_mean_over_its_positions_in_every_tokenizer(probe, kind):
    maps, seen, inputs, _ = record_with_reference(probe, kind)
    table = probe.tokens(PROMPTS[1], inputs["max_sequence_length"])
    dog = table.positions("dog")
    assert len(dog) == (2 if kind.startswith("sd3") else 1)  # CLIP and T5 for SD3, T5 for Flux
    t2i, i2t = reference(seen, 1, 0)
    cond = 3 if kind.startswith("sd3") else 1
    expected = t2i[cond].mean(0)[:, dog].mean(-1).reshape(maps.grid)
    torch.testing.assert_close(maps.word("dog,", prompt=1, blocks=[1], steps=[0]), expected, rtol=0, atol=2e-6)
    expected = i2t[cond].mean(0)[:, dog].mean(-1).reshape(maps.grid)
    torch.testing.assert_close(maps.word("dog", prompt=1, kind="i2t", blocks=[1], steps=[0]), expected,
                               rtol=0, atol=2e-6)


def test_recording_changes_no_output_bit(probe, kind):
    _, _, inputs, output = record_with_reference(probe, kind)
    assert torch.equal(output.images, probe.pipeline(**inputs).images)


def test_chosen_blocks_steps_and_words(tiny_dirs, tmp_path):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    maps, _, _, _ = record_with_reference(probe, "sd3", blocks=[1], steps=[1], kinds=["t2i"], positions=["cat", "dog"])
    assert maps.blocks == [1] and maps.steps == [1] and maps.i2t is None
    # "cat" and "dog" are both the third word: the same CLIP and T5 positions in either prompt.
    assert maps.positions == maps.tables[0].positions("cat") == maps.tables[1].positions("dog")
    assert len(maps.positions) == 2
    with pytest.raises(IndexError, match=r"block 0 was not recorded; recorded blocks: \[1\]"):
        maps.word("cat", blocks=[0])
    with pytest.raises(ValueError, match="no 'i2t' maps here"):
        maps.word("cat", kind="i2t")
    with pytest.raises(KeyError, match="word 'mat' is not in the prompt 'a blue dog, sitting'"):
        maps.word("mat", prompt=1)
    loaded = AttentionMaps.load(maps.save(tmp_path / "maps.safetensors"))
    assert torch.equal(loaded.t2i, maps.t2i) and loaded.positions == maps.positions
    assert loaded.tables[1].positions("dog") == maps.tables[1].positions("dog")


def test_recorder_rejects_bad_requests(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    inputs = tiny_inputs(probe, "flux-dev", PROMPTS)
    with pytest.raises(IndexError, match="out of range"):
        AttentionRecorder(probe, inputs, blocks=[99])
    with pytest.raises(IndexError, match=r"step 5 out of range: this run has steps 0..1"):
        AttentionRecorder(probe, inputs, steps=[5])
    with pytest.raises(KeyError, match="word 'zebra' is in none of the prompts"):
        AttentionRecorder(probe, inputs, positions=["zebra"])
    with pytest.raises(MemoryError, match=r"needs about .* GB \(limit max_gb=1e-06\)"):
        AttentionRecorder(probe, inputs, max_gb=1e-6)
    with pytest.raises(ValueError, match="runs the transformer twice per step"):
        AttentionRecorder(probe, {**inputs, "skip_guidance_layers": [1]})
    with pytest.raises(ValueError, match="needs classifier-free guidance"):  # checked before the run
        AttentionRecorder(probe, inputs, rows="uncond")


def test_smoothing_and_normalising():
    m = torch.zeros(9, 9)
    m[4, 4] = 1.0
    s = smooth(m)
    assert s.sum().item() == pytest.approx(1.0, abs=1e-3) and s[4, 4] < 1 and s[4, 5] > 0
    assert s[0, 0] == 0  # kernel 7 reaches 3 cells, not 4
    assert normalise(s).max() == 1.0 and normalise(s, "minmax").min() == 0.0


def test_sd35_attn2_entropy_only_on_request(tiny_dirs, tmp_path):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3.5"])
    seen, handles = defaultdict(list), []
    for name in ("q_img", "k_img"):
        handles.append(probe.module(f"blocks.0.attn2.hook_{name}").register_forward_hook(
            lambda m, i, out, name=name: seen[name].append(out.detach().clone())))
    inputs = tiny_inputs(probe, "sd3.5", PROMPTS)
    recorder = AttentionRecorder(probe, inputs, dtype=torch.float32, attn2=True)
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record(step)
    for h in handles:
        h.remove()
    maps = recorder.maps()
    assert maps.attn2_blocks == [0] and maps.attn2_entropy.shape == (2, 1, 2, 16)
    q, k = seen["q_img"][1][2:], seen["k_img"][1][2:]  # step 1, conditional rows
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    entropy = -(p * torch.log(p)).sum(-1).mean(1)
    torch.testing.assert_close(maps.attn2_entropy[1, 0], entropy, rtol=0, atol=1e-5)
    assert AttentionMaps.load(maps.save(tmp_path / "m.safetensors")).attn2_entropy.shape == (2, 1, 2, 16)
    default = record_with_reference(probe, "sd3.5")[0]
    assert default.attn2_entropy is None and default.attn2_blocks == []
    with pytest.raises(ValueError, match="none of the chosen blocks has an image-only attn2"):
        AttentionRecorder(probe, inputs, blocks=[1], attn2=True)


@pytest.mark.parametrize("kind", ["flux-dev", "flux-kontext", "flux2-klein"])
def test_a_mask_given_through_joint_attention_kwargs_is_in_the_maps(tiny_dirs, kind, monkeypatch):
    """Flux.1's pipelines hand `joint_attention_kwargs={"attention_mask": ...}` to every attention call (Flux.2's
    `attention_kwargs`); the maps must apply it as the kernel does (they once did so for Chroma's own mask only, gave
    unmasked maps on Flux.1 and refused Flux.2)."""
    probe = mmdit_probe.load(tiny_dirs[kind])
    inputs = tiny_inputs(probe, kind, PROMPTS)
    n_text = inputs["max_sequence_length"]
    module = transformer_flux2 if kind.startswith("flux2") else transformer_flux
    stock_calls, _ = stock_kernel_calls(probe, inputs, monkeypatch, module)
    n_tokens = stock_calls[0][1].shape[2]
    mask = torch.ones(len(PROMPTS), 1, 1, n_tokens, dtype=torch.bool)  # keys kept, in the joint [text | image] order
    mask[0, ..., 3:n_text] = False
    mask[1, ..., 5:n_text] = False
    inputs["attention_kwargs" if kind.startswith("flux2") else "joint_attention_kwargs"] = {"attention_mask": mask}
    calls, stock = stock_kernel_calls(probe, inputs, monkeypatch, module)
    assert all(m is not None for _, _, m in calls)
    recorder = AttentionRecorder(probe, inputs, heads="all", positions="all", dtype=torch.float32)
    maps, output = record_all_calls(probe, inputs, recorder)
    assert torch.equal(output.images, stock)  # recording changes no bit under the mask either
    n_blocks, n_image = probe.family.num_blocks, maps.t2i.shape[-2]
    for step in range(inputs["num_inference_steps"]):
        for block in range(n_blocks):
            q, k, m = calls[step * n_blocks + block]
            logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
            p = logits.masked_fill(~m, -torch.inf).softmax(dim=-1)
            text, image = slice(0, n_text), slice(n_text, n_text + n_image)
            torch.testing.assert_close(maps.t2i[step, block].double(), p[:, :, image, text], rtol=0, atol=2e-6)
            torch.testing.assert_close(maps.i2t[step, block].double(), p[:, :, text, image].transpose(-1, -2),
                                       rtol=0, atol=2e-6)
    first = maps.t2i[:, :, 0]  # the mask took part: the first prompt's image queries see only text keys 0..2
    assert (first[..., 3:] == 0).all() and (first[..., :3] > 0).all()

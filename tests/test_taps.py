"""Hook points: exact, complete, patchable, removable — on every tiny family."""

import pytest
import torch
from conftest import tiny_inputs
from diffusers import DiffusionPipeline
from diffusers.models.embeddings import apply_rotary_emb

import mmdit_probe
from mmdit_probe._notices import internal_deprecations_hidden
from mmdit_probe.taps import TapProcessor
from mmdit_probe.validation import InvalidInput

PROMPTS = ["a red cat on a mat", "a blue dog on a mat"]


def latents_of(result) -> torch.Tensor:
    return result.images


def test_installing_taps_changes_no_output_bit(probe, kind, tiny_dirs):
    with internal_deprecations_hidden():
        stock = DiffusionPipeline.from_pretrained(tiny_dirs[kind])
    stock.set_progress_bar_config(disable=True)
    inputs = tiny_inputs(probe, kind, PROMPTS)
    expected = latents_of(stock(**inputs))
    assert torch.equal(latents_of(probe.pipeline(**inputs)), expected)
    with probe.model.generate(**inputs):
        traced = probe.model.output.save()
    assert torch.equal(latents_of(traced), expected)


def test_remove_taps_restores_the_stock_processors(probe, kind):
    inputs = tiny_inputs(probe, kind, PROMPTS)
    tapped = latents_of(probe.pipeline(**inputs))
    probe.family.remove_taps()
    processors = [probe.pipeline.transformer.get_submodule(a.path).processor for a in probe.family.attentions]
    assert not any(isinstance(p, TapProcessor) for p in processors)
    assert torch.equal(latents_of(probe.pipeline(**inputs)), tapped)
    probe.family.install_taps()
    assert probe.family.taps_installed()
    with probe.model.generate(**inputs):  # nnsight still reaches the reinstalled taps
        q = probe.hook("blocks.0.attn.hook_q_img").output.save()
    assert q.shape[2] > 0


def test_fused_projections_keep_working(probe, kind):
    if not probe.family.fuses_qkv:  # Qwen-Image: diffusers fuses nothing there
        with pytest.raises(InvalidInput, match="no fused q/k/v projections"):
            probe.fuse_qkv_projections()
        return
    inputs = tiny_inputs(probe, kind, PROMPTS)
    unfused = latents_of(probe.pipeline(**inputs))
    probe.fuse_qkv_projections()
    attn = probe.pipeline.transformer.get_submodule(probe.family.attentions[0].path)
    assert attn.fused_projections and isinstance(attn.processor, TapProcessor)
    fused = latents_of(probe.pipeline(**inputs))
    # One fused matmul rounds differently from three.
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    if kind != "sd3.5":  # diffusers' fused SD3 processor drops qk-norm and cannot run attn2
        probe.family.remove_taps()
        assert torch.equal(latents_of(probe.pipeline(**inputs)), fused)


def test_replacing_every_tap_with_its_own_value_changes_nothing(probe, kind):
    inputs = tiny_inputs(probe, kind, PROMPTS)
    plain = latents_of(probe.pipeline(**inputs))
    steps = inputs["num_inference_steps"]
    with probe.model.generate(**inputs) as tracer:
        for _ in tracer.iter[0:steps]:
            for name in probe.hook_names:
                hook = probe.hook(name)
                hook.output = hook.output.clone()
        patched = probe.model.output.save()
    assert torch.equal(latents_of(patched), plain)


def test_injecting_source_image_qk_changes_target_not_source(probe, kind):
    inputs = tiny_inputs(probe, kind, PROMPTS)
    plain = latents_of(probe.pipeline(**inputs))
    steps = inputs["num_inference_steps"]
    with probe.model.generate(**inputs) as tracer:
        for _ in tracer.iter[0:steps]:
            for block in range(probe.family.num_blocks):
                for activation in ("q", "k"):
                    hook = probe.hook(f"blocks.{block}.attn.hook_{activation}_img")
                    x = hook.output
                    # Rows are [source, target], twice under classifier-free guidance.
                    source = torch.arange(0, x.shape[0], 2)
                    patched = x.clone()
                    patched[source + 1] = x[source]
                    hook.output = patched
        result = probe.model.output.save()
    latents = latents_of(result)
    assert torch.equal(latents[0], plain[0])
    assert not torch.allclose(latents[1], plain[1])


def _capture(probe, kind):
    """Run once with plain torch hooks: each attention module's inputs and each tap's output."""
    calls, taps, handles = {}, {}, []
    for a in probe.family.attentions:
        module = probe.pipeline.transformer.get_submodule(a.path)

        def keep_inputs(m, args, kwargs, path=a.path):
            calls.setdefault(path, (args, kwargs))
        handles.append(module.register_forward_pre_hook(keep_inputs, with_kwargs=True))
    for name in probe.hook_names:
        handles.append(probe.module(name).register_forward_hook(
            lambda m, i, out, name=name: taps.setdefault(name, out)))
    inputs = tiny_inputs(probe, kind, PROMPTS, num_inference_steps=2)  # the first call is kept; Qwen needs 2
    probe.pipeline(**inputs)
    for h in handles:
        h.remove()
    return calls, taps, inputs


def _arg(args, kwargs, name, index):
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def _heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (batch, heads, tokens, dim)


def test_taps_equal_independently_computed_sdpa_inputs(probe, kind):
    calls, taps, inputs = _capture(probe, kind)
    rows, cols = probe.family.grid(inputs["height"], inputs["width"])
    n_text = probe.family.text_length(inputs["max_sequence_length"])
    family = probe.family
    for a in family.attentions:
        attn = probe.pipeline.transformer.get_submodule(a.path)
        args, kwargs = calls[a.path]
        hidden = _arg(args, kwargs, "hidden_states", 0)
        context = _arg(args, kwargs, "encoder_hidden_states", 1)
        h = attn.heads
        with torch.no_grad():
            if family.name == "sd3":
                img = {n: _heads(getattr(attn, f"to_{n}")(hidden), h) for n in "qkv"}
                if attn.norm_q is not None:
                    img["q"], img["k"] = attn.norm_q(img["q"]), attn.norm_k(img["k"])
                txt = None
                if a.has_text:
                    txt = {n: _heads(getattr(attn, f"add_{n}_proj")(context), h) for n in "qkv"}
                    if attn.norm_added_q is not None:
                        txt["q"], txt["k"] = attn.norm_added_q(txt["q"]), attn.norm_added_k(txt["k"])
            elif family.name == "qwen_image":  # each stream projected, normed and rotated by its own frequencies
                from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

                image_freqs, text_freqs = kwargs["image_rotary_emb"]

                def stream(x, projections, norms, freqs, heads=h):
                    q, k, v = (f(x).unflatten(-1, (heads, -1)) for f in projections)
                    q, k = (apply_rotary_emb_qwen(norm(t), freqs, use_real=False) for norm, t in zip(norms, (q, k)))
                    return {n: t.transpose(1, 2) for n, t in zip("qkv", (q, k, v))}
                img = stream(hidden, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k), image_freqs)
                txt = stream(context, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                             (attn.norm_added_q, attn.norm_added_k), text_freqs)
            else:
                rope = _arg(args, kwargs, "image_rotary_emb", 4)
                if context is not None:  # double-stream: project each stream, then [text | image]
                    joint = {n: torch.cat([getattr(attn, f"add_{n}_proj")(context), getattr(attn, f"to_{n}")(hidden)],
                                          dim=1) for n in "qkv"}
                    norms = {"q": (attn.norm_added_q, attn.norm_q), "k": (attn.norm_added_k, attn.norm_k)}
                    for n, (text_norm, image_norm) in norms.items():
                        x = joint[n].unflatten(-1, (h, -1))
                        joint[n] = torch.cat([text_norm(x[:, :n_text]), image_norm(x[:, n_text:])], dim=1).flatten(2)
                elif hasattr(attn, "to_qkv_mlp_proj"):  # Flux.2 single-stream: q, k, v lead the fused projection
                    joint = dict(zip("qkv", attn.to_qkv_mlp_proj(hidden)[..., :3 * attn.inner_dim].chunk(3, dim=-1)))
                    joint["q"] = attn.norm_q(joint["q"].unflatten(-1, (h, -1))).flatten(2)
                    joint["k"] = attn.norm_k(joint["k"].unflatten(-1, (h, -1))).flatten(2)
                else:  # single-stream: the block already joined [text | image]
                    joint = {n: getattr(attn, f"to_{n}")(hidden) for n in "qkv"}
                    joint["q"] = attn.norm_q(joint["q"].unflatten(-1, (h, -1))).flatten(2)
                    joint["k"] = attn.norm_k(joint["k"].unflatten(-1, (h, -1))).flatten(2)
                for n in "qk":
                    joint[n] = apply_rotary_emb(joint[n].unflatten(-1, (h, -1)), rope, sequence_dim=1).flatten(2)
                txt = {n: _heads(joint[n][:, :n_text], h) for n in "qkv"}
                img = {n: _heads(joint[n][:, n_text:], h) for n in "qkv"}
        for n in "qkv":
            tapped = taps[f"blocks.{a.block}.{a.name}.hook_{n}_img"]
            assert tapped.shape[1:3] == (h, rows * cols)
            torch.testing.assert_close(tapped, img[n], rtol=0, atol=1e-6)
            if a.has_text:
                tapped = taps[f"blocks.{a.block}.{a.name}.hook_{n}_txt"]
                assert tapped.shape[1:3] == (h, n_text)
                torch.testing.assert_close(tapped, txt[n], rtol=0, atol=1e-6)


def test_flux_numbers_double_then_single_blocks(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    assert probe.family.num_blocks == 4
    assert probe.module_path("blocks.1.attn.hook_q_img") == "transformer.transformer_blocks.1.attn.processor.hook_q_img"
    assert probe.module_path("blocks.2.attn.hook_q_txt") == (
        "transformer.single_transformer_blocks.0.attn.processor.hook_q_txt")


def test_sd35_attn2_is_image_only(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3.5"])
    assert "blocks.0.attn2.hook_q_img" in probe.hook_names
    assert "blocks.0.attn2.hook_q_txt" not in probe.hook_names
    with pytest.raises(ValueError, match="has no 'hook_q_txt'"):
        probe.hook("blocks.0.attn2.hook_q_txt")
    with pytest.raises(ValueError, match="block 1 has no 'attn2'"):
        probe.hook("blocks.1.attn2.hook_q_img")


def test_bad_hook_names_get_clear_errors(probe):
    last = probe.family.num_blocks - 1
    with pytest.raises(IndexError, match=rf"out of range: .* has blocks 0..{last}"):
        probe.hook(f"blocks.{last + 1}.attn.hook_q_img")
    with pytest.raises(ValueError, match="look like 'blocks.7.attn.hook_q_img'"):
        probe.hook("transformer_blocks.0.attn")
    with pytest.raises(ValueError, match="has no 'hook_z_img'"):
        probe.hook("blocks.0.attn.hook_z_img")


def test_taps_keep_the_attention_backend_chosen_for_the_stock_processors(tiny_dirs, monkeypatch):
    """`set_attention_backend` before `load` stays in force: the tapped processors dispatch to the same backend."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also makes its backend diffusers' process-wide default: put that back afterwards.
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    pipeline = DiffusionPipeline.from_pretrained(tiny_dirs["flux-dev"])
    pipeline.transformer.set_attention_backend("native")
    stock = {name: m.processor._attention_backend for name, m in pipeline.transformer.named_modules()
             if hasattr(m, "processor")}
    probe = mmdit_probe.load(pipeline)
    tapped = {name: m.processor._attention_backend for name, m in probe.pipeline.transformer.named_modules()
              if hasattr(m, "processor")}
    assert tapped == stock and set(tapped.values()) == {stock[next(iter(stock))]} and None not in tapped.values()
    probe.family.remove_taps()  # a backend chosen while the taps are out holds once they are back
    probe.pipeline.transformer.set_attention_backend("_native_math")
    probe.family.install_taps()
    chosen = {m.processor._attention_backend for m in probe.pipeline.transformer.modules() if hasattr(m, "processor")}
    assert chosen == {"_native_math"} or {getattr(b, "value", b) for b in chosen} == {"_native_math"}

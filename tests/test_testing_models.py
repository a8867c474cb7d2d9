"""The tiny offline pipelines of `mmdit_probe.testing`."""

import re

import pytest
import torch

from mmdit_probe._notices import internal_deprecations_hidden
from mmdit_probe.testing import (
    TINY_GENERATION_KWARGS,
    TINY_KINDS,
    WORDS,
    save_tiny_pipeline,
    tiny_pipeline,
)

PROMPT = "a photo of a red cat, sitting."


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # Tiny matmuls gain nothing from threads, and an OpenMP thread sharing a busy core stalls
    # every op by milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=TINY_KINDS)
def kind_and_pipe(request):
    pipe = tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def generate(pipe, kind):
    generator = torch.Generator().manual_seed(0)
    kw = TINY_GENERATION_KWARGS[kind]
    # Kontext sizes its output to max_area (default 1024^2), whatever height and width say.
    extra = {"max_area": kw["height"] * kw["width"]} if kind == "flux-kontext" else {}
    return pipe(prompt=PROMPT, generator=generator, output_type="latent", **kw, **extra).images


def test_generation_is_bit_identical_after_save_and_reload(kind_and_pipe, tmp_path):
    kind, pipe = kind_and_pipe
    latents = generate(pipe, kind)
    # SD3 latents are 16 x 8 x 8; Flux packs them 2x2 into 16 tokens of 64 channels, Flux.2 dev 32 channels into 16
    # tokens of 128; Flux.2 Klein returns its VAE's 32 x 8 x 8.
    # Qwen-Image, Chroma and Kontext pack like Flux.
    expected = {"sd3": (1, 16, 8, 8), "sd3.5": (1, 16, 8, 8), "flux2-dev": (1, 16, 128), "flux2-klein": (1, 32, 8, 8)}
    assert latents.shape == expected.get(kind, (1, 16, 64))
    assert latents.isfinite().all()

    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    for path in (tmp_path / "saved", save_tiny_pipeline(kind, tmp_path / "fresh")):
        with internal_deprecations_hidden():
            reloaded = type(pipe).from_pretrained(path)
        reloaded.set_progress_bar_config(disable=True)
        assert torch.equal(generate(reloaded, kind), latents)


def test_components(kind_and_pipe):
    kind, pipe = kind_and_pipe
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training
            assert all(p.dtype == torch.float32 for p in component.parameters())
    transformer = pipe.transformer
    if kind.startswith("sd3"):
        clip_widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert clip_widths < transformer.config.joint_attention_dim == pipe.text_encoder_3.config.d_model
        assert transformer.config.pooled_projection_dim == clip_widths
        assert pipe.text_encoder.config.num_hidden_layers >= 2
        blocks = transformer.transformer_blocks
        assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
        dual = kind == "sd3.5"
        assert blocks[0].use_dual_attention == dual and not blocks[-1].use_dual_attention
        assert (transformer.config.qk_norm == "rms_norm") == dual
    elif kind == "qwen-image":
        assert transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
        assert pipe.vae_scale_factor == 8 and transformer.config.in_channels == 4 * pipe.vae.config.z_dim == 64
    elif kind == "chroma":  # T5 alone, no CLIP, no pooled projection
        assert transformer.config.joint_attention_dim == pipe.text_encoder.config.d_model
        assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    elif kind.startswith("flux2"):
        # Three of Qwen3's hidden states side by side; 32 latent channels patchified 2x2; the VAE's batch-norm
        # statistics are not the identity, so a missing normalisation shows.
        klein = kind == "flux2-klein"
        text_config = pipe.text_encoder.config if klein else pipe.text_encoder.config.text_config
        assert transformer.config.joint_attention_dim == 3 * text_config.hidden_size
        assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 128
        assert transformer.config.guidance_embeds == (not klein)  # dev's guidance is distilled into an input
        assert pipe.config.get("is_distilled", False) == klein
        # Klein reads hidden state 27 of Qwen3, dev 30 of Mistral-3's language model.
        assert text_config.num_hidden_layers >= (28 if klein else 30)
        assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
        assert len(transformer.config.axes_dims_rope) == 4
        assert pipe.vae.bn.running_mean.abs().sum() > 0 and not torch.equal(pipe.vae.bn.running_var,
                                                                            torch.ones_like(pipe.vae.bn.running_var))
    else:
        assert transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
        assert transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
        assert transformer.config.guidance_embeds == (kind in ("flux-dev", "flux-kontext"))
        assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim


def test_text_layout(kind_and_pipe):
    kind, pipe = kind_and_pipe
    n = TINY_GENERATION_KWARGS[kind]["max_sequence_length"]
    with torch.no_grad():
        if kind.startswith("flux2"):
            embeds, text_ids = pipe.encode_prompt(PROMPT, max_sequence_length=n)
            assert embeds.shape == (1, n, pipe.transformer.config.joint_attention_dim)
            # Text positions run along RoPE's last axis (T, H, W, L).
            assert torch.equal(text_ids[0, :, 3], torch.arange(n)) and not text_ids[0, :, :3].any()
            return
        if kind.startswith("sd3"):
            embeds, _, pooled, _ = pipe.encode_prompt(
                PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False, max_sequence_length=n
            )
            assert embeds.shape == (1, 77 + n, pipe.text_encoder_3.config.d_model)
            # The CLIP rows are zero-padded from CLIP-L + CLIP-G widths up to the T5 width.
            clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
            assert not embeds[:, :77, clip_width:].any() and embeds[:, 77:, clip_width:].any()
        elif kind == "qwen-image":  # the prompt after the chat template's prefix, cut at n: no padding, no mask
            embeds, mask = pipe.encode_prompt(PROMPT, max_sequence_length=n)
            assert embeds.shape == (1, n, pipe.text_encoder.config.text_config.hidden_size) and mask is None
            return
        elif kind == "chroma":
            embeds, text_ids, mask = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                                        max_sequence_length=n)[:3]
            assert embeds.shape == (1, n, pipe.text_encoder.config.d_model) and text_ids.shape == (n, 3)
            real = len(pipe.tokenizer(PROMPT).input_ids)  # with </s>; the first pad token is kept too
            assert mask.tolist() == [[1.0] * (real + 1) + [0.0] * (n - real - 1)]
            return
        else:
            embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, PROMPT, max_sequence_length=n)
            assert embeds.shape == (1, n, pipe.text_encoder_2.config.d_model)
            assert text_ids.shape == (n, 3)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)


def test_tokenizers_round_trip(kind_and_pipe):
    kind, pipe = kind_and_pipe
    if kind == "qwen-image":
        tokenizer = pipe.tokenizer
        decoded = tokenizer.decode(tokenizer(PROMPT).input_ids, skip_special_tokens=True)
        assert decoded == PROMPT  # byte-level BPE loses nothing
        assert all(len(tokenizer.tokenize(w)) == len(tokenizer.tokenize(" " + w)) == 1 for w in WORDS)
        assert len(tokenizer.tokenize("xylophones")) > 1
        assert tokenizer.tokenize("<|im_start|>user") == ["<|im_start|>", "user"]
        return
    if kind == "flux2-dev":
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        tokenizer = pipe.tokenizer
        text = tokenizer.apply_chat_template(format_input([PROMPT], pipe.system_message)[0], tokenize=False)
        assert text == f"<s>[SYSTEM_PROMPT]{pipe.system_message}[/SYSTEM_PROMPT][INST]{PROMPT}[/INST]"
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
        assert pieces[:3] == ["<s>", "[SYSTEM_PROMPT]", "You"] and pieces[-3:] == ["Ġsitting", ".", "[/INST]"]
        assert all(len(tokenizer.tokenize(" " + word)) == 1 for word in WORDS)
        assert len(tokenizer.tokenize(" xylophones")) > 1
        return
    if kind.startswith("flux2"):
        tokenizer = pipe.tokenizer
        decoded = tokenizer.decode(tokenizer(PROMPT).input_ids, skip_special_tokens=True)
        assert re.findall(r"\w+", decoded) == ["a", "photo", "of", "a", "red", "cat", "sitting"]
        assert all(len(tokenizer.tokenize(" " + word)) == 1 for word in WORDS)
        assert len(tokenizer.tokenize(" xylophones")) > 1
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
        assert pieces[:4] == ["<|im_start|>", "user", "Ċ", "a"] and pieces[-6:] == ["<think>", "Ċ", "Ċ", "</think>",
                                                                                     "Ċ", "Ċ"]
        return
    if kind.startswith("sd3"):
        clips, t5 = [pipe.tokenizer, pipe.tokenizer_2], pipe.tokenizer_3
    elif kind == "chroma":
        clips, t5 = [], pipe.tokenizer
    else:
        clips, t5 = [pipe.tokenizer], pipe.tokenizer_2
    for tokenizer in [*clips, t5]:
        decoded = tokenizer.decode(tokenizer(PROMPT).input_ids, skip_special_tokens=True)
        assert re.findall(r"\w+", decoded) == ["a", "photo", "of", "a", "red", "cat", "sitting"]
        assert all(len(tokenizer.tokenize(word)) == 1 for word in WORDS)
        # Text outside the vocabulary still tokenizes, falling back to characters.
        assert len(tokenizer.tokenize("xylophones")) > 1
    assert all(clip.model_max_length == 77 for clip in clips)
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    assert t5.convert_ids_to_tokens(t5(PROMPT).input_ids)[:3] == ["▁a", "▁photo", "▁of"]


def test_rng_untouched_and_seeded():
    state = torch.get_rng_state()
    a, b = tiny_pipeline("flux-schnell", seed=1), tiny_pipeline("flux-schnell", seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(a.transformer.proj_out.weight, b.transformer.proj_out.weight)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        tiny_pipeline("sdxl")

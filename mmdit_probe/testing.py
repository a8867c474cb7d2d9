"""Tiny random SD3 / SD3.5 / Flux.1 / Flux.2 pipelines for tests, built offline from the real classes.

Every pipeline keeps the real model's *structure* -- the same diffusers and transformers classes,
text encoders, tokenizer conventions, token layout, VAE scale factor 8, 16 latent channels and
2x2 patches -- at toy widths with seeded random weights, so a 2-step 64x64 generation takes well
under a second on CPU. Nothing is downloaded: the tokenizers' vocabularies are built here.

Token layouts, with N = ``max_sequence_length`` (16 in `TINY_GENERATION_KWARGS`; the pipelines'
defaults, 256 for SD3 and 512 for Flux, work too but are slower):

* SD3 / SD3.5: ``prompt_embeds`` holds 77 + N tokens: 77 CLIP tokens (CLIP-L and CLIP-G hidden
  states side by side, zero-padded to the T5 width) then N T5 tokens. Inside each joint block the
  sequence is ``[image tokens, text tokens]``; 64x64 pixels give 4x4 = 16 image tokens.
* Qwen-Image: the text is the prompt's Qwen2.5-VL tokens after the chat template's 34-token prefix (the prompt,
  then ``<|im_end|>\n<|im_start|>assistant\n``), padded to the longest prompt of the batch (at most N), with a key
  mask over the padding (None when there is none). The sequence is ``[text tokens, image tokens]``; the VAE is
  Qwen-Image's video VAE (5-D latents, one frame); 64x64 pixels give 4x4 = 16 image tokens.
* Flux: the text is the N T5 tokens only (CLIP contributes just its pooled vector). Inside each
  block the sequence is ``[text tokens, image tokens]``; 64x64 pixels give 4x4 = 16 image tokens.
* Chroma: Flux's layout with T5 alone (no CLIP), and the pipeline's attention mask over padded text.
* Flux.1 Kontext: Flux-dev's layout; a context image (``image=``) appends its tokens after the image
  tokens: ``[text, image, reference]``. Pass ``_auto_resize=False`` to keep a tiny context image tiny
  (the pipeline otherwise resizes it to about 1024x1024).

* Flux.2 Klein: the text is N Qwen3 tokens of the prompt inside Qwen3's chat template (N = 32 here), three
  hidden states side by side; ``[text tokens, image tokens]``; 64x64 pixels give 4x4 = 16 image tokens of 128
  channels (32 latent channels patchified 2x2).

`FluxPipeline` hard-codes a 1024x1024 default, so pass the sizes in `TINY_GENERATION_KWARGS`.
"""

from __future__ import annotations

import re
import string
import tempfile
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    AddedToken,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ._bpe import word_merges
from ._notices import internal_deprecations_hidden

_PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd3": StableDiffusion3Pipeline,
    "sd3.5": StableDiffusion3Pipeline,
    "flux-dev": FluxPipeline,
    "flux-schnell": FluxPipeline,
    "qwen-image": QwenImagePipeline,
    "chroma": ChromaPipeline,
    "flux-kontext": FluxKontextPipeline,
    "flux2-dev": Flux2Pipeline,
    "flux2-klein": Flux2KleinPipeline,
}
TINY_KINDS: tuple[str, ...] = tuple(_PIPELINE_CLASSES)

# Guidance scales are the models' usual ones, so SD3 runs classifier-free guidance (batch 2 in the
# transformer) and Flux-dev feeds its guidance embedding. Chroma's guidance > 1 is a second transformer call per
# step (tests/test_two_call_guidance.py), so its runs here take guidance 1; Kontext's is distilled, like Flux-dev's.
# Text lengths: Qwen-Image's text is as long as the batch's longest prompt, at most its 8, which makes the test
# prompts one length, as the parametrised tests' references (no key mask) need (tests/test_qwen_image.py pads and
# masks); Flux.2's chat templates put tokens around the prompt (Klein a dozen; dev's system message about 35): the
# pipelines pad to 512.
TINY_GENERATION_KWARGS: dict[str, dict] = {
    kind: {"height": 64, "width": 64, "num_inference_steps": 2, "guidance_scale": guidance_scale,
           "max_sequence_length": max_sequence_length}
    for kind, guidance_scale, max_sequence_length in (
        ("sd3", 7.0, 16), ("sd3.5", 7.0, 16), ("flux-dev", 3.5, 16), ("flux-schnell", 0.0, 16),
        ("qwen-image", 1.0, 8), ("chroma", 1.0, 16), ("flux-kontext", 2.5, 16), ("flux2-dev", 4.0, 64),
        ("flux2-klein", 1.0, 32))
}

_COMMON_WORDS = """
    a an the of on in at to by for from with without and or but not no is are was be it its this that
    there here one two three four five six seven eight nine ten many some several few all each both
    very more most left right top bottom front back middle center side above below under over next
    behind near inside outside between beside around across along through up down into onto out off
    red green blue yellow orange purple pink black white gray grey brown golden silver gold colorful
    dark light bright pale shiny
    cat cats dog dogs bird birds horse cow sheep pig fish lion tiger bear elephant giraffe zebra monkey
    rabbit fox wolf mouse owl duck chicken frog snake turtle butterfly dragon unicorn robot
    man woman men women boy girl child children person people baby king queen knight astronaut wizard
    chef
    car cars bus truck bike bicycle motorcycle boat ship train plane airplane rocket
    house home building castle tower bridge church door window wall roof fence road street city town
    village tree trees flower flowers grass leaf leaves plant rose garden park field farm forest jungle
    desert mountain mountains hill river lake ocean sea beach island sky cloud clouds sun moon star
    stars rain snow fire water ice stone rock sand
    table chair bed sofa couch lamp clock cup mug glass bottle bowl plate vase box bag ball book
    books phone computer guitar piano umbrella hat shirt dress shoes glasses crown sword
    apple apples banana orange pizza cake bread cheese coffee tea sandwich
    room kitchen bedroom office library street shop market cafe restaurant space planet
    big small large tiny huge little tall short long round square old new young happy sad angry cute
    beautiful pretty ugly scary funny fluffy furry wooden metal glass plastic soft hard wet dry hot
    cold warm sunny cloudy rainy snowy foggy quiet busy empty full clean dirty
    sitting standing running walking jumping flying swimming eating drinking holding playing sleeping
    wearing riding reading looking smiling dancing singing lying floating painted made
    photo photograph picture image painting drawing sketch illustration portrait landscape poster
    render rendering art artwork style oil watercolor cartoon anime pixel digital realistic
    photorealistic cinematic detailed highly high quality resolution lighting light shadow shadows
    background foreground scene view close closeup shot camera lens focus bokeh sharp blurry hd
    circle square triangle cube sphere shape shapes line lines pattern text sign letter word words
    day night morning evening sunset sunrise summer winter spring autumn
"""
# Whole-word tokens of both tokenizers; any other text falls back to characters.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_COMMON_WORDS.split()))


def tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """A tiny random float32 pipeline of `kind` (one of `TINY_KINDS`), in eval mode.

    The same `kind` and `seed` always give the same weights; the caller's RNG is left alone.
    The pipeline is returned as `from_pretrained` loads it from `save_tiny_pipeline`'s files:
    CPU matmuls round differently depending on the weights' memory alignment, and loaded weights
    keep their (unaligned) offsets in the safetensors file, so only a loaded pipeline gives results
    bit-identical to any saved and reloaded copy of it.
    """
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as directory:
        path = save_tiny_pipeline(kind, directory, seed)
        with internal_deprecations_hidden():
            return _PIPELINE_CLASSES[kind].from_pretrained(path)


def save_tiny_pipeline(kind: str, directory: str | Path, seed: int = 0) -> Path:
    """Build the `tiny_pipeline(kind, seed)` weights and save them to `directory` (safetensors).

    Returns the path; ``from_pretrained(path)`` of the pipeline class loads the pipeline back.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {TINY_KINDS}")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]), internal_deprecations_hidden():
            pipe = _build(kind, seed)
    finally:
        torch.set_default_dtype(dtype)
    path = Path(directory)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A byte-level BPE `CLIPTokenizer` laid out like OpenAI's: bytes, bytes + "</w>", merges, specials.

    Every word of `WORDS` is one token. SD3's CLIP-G tokenizer pads with "!" (id 0) instead of
    "<|endoftext|>"; pass ``pad_token="!"`` to get that one.
    """
    byte_chars = list(bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(byte_chars + [c + "</w>" for c in byte_chars])}
    merges = word_merges(WORDS, vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def t5_tokenizer() -> T5Tokenizer:
    """A unigram `T5Tokenizer` with T5's special ids (pad 0, eos 1, unk 2) and "▁" word prefixes.

    Each word of `WORDS` is one piece ("▁cat"); anything else splits into characters, unknown
    characters become <unk>. Scores make a whole word always beat its characters.
    """
    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -10.0)]
    vocab += [("▁" + word, -5.0) for word in WORDS]
    vocab += [(prefix + c, -10.0) for prefix in ("▁", "") for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _byte_level_bpe(words) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A GPT-2-style byte-level BPE vocabulary (GPT-2's byte alphabet, then merges) in which each of `words` is one
    token, and its merges. A leading space is "Ġ" and no end-of-word mark, so "Ġcat" and "cat" are two words."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    return vocab, word_merges(words, vocab, end="")


# Qwen-Image's system prompt (`QwenImagePipeline.prompt_template_encode`), whose words the tiny Qwen2 tokenizer keeps
# whole so that the template's prefix is 34 tokens, as the real tokenizer makes it and the pipeline drops.
_QWEN_TEMPLATE_WORDS = ("system user assistant Describe the image by detailing color shape size texture quantity text "
                        "spatial relationships of objects and background").split()
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def qwen2_tokenizer(extra_words: tuple[str, ...] = (), extra_special: tuple[str, ...] = ()) -> Qwen2Tokenizer:
    """A byte-level BPE `Qwen2Tokenizer` laid out like Qwen2.5-VL's: GPT-2's byte alphabet, words with a leading
    "Ġ" (a space) or none, no end-of-word mark, and the chat template's special tokens.

    Every word of `WORDS` is one token with and without its space (the first word after the template's "user\n"
    has none); anything else falls back to bytes.
    """
    words = dict.fromkeys([*WORDS, *_QWEN_TEMPLATE_WORDS, *extra_words])
    vocab, merges = _byte_level_bpe([w for word in words for w in (word, "Ġ" + word)])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True) for t in (*QWEN_SPECIAL_TOKENS[1:], *extra_special)])
    return tokenizer


# Qwen3's chat template reduced to the messages Flux.2 Klein sends (one user turn, generation prompt, thinking
# off); it renders them exactly as Qwen3-4B's tokenizer_config.json does.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE `Qwen2Tokenizer` laid out like Qwen3's: bytes, merges, then the chat tokens.

    Every word of `WORDS` is one token, with or without its leading space ("Ġcat", "cat"); <|endoftext|> pads,
    <|im_start|> / <|im_end|> are special and <think> / </think> plain added tokens, as in Qwen3-4B, with
    `QWEN3_CHAT_TEMPLATE`.
    """
    # The chat roles are whole words too, as in Qwen3's vocabulary.
    vocab, merges = _byte_level_bpe([f for w in (*WORDS, "user", "assistant", "system") for f in ("Ġ" + w, w)])
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        vocab[special] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# Mistral-Small-3.1's chat template (which Flux.2 dev's processor carries), reduced to the messages Flux.2 dev
# sends (a system message, then one user turn of text blocks); it renders them as the real one does.
MISTRAL3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string "
    "else message['content'] | map(attribute='text') | join('') %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
_MISTRAL_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                     "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")


def mistral3_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer laid out like Flux.2 dev's: byte-level BPE (as Mistral's Tekken is) with Mistral's control tokens
    first (<unk>, <s>, </s>, [INST], ..., <pad>), each word of `WORDS` one token, right padding with <pad>, and
    `MISTRAL3_CHAT_TEMPLATE`.

    The real pipeline holds a `PixtralProcessor` around its tokenizer, which needs torchvision (absent here); for
    text the processor renders the same template and tokenizes with this tokenizer, without adding special tokens
    (the template writes <s>), as `tokenizer.apply_chat_template` does.
    """
    # The system message's words are whole tokens too, as in Mistral's vocabulary: the template stays short.
    words = dict.fromkeys((*WORDS, *re.findall(r"\w+", SYSTEM_MESSAGE)))
    pieces, merges = _byte_level_bpe([f for w in words for f in ("Ġ" + w, w)])
    vocab = {token: i for i, token in enumerate(_MISTRAL_SPECIALS)}
    vocab |= {piece: len(_MISTRAL_SPECIALS) + i for piece, i in pieces.items()}
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=131072,
                                        extra_special_tokens=list(_MISTRAL_SPECIALS[3:]))
    tokenizer.chat_template = MISTRAL3_CHAT_TEMPLATE
    return tokenizer


def _seed(seed: int, slot: int) -> None:
    # One seed per component, so resizing one model leaves the others' weights unchanged.
    torch.manual_seed(seed * 1000 + slot)


def _clip(tokenizer: CLIPTokenizer, hidden_size: int, hidden_act: str,
          projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    # Two layers at least: SD3 reads the penultimate hidden state.
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2,
                            max_position_embeddings=tokenizer.model_max_length, hidden_act=hidden_act,
                            projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer: T5Tokenizer, d_model: int) -> T5EncoderModel:
    # T5 v1.1 (gated GELU, untied embeddings), as used by SD3 and Flux.
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return T5EncoderModel(config)


def _qwen_text_encoder(tokenizer: Qwen2Tokenizer, width: int) -> Qwen2_5_VLForConditionalGeneration:
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2,
            # Sections of the rotary half-dimension for (time, height, width), as in Qwen2.5-VL's config.
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        # The vision tokens' ids where the tokenizer has them (Qwen-Image-Edit's); absent, the config's defaults.
        **{f"{name}_token_id": tokenizer.convert_tokens_to_ids(f"<|{token}|>") for name, token in
           (("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"))
           if f"<|{token}|>" in tokenizer.get_vocab()},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": width},
        vocab_size=len(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _decoder_config(tokenizer, hidden_size: int, layers: int, positions: int) -> dict:
    """The fields the Flux.2 text encoders' decoders share: 2 query heads on 1 key/value head."""
    return {"vocab_size": len(tokenizer), "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": hidden_size // 2, "max_position_embeddings": positions,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def _mistral3(tokenizer: PreTrainedTokenizerFast, hidden_size: int) -> Mistral3ForConditionalGeneration:
    # Flux.2 dev reads hidden states 10, 20 and 30 of Mistral-Small-3.1's 40 layers.
    text = MistralConfig(**_decoder_config(tokenizer, hidden_size, layers=30, positions=1024),
                         bos_token_id=tokenizer.bos_token_id)
    vision = PixtralVisionConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=hidden_size // 2, image_size=64, patch_size=16)
    config = Mistral3Config(vision_config=vision, text_config=text,
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2)
    return Mistral3ForConditionalGeneration(config)


def _qwen3(tokenizer: Qwen2Tokenizer, hidden_size: int) -> Qwen3ForCausalLM:
    # Klein reads hidden states 9, 18 and 27, as Qwen3-4B's 36 layers give them.
    config = Qwen3Config(**_decoder_config(tokenizer, hidden_size, layers=28, positions=512), tie_word_embeddings=True)
    return Qwen3ForCausalLM(config)


def _vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    # Four levels give the real scale factor 8; no quant convs, as in the SD3 and Flux VAEs.
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
                         sample_size=64, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def _flux2_vae() -> AutoencoderKLFlux2:
    # Scale factor 8, 32 latent channels and the batch-norm statistics of 2x2-patchified latents, as the real one.
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=32,
                             norm_num_groups=4, sample_size=64)
    # Non-trivial statistics, so a missing (de)normalisation shows in the tests.
    vae.bn.running_mean.normal_(0.0, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


# Every tiny transformer has 2 heads of 16 channels.
_HEADS = {"attention_head_dim": 16, "num_attention_heads": 2}
# Flux.1's and Chroma's: 16 latent channels packed 2x2, two double-stream and two single-stream blocks.
_FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 2,
                     "axes_dims_rope": (4, 6, 6), **_HEADS}


def _build(kind: str, seed: int) -> DiffusionPipeline:
    """The tiny pipeline of `kind`. Its `texts` pair each tokenizer with the text encoder made from it
    (``tokenizer``/``text_encoder``, ``tokenizer_2``/``text_encoder_2``, ...); the text encoders, `transformer` and
    `vae` are each made right after `_seed(seed, slot)`, their slots counted in that order."""
    options: dict = {}
    if kind.startswith("sd3"):
        # Widths: CLIP-L 16 + CLIP-G 32 <= T5 64, so the CLIP half of the text is really zero-padded.
        texts = [(clip_tokenizer(), partial(_clip, hidden_size=16, hidden_act="quick_gelu", projection=True)),
                 (clip_tokenizer(pad_token="!"), partial(_clip, hidden_size=32, hidden_act="gelu", projection=True)),
                 (t5_tokenizer(), partial(_t5, d_model=64))]
        # SD3.5-Medium: qk RMSNorm, and an extra image-only attention (attn2) in the first blocks.
        layout = ({"num_layers": 2} if kind == "sd3"
                  else {"num_layers": 3, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
        transformer = partial(SD3Transformer2DModel, sample_size=8, patch_size=2, in_channels=16, out_channels=16,
                              joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=16 + 32,
                              pos_embed_max_size=32, **_HEADS, **layout)
        vae = partial(_vae, scaling_factor=1.5305, shift_factor=0.0609)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif kind == "qwen-image":
        texts = [(qwen2_tokenizer(), partial(_qwen_text_encoder, width=32))]
        transformer = partial(QwenImageTransformer2DModel, patch_size=2, in_channels=64, out_channels=16, num_layers=3,
                              joint_attention_dim=32, axes_dims_rope=(4, 6, 6), **_HEADS)
        # Three spatial downsamplings give the real scale factor 8; 16 latent channels as the real VAE.
        vae = partial(AutoencoderKLQwenImage, base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True])
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                                    shift_terminal=0.02, time_shift_type="exponential")
    elif kind.startswith("flux2"):
        klein = kind == "flux2-klein"
        texts = [(qwen3_tokenizer(), partial(_qwen3, hidden_size=16)) if klein else
                 (mistral3_tokenizer(), partial(_mistral3, hidden_size=16))]
        # 32 latent channels packed 2x2; three text-encoder hidden states side by side.
        transformer = partial(Flux2Transformer2DModel, patch_size=1, in_channels=128, num_layers=2, num_single_layers=2,
                              joint_attention_dim=3 * 16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=not klein,
                              **_HEADS)
        vae = _flux2_vae
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
        if klein:
            # The distilled Klein models (4 steps, no guidance); the base ones differ only in `is_distilled`.
            options = {"is_distilled": True}
    elif kind == "chroma":
        texts = [(t5_tokenizer(), partial(_t5, d_model=64))]
        transformer = partial(ChromaTransformer2DModel, joint_attention_dim=64, approximator_num_channels=16,
                              approximator_hidden_dim=32, approximator_layers=1, **_FLUX_TRANSFORMER)
        vae = partial(_vae, scaling_factor=0.3611, shift_factor=0.1159)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    else:  # Flux.1 dev, schnell and Kontext
        guided = kind in ("flux-dev", "flux-kontext")
        texts = [(clip_tokenizer(), partial(_clip, hidden_size=16, hidden_act="quick_gelu", projection=False)),
                 (t5_tokenizer(), partial(_t5, d_model=64))]
        transformer = partial(FluxTransformer2DModel, joint_attention_dim=64, pooled_projection_dim=16,
                              guidance_embeds=guided, **_FLUX_TRANSFORMER)
        vae = partial(_vae, scaling_factor=0.3611, shift_factor=0.1159)
        scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True) if guided
                     else FlowMatchEulerDiscreteScheduler(shift=1.0))
    components = {"scheduler": scheduler, **options}
    models = []
    for i, (tokenizer, text_encoder) in enumerate(texts):
        suffix = f"_{i + 1}" if i else ""
        components["tokenizer" + suffix] = tokenizer
        models.append(("text_encoder" + suffix, partial(text_encoder, tokenizer)))
    # Chroma's T5, transformer and VAE keep Flux's slots 1-3 (it has no CLIP).
    for slot, (name, make) in enumerate([*models, ("transformer", transformer), ("vae", vae)],
                                        start=int(kind == "chroma")):
        _seed(seed, slot)
        components[name] = make()
    return _PIPELINE_CLASSES[kind](**components)

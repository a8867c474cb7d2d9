"""The toy MM-DiT: a stock `StableDiffusion3Pipeline` at Shapes-world size.

Pixel space 32x32 through a near-identity VAE (no downsampling, 4 latent channels), patch 4,
so the transformer sees an 8x8 token grid. Two tiny word-level CLIP encoders, no T5 (the
pipeline feeds zeros in its place, as SD3 allows).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from .tokenizer import build_tokenizer
from .world import IMAGE_SIZE

CLIP_LENGTH = 22  # longest caption is 21 tokens with BOS/EOS
T5_LENGTH = 4  # zeros: SD3 without T5. Trained with this length, so generate with it too.
# The pipeline feeds the transformer CLIP's hidden_states[-2]. With 2 layers that is the output of
# one causal layer, so a phrase's last word has seen the whole phrase, and image queries read that
# word (hence captions put the place first: world._object_phrase). With 1 layer each text token is
# its own word's embedding (the pooled vector still sees the caption); the transformer then failed
# to bind words to objects (README).
TEXT_LAYERS = 2  # the shipped weights
WEIGHTS_DIR = Path(__file__).parent / "weights"


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(16,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def build_text_encoder(vocab_size: int, seed: int, layers: int = TEXT_LAYERS) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE,
        patch_size=4,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=6,
        joint_attention_dim=128,  # the two CLIP widths, 64 + 64
        caption_projection_dim=192,
        pooled_projection_dim=64,  # the two CLIP projections, 32 + 32
        pos_embed_max_size=IMAGE_SIZE // 4,
    )


def build_pipeline(seed: int = 0, text_layers: int = TEXT_LAYERS) -> StableDiffusion3Pipeline:
    """A freshly initialised (untrained) toy pipeline."""
    tokenizer = build_tokenizer(CLIP_LENGTH)
    torch.manual_seed(seed)
    vae = build_vae()
    transformer = build_transformer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=vae,
        text_encoder=build_text_encoder(len(tokenizer), seed + 1, text_layers).eval(),
        tokenizer=tokenizer,
        text_encoder_2=build_text_encoder(len(tokenizer), seed + 2, text_layers).eval(),
        tokenizer_2=build_tokenizer(CLIP_LENGTH),
        text_encoder_3=None,
        tokenizer_3=None,
    )

"""Flux.2 (`Flux2Transformer2DModel`): Flux.2 dev (`Flux2Pipeline`, Mistral-3 text encoder) and Flux.2 Klein
(`Flux2KleinPipeline`, Qwen3 text encoder).

Joint sequence [text | image | reference]: the reference images' tokens (`image=`, one image or a list) follow
the image's in the image stream, each reference's in its own raster order, the references in the order given, at
RoPE time coordinate T = 10 + 10 i for reference i (the image at T = 0). They are the "reference" region: taps
`hook_q_ref`, ... and the maps R2I, I2R and T2R, over a reference grid that stacks the references top to bottom
(first on top), which needs them the same width in tokens. The text is the prompt inside the text encoder's
chat template, padded to `max_sequence_length` (512) with no attention mask; the transformer reads three hidden
states of the encoder side by side.
Global block numbering: double-stream blocks 0..D-1, then single-stream blocks D..D+S-1 (dev: 8 + 48, Klein 4B:
5 + 20). Single-stream blocks run attention and MLP in parallel from one fused projection
(`Flux2ParallelSelfAttention`); their q/k/v taps hold the attention part of it. RoPE has four axes (T, H, W, L)
and is applied after the qk-norms, so q/k taps hold rotated vectors, as for Flux.1.

Latents: the VAE's 32 channels are patchified 2x2 into 128, normalised by the VAE's batch-norm statistics, and
packed into tokens. The pipeline's `latents=` argument, `initial_noise`, `pack_latents` and the sampling paths
(`mmdit_probe.sampling`) use the patchified normalised grid (batch, 128, rows, cols); the transformer and the
step callbacks see it packed (batch, rows x cols, 128).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .. import validation
from .base import Attention, DoubleAndSingleBlocks, TextSegment
from .flux import FluxTapProcessor, reference_tokens


class Flux2TapProcessor(FluxTapProcessor):
    """Shared part of Flux.2's tapped processors, Flux.1's (`FluxTapProcessor`): taps, attention (with its
    log-sum-exp while recording) and the concept stream's share, over q/k/v of the joint [text | image | reference]
    sequence after norms and RoPE. The image stream ends with `reference_length` reference tokens, which the family
    sets before each transformer call.

    Attention runs through diffusers' `dispatch_attention_fn`, as in `Flux2AttnProcessor`, so GPU backends stay
    selectable.
    """

    contiguous_outputs = False


class Flux2DoubleTapProcessor(Flux2TapProcessor):
    """`Flux2AttnProcessor` (double-stream blocks) with taps: Flux.1's double-stream processor, whose operations it
    runs in the same order; out taps after each stream's output projection."""


class Flux2SingleTapProcessor(Flux2TapProcessor):
    """`Flux2ParallelSelfAttnProcessor` (single-stream blocks) with taps. One fused projection gives q/k/v and
    the MLP input; out taps hold the attention output before the fused output projection, which mixes it with
    the MLP's. The block sets `text_length`, the joint sequence's text rows, before each call (see
    `DoubleAndSingleBlocks.install_taps`)."""

    def forward(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **kwargs):
        n_text = self.text_length
        if n_text is None:
            raise RuntimeError("single-stream tap processor called without its block setting text_length")
        if self.concept_mode:  # only the concept rows: the one-token dummy image after them gets zeros
            return torch.cat([self._parallel(attn, hidden_states[:, :n_text], image_rotary_emb, None, None),
                              torch.zeros_like(hidden_states[:, n_text:])], dim=1)
        return self._parallel(attn, hidden_states, image_rotary_emb, attention_mask, n_text)

    def _parallel(self, attn, hidden_states, image_rotary_emb, attention_mask, n_text):
        projected = attn.to_qkv_mlp_proj(hidden_states)
        # Split by the global QKV:MLP ratio, as the stock processor does (it holds under column sharding too).
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = projected.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(projected, [local_qkv, projected.shape[-1] - local_qkv], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in qkv.chunk(3, dim=-1))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if n_text is None:  # concept call
            out = self._concept_attention(q, k, v, image_rotary_emb)
        else:
            if image_rotary_emb is not None:
                q, k = (apply_rotary_emb(t, image_rotary_emb, sequence_dim=1) for t in (q, k))
            text, image, n_image = self._attend(q, k, v, n_text, attention_mask)
            image = self.tap_image_out(image, n_image)  # the image output's taps fire first, as in every family
            out = torch.cat([self.hook_out_txt(text), image], dim=1)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class Flux2Family(DoubleAndSingleBlocks):
    name = "flux2"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline")
    transformer_class = "Flux2Transformer2DModel"
    image_first = False
    latent_channels_divisor = 4  # in_channels are the VAE's channels patchified 2x2
    # Flux.2 dev is guidance-distilled (guidance is an input); Klein base models' classifier-free guidance runs two
    # transformer calls per step, never a doubled batch (`calls_per_step`).
    batched_guidance = False
    has_reference = True
    max_input_images = None  # the pipelines take a list of any length (BFL recommends at most 6 for dev, 4 for Klein)
    second_call = "Flux.2 Klein base models' classifier-free guidance, guidance_scale > 1"

    @property
    def two_call_guidance(self) -> bool:
        """A Klein base model (`is_distilled` False in its config) runs two calls at guidance_scale > 1: the prompt's,
        then the empty negative prompt's (`Flux2KleinPipeline.do_classifier_free_guidance`)."""
        return type(self.pipeline).__name__ == "Flux2KleinPipeline" and not self.pipeline.config.is_distilled

    # -- text --------------------------------------------------------------
    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        klein = type(self.pipeline).__name__ == "Flux2KleinPipeline"
        return [TextSegment("qwen3" if klein else "mistral3", "tokenizer", "text_encoder", 0, max_sequence_length,
                            template=self.chat_text)]

    def chat_text(self, prompt: str) -> str:
        """The prompt inside the text encoder's chat template, as the pipeline renders it before tokenizing."""
        pipe = self.pipeline
        if type(pipe).__name__ == "Flux2KleinPipeline":  # `Flux2KleinPipeline._get_qwen3_prompt_embeds`
            return pipe.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        return pipe.tokenizer.apply_chat_template(format_input([prompt], pipe.system_message)[0], tokenize=False,
                                                  add_generation_prompt=False)

    # -- reference images ----------------------------------------------------
    reference_length = staticmethod(reference_tokens)

    def reference_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int]]:
        """Each reference image's token grid, in order, as `Flux2Pipeline.__call__` sizes it: shrunk to 1024^2
        pixels where larger, then cut to whole tokens."""
        images = inputs.get("image")
        if images is None:
            return []
        grids = []
        for image in images if isinstance(images, list) else [images]:
            width, height = image.size  # the pipelines take PIL images only
            if width * height > 1024 * 1024:
                width, height = self.pipeline.image_processor._resize_to_target_area(image, 1024 * 1024).size
            grids.append(self.grid(height, width))
        return grids

    def reference_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """The reference region's token grid: the reference images' grids stacked top to bottom, first on top
        (their tokens' order in the sequence), so they must be the same width in tokens.

        Example: references of 512 x 768 and 256 x 768 pixels (height x width) give (32 + 16, 48)."""
        grids = self.reference_grids(inputs)
        if not grids:
            return None
        if len({cols for _, cols in grids}) > 1:
            raise validation.InvalidInput(
                f"reference maps stack the reference images top to bottom, so they need the same width in tokens "
                f"({self.token_pixels} pixels each); these have token grids {grids} (rows, cols): resize them to one "
                f"width, or record without the reference kinds")
        return sum(rows for rows, _ in grids), grids[0][1]

    # -- latents -----------------------------------------------------------
    def initial_noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """One initial latent as the pipeline draws it for `seed`, in the (batch, 128, rows, cols) grid its
        `latents=` argument takes, repeated `batch` times."""
        packed = super().initial_noise(1, height, width, seed)
        rows, cols = self.grid(height, width)
        return self.unpack_tokens(packed, rows, cols).repeat(batch, 1, 1, 1)

    @staticmethod
    def unpack_tokens(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Packed (batch, rows x cols, channels) tokens as the (batch, channels, rows, cols) grid."""
        return tokens.transpose(1, 2).unflatten(2, (rows, cols))

    def transformer_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Grid latents packed into tokens, as the pipeline hands them to the transformer (tokens pass)."""
        return self.pipeline._pack_latents(latents) if latents.ndim == 4 else latents

    def transformer_output(self, velocity: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The transformer's packed output in the layout of `like` (grid or tokens)."""
        return self.unpack_tokens(velocity, *like.shape[2:]) if velocity.ndim == 3 and like.ndim == 4 else velocity

    def mask_to_latents(self, mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # Packed latents (step callbacks) are (tokens, channels) in the grid's raster order; grid latents
        # (channels, rows, cols); VAE latents (Klein's latent output) (channels, 2 rows, 2 cols).
        if len(latent_shape) == 2:
            return mask.flatten()[:, None]
        factor = latent_shape[-1] // mask.shape[-1]
        return mask.repeat_interleave(factor, 0).repeat_interleave(factor, 1)[None]

    def _batch_norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipeline.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (batch, 32, H, W) patchified 2x2 and normalised, as `Flux2Pipeline._encode_vae_image`."""
        patched = self.pipeline._patchify_latents(latents)
        mean, std = self._batch_norm(patched)
        return (patched - mean) / std

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Grid (or packed) latents back to VAE latents, as the pipelines decode them."""
        if latents.ndim == 3:
            latents = self.unpack_tokens(latents, *self.grid(height, width))
        mean, std = self._batch_norm(latents)
        return self.pipeline._unpatchify_latents(latents * std + mean)

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        # The batch norm replaces the shift and scale factors other VAEs have.
        return self.pack_latents(z)

    def latents_to_vae(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.unpack_latents(latents, height, width)

    # -- taps ----------------------------------------------------------------
    def make_processor(self, attention: Attention, stock) -> Flux2TapProcessor:
        single = attention.block >= self.num_double
        return (Flux2SingleTapProcessor if single else Flux2DoubleTapProcessor)(self.streams(attention))

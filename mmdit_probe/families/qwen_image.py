"""Qwen-Image (`QwenImageTransformer2DModel`): 60 double-stream blocks, joint sequence [text | image].

The text is the Qwen2.5-VL hidden states of the prompt inside the pipeline's chat template, the template's first 34
tokens dropped (`QwenImagePipeline.prompt_template_encode_start_idx`): the prompt's tokens, then the template's
closing ``<|im_end|>\\n<|im_start|>assistant\\n``. The batch's text is as long as its longest prompt (at most
`max_sequence_length`), right-padded; the padding is masked out of the keys (`encoder_hidden_states_mask`; None when
no prompt is padded). MSRoPE rotates image q/k by (frame, row, column) and text q/k by diagonal positions after the
image's; q/k taps hold the rotated vectors, as for Flux. The VAE is a video VAE: latents (batch, 16, 1, h, w).

Qwen-Image-Edit (`qwen_image_edit.py`) feeds the input image's packed latents after the noise latents in the image
stream, each image with its own frame index in `img_shapes`: the image stream's last `reference_length` tokens, which
this processor taps as the "ref" stream where its family has a reference region.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .. import validation
from ..kernels import attention_with_lse, chunked_logsumexp
from ..names import STREAMS
from ..taps import TapProcessor, project_qkv, qk_norms
from .base import Attention, Family, TextSegment


def _ignored_guidance(record: logging.LogRecord) -> bool:
    return not record.getMessage().endswith("ignored since the model is not guidance-distilled.")


def _quiet_ignored_guidance() -> None:
    """Every probe's inputs carry `guidance_scale` (`Family.guidance_inputs`), which the Qwen-Image pipelines log as
    ignored on each call for checkpoints without guidance distillation: that notice says nothing to a probe user."""
    for name in ("pipeline_qwenimage", "pipeline_qwenimage_img2img", "pipeline_qwenimage_edit",
                 "pipeline_qwenimage_edit_plus"):
        logger = logging.getLogger(f"diffusers.pipelines.qwenimage.{name}")
        if _ignored_guidance not in logger.filters:
            logger.addFilter(_ignored_guidance)


def _project(attn, states: torch.Tensor, stream: str) -> tuple[torch.Tensor, ...]:
    """One stream's q, k, v (batch, tokens, heads, dim), q and k after that stream's RMSNorm."""
    head_dim = attn.inner_dim // attn.heads
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in project_qkv(attn, states, stream))
    return (*qk_norms(attn, stream, q, k), v)


def _rotate(q: torch.Tensor, k: torch.Tensor, freqs) -> tuple[torch.Tensor, torch.Tensor]:
    # Imported here: diffusers' transformers package takes seconds to import, and only a Qwen-Image pipeline (which
    # has imported it already) gets here.
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    return apply_rotary_emb_qwen(q, freqs, use_real=False), apply_rotary_emb_qwen(k, freqs, use_real=False)


class QwenImageTapProcessor(TapProcessor):
    """`QwenDoubleStreamAttnProcessor2_0` with taps: the same operations in the same order, attention through
    diffusers' `dispatch_attention_fn` with the same joint key mask, so GPU backends stay selectable.

    While maps are recorded under a key mask, the attention still runs through `dispatch_attention_fn` (the stock
    output, bit for bit) and each query's log-sum-exp is computed over the unmasked keys only, as the kernel
    normalises.
    """

    attends = True

    def __init__(self, streams: tuple[str, ...] = STREAMS) -> None:
        super().__init__(streams)
        self._concept_freqs = None  # the first text position's rotation, for concept tokens
        # The image stream's trailing reference tokens (Qwen-Image-Edit's input image); its family sets this before
        # each transformer call.
        self.reference_length = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        # diffusers' `Attention` hands a processor only the keywords its `__call__` names (nn.Module's names none).
        return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                attention_mask, image_rotary_emb)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError("QwenImageTapProcessor requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("QwenImageTapProcessor does not accept an external attention_mask; pass "
                             "encoder_hidden_states_mask, as the stock processor requires")
        if self.concept_mode:
            return self._concepts_forward(attn, hidden_states, encoder_hidden_states)
        mask = None
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        n_text = encoder_hidden_states.shape[1]

        q, k, v = _project(attn, hidden_states, "img")
        tq, tk, tv = _project(attn, encoder_hidden_states, "txt")
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            q, k = _rotate(q, k, image_freqs)
            tq, tk = _rotate(tq, tk, text_freqs)
            if self.concepts is not None:
                self._concept_freqs = text_freqs[:1]

        q, k, v = (torch.cat([t, i], dim=1) for t, i in zip((tq, tk, tv), (q, k, v)))
        q, k, v, n_image = self.tap_joint(q, k, v, n_text, self.reference_length)

        def stock():  # in the taps' layout, (batch, heads, tokens, dim): transposes of views, so bit-identical
            if self.record_lse and mask is None:
                return attention_with_lse(*(t.transpose(1, 2) for t in (q, k, v)))
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            lse = chunked_logsumexp(q.transpose(1, 2), k.transpose(1, 2), attn_mask=mask) if self.record_lse else None
            return out.transpose(1, 2), lse

        out = self.attend_joint(*(t.transpose(1, 2) for t in (q, k, v)), n_text, n_image, stock, mask).transpose(1, 2)
        out = out.flatten(2, 3).to(q.dtype)
        text_out, image_out = out[:, :n_text], out[:, n_text:]
        if self.concepts is not None:
            self.concepts.keep(*(t[:, n_text:n_text + n_image].transpose(1, 2) for t in (q, k, v)),
                               image_out[:, :n_image])
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        image_out = self.tap_image_out(image_out, n_image)
        return image_out, self.hook_out_txt(attn.to_add_out(text_out.contiguous()))

    def _concepts_forward(self, attn, hidden_states, encoder_hidden_states):
        """The block's concept call: the concept tokens, projected and normed as the text is and rotated as the
        prompt's first text token, attend to the image keys kept from the block's own call and to each other. The
        dummy image gets zeros. No taps."""
        cq, ck, cv = _project(attn, encoder_hidden_states, "txt")
        if self._concept_freqs is not None:
            freqs = self._concept_freqs.expand(cq.shape[1], -1)
            cq, ck = _rotate(cq, ck, freqs)
        out = self.concepts.attend(*(t.transpose(1, 2) for t in (cq, ck, cv))).to(cq.dtype)
        return torch.zeros_like(hidden_states), attn.to_add_out(out)


class QwenImageFamily(Family):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline")
    transformer_class = "QwenImageTransformer2DModel"
    image_first = False
    latent_channels_divisor = 4
    # True CFG runs the negative prompt as a second transformer call per step, never a doubled batch
    # (`Family.calls_per_step`).
    batched_guidance = False
    # Its attention is diffusers' legacy `Attention`, which the transformer's `fuse_qkv_projections()` skips.
    fuses_qkv = False
    # Qwen-Image's scheduler stretches its sigmas to `shift_terminal` (0.02): one step divides 0 by 0 (NaN sigma).
    min_steps, min_steps_why = 2, "its scheduler's shift_terminal makes a one-step schedule NaN"

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        _quiet_ignored_guidance()

    def guidance_inputs(self, guidance: float) -> dict[str, Any]:
        """Guidance is true CFG (`true_cfg_scale`), which takes effect with a `negative_prompt` (the model card's is
        " "), as a second transformer call per step. `guidance_scale` feeds only guidance-distilled checkpoints."""
        return {"guidance_scale": guidance, "true_cfg_scale": guidance}

    def _attentions(self) -> list[Attention]:
        return [Attention(i, "attn", f"transformer_blocks.{i}.attn", True)
                for i in range(len(self.transformer.transformer_blocks))]

    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        return [TextSegment("qwen", "tokenizer", "text_encoder", 0, max_sequence_length,
                            template=self.chat_template().format, drop=self.pipeline.prompt_template_encode_start_idx)]

    def chat_template(self) -> str:
        """The chat template the pipeline puts the prompt in ("{}" marks it); its first
        `prompt_template_encode_start_idx` tokens are dropped."""
        return self.pipeline.prompt_template_encode

    def embed_text(self, embeds: torch.Tensor) -> torch.Tensor:
        """The transformer's own text input: RMSNorm, then the linear `txt_in`."""
        return self.transformer.txt_in(self.transformer.txt_norm(embeds))

    def text_key_mask(self, tables, positions: list[int]) -> torch.Tensor | None:
        """The pipeline's `prompt_embeds_mask` at these positions: each prompt's real tokens; None when no prompt of
        the batch is padded (the pipeline then passes no mask). Positions past the batch's text are refused."""
        length = max(len(t.real_positions) for t in tables)
        beyond = [p for p in positions if p >= length]
        if beyond:
            raise validation.InvalidInput(
                f"text positions {beyond[:5]} are past this batch's text: Qwen-Image's text is as long as the longest "
                f"prompt ({length} tokens, the chat template's closing tokens included); record positions below "
                f"{length} (positions='real' or words)")
        real = [set(t.real_positions) for t in tables]
        mask = torch.tensor([[p in r for p in positions] for r in real], dtype=torch.bool)
        every = all(len(r) == length for r in real)
        return None if every else mask

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (batch, channels, 1, height, width), or without the frame axis, packed as the pipeline packs."""
        batch, channels = latents.shape[:2]
        return self.pipeline._pack_latents(latents, batch, channels, *latents.shape[-2:])

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents to the VAE's (batch, channels, 1, height, width)."""
        return self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """The video VAE's latents normalised per channel by `latents_mean` / `latents_std` (no shift and scale),
        then packed."""
        mean, inverse_std = self._latent_stats(z)
        return self.pack_latents((z - mean) * inverse_std)

    def latents_to_vae(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        z = self.unpack_latents(latents, height, width)
        mean, inverse_std = self._latent_stats(z)
        return z / inverse_std + mean

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel mean and 1 / std, computed as the Qwen-Image pipelines compute them (same rounding)."""
        config, shape = self.pipeline.vae.config, (1, -1, 1, 1, 1)
        return (torch.tensor(config.latents_mean).view(shape).to(z.device, z.dtype),
                (1.0 / torch.tensor(config.latents_std).view(shape)).to(z.device, z.dtype))

    def make_processor(self, attention: Attention, stock) -> QwenImageTapProcessor:
        return QwenImageTapProcessor(self.streams(attention))

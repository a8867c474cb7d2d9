"""SD3 / SD3.5 (`SD3Transformer2DModel`): joint sequence [image | text], text = CLIP 77 + T5."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import attention_with_lse
from ..taps import TapProcessor, project_qkv, qk_norms
from .base import Attention, Family, TextSegment


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim), a view as in the stock processor."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _project(attn, states: torch.Tensor, stream: str) -> tuple[torch.Tensor, ...]:
    """One stream's q, k, v in heads, q and k after that stream's norms (SD3.5's RMSNorm; SD3 has none)."""
    q, k, v = (_heads(t, attn.heads) for t in project_qkv(attn, states, stream))
    return (*qk_norms(attn, stream, q, k), v)


class SD3TapProcessor(TapProcessor):
    """`JointAttnProcessor2_0` with taps; the same operations in the same order.

    Called with text (joint attention) or without (SD3.5-M `attn2`: image-only self-attention).
    Also serves modules whose projections were fused by `fuse_qkv_projections()`.
    """

    attends = True

    def __init__(self, has_text: bool = True) -> None:
        super().__init__(("img", "txt") if has_text else ("img",))

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if self.concept_mode:
            return self._concepts_forward(attn, hidden_states, encoder_hidden_states)
        n_image = hidden_states.shape[1]
        q, k, v = self.tap_qkv("img", *_project(attn, hidden_states, "img"))

        if encoder_hidden_states is not None:
            tq, tk, tv = self.tap_qkv("txt", *_project(attn, encoder_hidden_states, "txt"))
            q, k, v = torch.cat([q, tq], dim=2), torch.cat([k, tk], dim=2), torch.cat([v, tv], dim=2)

        def stock():
            if self.record_lse:
                return attention_with_lse(q, k, v)
            return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False), None

        streams = {"img": slice(0, n_image), **({"txt": slice(n_image, None)} if encoder_hidden_states is not None
                                                else {})}
        out, lse = self.attend(q, k, v, streams, stock)
        if self.record_lse:
            self.hook_lse_img(lse[:, :, :n_image])
            if encoder_hidden_states is not None:
                self.hook_lse_txt(lse[:, :, n_image:])
        out = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(q.dtype)

        if self.concepts is not None:
            self.concepts.keep(*(t[:, :, :n_image] for t in (q, k, v)), out[:, :n_image])
        image = self.hook_out_img(attn.to_out[1](attn.to_out[0](out[:, :n_image])))
        if encoder_hidden_states is None:
            return image
        text = out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, self.hook_out_txt(text)

    def _concepts_forward(self, attn, hidden_states, encoder_hidden_states):
        """The block's concept call: the text stream's projections and norms on the concept tokens, which attend
        to the image keys kept from the block's own call and to each other; the dummy image gets zeros. No taps."""
        if encoder_hidden_states is None:  # SD3.5-M attn2: image only, concepts take no part
            return torch.zeros_like(hidden_states)
        cq, ck, cv = _project(attn, encoder_hidden_states, "txt")
        out = self.concepts.attend(cq, ck, cv).to(cq.dtype)
        return torch.zeros_like(hidden_states), out if attn.context_pre_only else attn.to_add_out(out)


class SD3Family(Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    transformer_class = "SD3Transformer2DModel"
    image_first = True

    def _attentions(self) -> list[Attention]:
        found = []
        for i, block in enumerate(self.transformer.transformer_blocks):
            found.append(Attention(i, "attn", f"transformer_blocks.{i}.attn", has_text=True))
            if getattr(block, "attn2", None) is not None:
                found.append(Attention(i, "attn2", f"transformer_blocks.{i}.attn2", has_text=False))
        return found

    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        clip = self.pipeline.tokenizer_max_length
        # Without T5 the pipeline still appends `max_sequence_length` zero rows: positions, no tokens.
        return [TextSegment("clip", "tokenizer", "text_encoder", 0, clip),
                TextSegment("t5", "tokenizer_3", "text_encoder_3", clip, max_sequence_length)]

    @property
    def token_pixels(self) -> int:
        """The side in pixels of the square an image token covers (VAE factor x patch size)."""
        return self.pipeline.vae_scale_factor * self.transformer.config.patch_size

    @property
    def max_image_side(self) -> int | None:
        """SD3 crops its positional embedding from a table of `pos_embed_max_size` patches a side and diffusers refuses
        larger latents mid-run: at most that many tokens a side (None where a model has no table)."""
        table = getattr(self.transformer.config, "pos_embed_max_size", None)
        return None if table is None else table * self.token_pixels

    def mask_to_latents(self, mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # Latents are (channels, height, width); each token covers a patch of latent pixels.
        patch = self.transformer.config.patch_size
        return mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None]

    def make_processor(self, attention: Attention, stock) -> SD3TapProcessor:
        return SD3TapProcessor(has_text=attention.has_text)

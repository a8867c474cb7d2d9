"""Chroma (`ChromaTransformer2DModel`): Flux.1's blocks and processors, text = T5 only, with an attention mask.

`ChromaPipeline` keeps each prompt's real T5 tokens and the first pad token (the key vector m); every
block builds the outer product m m^T, (batch, 1, tokens, tokens) over [text | image], and passes it to
`FluxAttnProcessor`, which hands it to `dispatch_attention_fn` (diffusers 0.42.1). The pipeline makes m
in the text encoder's floating dtype, so the kernel *adds* m_i m_j to the logits (1 between two kept
tokens, 0 where a pad token is involved) rather than masking: recorded maps apply the same mask the same
way. Single-stream blocks take the joint sequence alone (no text argument) and return it; classifier-free
guidance is a second transformer call per step (not a doubled batch), the negative prompt's, under its own mask.
"""

from __future__ import annotations

from typing import Any

from .base import TextSegment
from .flux import FluxFamily


class ChromaFamily(FluxFamily):
    name = "chroma"
    pipeline_classes = ("ChromaPipeline",)
    transformer_class = "ChromaTransformer2DModel"
    masks_attention = True

    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        return [TextSegment("t5", "tokenizer", "text_encoder", 0, max_sequence_length)]

    # Two calls at guidance_scale > 1: the prompt's, then the negative prompt's ("" by default), each with its own
    # attention mask.
    two_call_guidance = True
    second_call = "Chroma's classifier-free guidance, guidance_scale > 1"

    def concept_call(self, block: int, call: dict[str, Any], state, dummy):
        """A single-stream block's concept call: the concepts then the dummy image as its one joint sequence, the
        prompt's mask left out (it is the prompt's, not the concepts'); its output's concept rows are the new state."""
        if not self.is_single(block):
            return super().concept_call(block, call, state, dummy)
        import torch

        module = self.transformer.get_submodule(self.block_path(block))
        module.attn.processor.text_length = state.shape[1]
        call = {k: v for k, v in call.items() if k != "attention_mask"}
        call["hidden_states"] = torch.cat([state, dummy], dim=1)
        return call, lambda output: output[:, :state.shape[1]]

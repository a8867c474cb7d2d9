"""Flux.1 Kontext (`FluxKontextPipeline` over `FluxTransformer2DModel`): Flux.1 with a context image.

The context image's packed latents follow the output's in the image stream, so each block sees
[text | image | reference]; the pipeline marks the reference tokens with 1 on RoPE axis 0 of their
position ids (the output's are 0), the rows and columns of both grids counting from 0 (diffusers 0.42).
Those tokens are the "reference" region: taps `hook_q_ref`, ... and the maps R2I, I2R and T2R.
"""

from __future__ import annotations

from typing import Any

import torch

from .flux import FluxFamily, reference_tokens


class FluxKontextFamily(FluxFamily):
    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    has_reference = True

    reference_length = staticmethod(reference_tokens)

    def reference_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """The context image's token grid as `FluxKontextPipeline.__call__` sizes it: the image's own size, or with
        `_auto_resize` (the default) the preferred Kontext resolution of the nearest aspect ratio, cut to whole
        tokens."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        image = inputs.get("image")
        if image is None:
            return None
        pipe = self.pipeline
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == pipe.latent_channels:
            return image.shape[2] // 2, image.shape[3] // 2  # latents: packed 2x2
        first = image[0] if isinstance(image, list) else image
        height, width = pipe.image_processor.get_default_height_width(first)
        if inputs.get("_auto_resize", True):
            _, width, height = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return self.grid(height, width)  # whole tokens: the pipeline cuts the sides to multiples of a token too

    def pipeline_arguments(self, height: int, width: int) -> dict[str, Any]:
        """The pipeline sizes its output to `max_area` (default 1024^2), whatever height and width say: keep the
        asked size."""
        return {"max_area": height * width}

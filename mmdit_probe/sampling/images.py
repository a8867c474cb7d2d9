"""Images in and out of the sampler's latent layout: check and size a real image, encode, decode, compare."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from .. import validation


def as_image(image, size: tuple[int, int], quiet: bool = False) -> Image.Image:
    """An RGB PIL image of `size` (width, height) from a real image, checked first (`validation.real_image`); other
    modes are converted, other sizes resized, with a warning (unless `quiet`)."""
    image = validation.real_image(image)
    if image.mode != "RGB":
        if not quiet:
            warnings.warn(f"converting a {image.mode} image to RGB", stacklevel=3)
        image = image.convert("RGB")
    if image.size != size:
        if not quiet:
            warnings.warn(f"resizing the image from {image.size} to {size} (the model's resolution)", stacklevel=3)
        image = image.resize(size, Image.BICUBIC)
    return image


def encode(probe, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """A PIL image to sampler-layout latents, as the pipeline's VAE encodes (its mode, normalised as the family
    does: shifted and scaled, or Flux.2's batch norm)."""
    pipe = probe.pipeline
    pixels = pipe.image_processor.preprocess(image, height=height, width=width)
    pixels = pixels.to(device=pipe.vae.device, dtype=pipe.vae.dtype)
    with torch.no_grad():
        z = pipe.vae.encode(pixels[:, :, None] if _is_video(pipe.vae) else pixels).latent_dist.mode()
    return probe.family.latents_from_vae(z)


@torch.no_grad()
def decode(probe, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
    """Sampler-layout latents to PIL images, as the pipeline decodes them."""
    pipe = probe.pipeline
    z = probe.family.latents_to_vae(latents, height, width).to(pipe.vae.dtype)
    pixels = pipe.vae.decode(z).sample
    return pipe.image_processor.postprocess(pixels[:, :, 0] if _is_video(pipe.vae) else pixels, output_type="pil")


def _is_video(vae) -> bool:
    """A video VAE (Qwen-Image's, Wan's): 5-D latents (batch, channels, frames, h, w), an image is one frame."""
    return "temperal_downsample" in vae.config and vae.config.get("latents_mean") is not None


def pixel_error(a, b) -> float:
    """Mean absolute difference of two images, in pixel values (0-255)."""
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean())

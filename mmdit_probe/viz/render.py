"""Maps as pictures: colour a (rows, cols) map and blend it over the generated image; the prompt's image and the
per-block / per-step maps that figures, explorer and heatmaps draw."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ..maps import AttentionMaps, normalise, upsample


def image_of(maps: AttentionMaps, prompt: int):
    """The prompt's generated image, or None where the maps hold none (`picture` then draws the map alone)."""
    return maps.images[prompt] if len(maps.images) > prompt else None


def per(maps: AttentionMaps, by: str):
    """`per_block` and the recorded blocks (by="block"), or `per_step` and the recorded steps (by="step")."""
    if by not in ("block", "step"):
        raise ValueError(f"by={by!r}; choose 'block' or 'step'")
    return (maps.per_block, maps.blocks) if by == "block" else (maps.per_step, maps.steps)


def to_rgb(image) -> np.ndarray:
    """A PIL image, uint8 array or [0, 1] float array as a (height, width, 3) float array in [0, 1]."""
    a = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def colourise(m: torch.Tensor, size: tuple[int, int] | None = None, cmap: str = "inferno") -> np.ndarray:
    """A map, max-normalised (and upsampled to `size`), as (height, width, 3) colours in [0, 1]."""
    from matplotlib import colormaps  # here: interactive.py (plotly) imports `per` from this module, not matplotlib

    m = normalise(m)
    if size is not None:
        m = upsample(m, size).clamp(0, 1)
    return colormaps[cmap](m.numpy())[..., :3].astype(np.float32)


def overlay(image, m: torch.Tensor, opacity: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """The map coloured and blended over the image, (height, width, 3) in [0, 1]."""
    rgb = to_rgb(image)
    return (1 - opacity) * rgb + opacity * colourise(m, rgb.shape[:2], cmap)


def picture(image, m: torch.Tensor, opacity: float = 0.6) -> np.ndarray:
    """`overlay` of the map on the image, or the map alone (`colourise`) where there is no image (None)."""
    return colourise(m) if image is None else overlay(image, m, opacity)


def outline(rgb: np.ndarray, patch: tuple[int, int], grid: tuple[int, int], colour=(0.0, 1.0, 1.0)) -> np.ndarray:
    """A copy of an RGB picture of the token grid with one token's cell outlined (a query patch of I2I maps)."""
    rgb = rgb.copy()
    height, width = rgb.shape[:2]
    top, left = patch[0] * height // grid[0], patch[1] * width // grid[1]
    bottom = max((patch[0] + 1) * height // grid[0], top + 1)
    right = max((patch[1] + 1) * width // grid[1], left + 1)
    rgb[top:bottom, [left, right - 1]] = colour
    rgb[[top, bottom - 1], left:right] = colour
    return rgb


def png(rgb: np.ndarray, scale: int = 1) -> bytes:
    """PNG bytes of a [0, 1] RGB array, enlarged by `scale` with nearest-neighbour (small images stay crisp)."""
    picture = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    if scale != 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()

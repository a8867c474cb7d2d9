"""Vital layers (Stable Flow, Avrahami et al. 2025): the blocks whose bypass changes the image most.

What it takes from the paper: each block in turn is bypassed (its residual update skipped: it hands on
its inputs unchanged), the prompts are generated again from the same noise, and blocks are ranked by
how far the image moves from the full model's; the paper measures it with DINOv2 image features
(vitality = 1 - mean similarity) and calls the top blocks vital.

Measures here, all "higher = more vital", averaged over the prompts:
- "dino": 1 - cosine similarity of DINOv2 CLS features (transformers' `Dinov2Model`; give `dino=` a local
  checkpoint directory or a loaded model: nothing is downloaded);
- "pixel": mean absolute pixel difference (0-255);
- "judge" (Shapes world only): 1 - the share of the full image's objects (colour, shape, size, place) and
  background that the toy's judge reads back unchanged (`toy.measures.judge_change`).

Where ours differs: one seed per call (the paper averages seeds and 64 prompts), any sampler settings
(the paper used 15 steps), and the vital set is the top `keep` blocks of the ranking rather than those
past a similarity threshold (default `keep`: the share Stable Flow found in FLUX.1-dev, 9 of 57 blocks).

>>> found = vital_layers(probe, ["a cat on a mat", "a red car in a street"], measures=["pixel"])
>>> found.ranking, found.top(3), found.figure()
>>> stable_flow(probe, source, target, layers=found)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import validation
from .._lazy import lazy, resolve
from ..constants import MEASURES, PUBLISHED_SHARE
from ..sampling.images import pixel_error

# Measures defined outside the core, each by the "module:name" of its change (reference image, changed image) ->
# float and of its check of the images' (height, width): found when used, so that the core imports no toy module.
_MEASURES_BY_NAME = {"judge": ("mmdit_probe.toy.measures:judge_change", "mmdit_probe.toy.measures:check_judge_size")}

# judge_change moved to mmdit_probe.toy.measures; this alias stays one release.
__getattr__, __dir__ = lazy(__name__, {"judge_change": "mmdit_probe.toy.measures"})


@contextlib.contextmanager
def bypassed(probe, blocks: Iterable[int]) -> Iterator[None]:
    """Inside the `with`, the chosen blocks hand on their inputs unchanged (a forward hook on each).

    >>> with bypassed(probe, [3]):
    ...     image = probe.pipeline("a cat").images[0]
    """
    with contextlib.ExitStack() as hooks:
        for b in blocks:
            hooks.enter_context(probe.family.bypass(int(b)))
        yield


def block_labels(family) -> list[str]:
    """A name per block (moved to `Family.block_labels`, which Flux overrides; this stays one release)."""
    return family.block_labels()


@dataclass
class VitalLayers:
    """Per-block change when the block is bypassed: `scores[measure]` (block,) mean over prompts,
    `per_prompt[measure]` (block, prompt). Iterating gives the vital blocks, so the result can be passed
    as ``layers=`` to `stable_flow`."""

    scores: dict[str, np.ndarray]
    per_prompt: dict[str, np.ndarray]
    labels: list[str]
    rank_by: str
    keep: int
    prompts: list[str]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> list[int]:
        """Blocks, most vital first (ties: lower block first)."""
        return [int(b) for b in np.argsort(-self.scores[self.rank_by], kind="stable")]

    def top(self, k: int) -> list[int]:
        """The k most vital blocks, in ranking order."""
        ranking = self.ranking
        return ranking[:validation.top_k("k", k, len(ranking))]

    @property
    def vital(self) -> list[int]:
        """The top `keep` blocks, ascending (the layers Stable Flow injects in)."""
        return sorted(self.top(self.keep))

    def __iter__(self) -> Iterator[int]:
        return iter(self.vital)

    def figure(self, measure: str | None = None):
        """A plotly bar chart of one measure per block (default: the ranking's); vital blocks highlighted."""
        import plotly.graph_objects as go

        measure = validation.choice("measure", measure or self.rank_by, list(self.scores))
        vital = set(self.vital)
        colours = ["crimson" if b in vital else "steelblue" for b in range(len(self.labels))]
        fig = go.Figure(go.Bar(x=self.labels, y=self.scores[measure], marker_color=colours,
                               hovertemplate="%{x}<br>" + measure + " %{y:.4f}<extra></extra>"))
        fig.update_layout(title=f"Change when each block is bypassed ({measure}; vital in red)",
                          xaxis_title="bypassed block", yaxis_title=f"{measure} change", xaxis_type="category")
        return fig

    def __repr__(self) -> str:
        return (f"VitalLayers(rank_by={self.rank_by!r}, vital={self.vital}, ranking={self.ranking}, "
                f"prompts={len(self.prompts)})")


def _dino_model(dino):
    """A `Dinov2Model` in eval mode, from a loaded model or a local checkpoint directory."""
    from transformers import Dinov2Model

    if isinstance(dino, Dinov2Model):
        return dino.eval()
    if isinstance(dino, (str, Path)) and Path(dino).is_dir():
        return Dinov2Model.from_pretrained(str(dino), local_files_only=True).eval()
    raise validation.InvalidInput(f"dino={dino!r} is not allowed: give a Dinov2Model or a local directory holding "
                                  f"DINOv2 weights (e.g. facebook/dinov2-base downloaded beforehand)")


@torch.no_grad()
def dino_features(model, images: Sequence, size: int = 224) -> torch.Tensor:
    """DINOv2 CLS features (pooler output) of PIL images, resized to `size` and ImageNet-normalised."""
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    pixels = [torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
                               / 255.0).permute(2, 0, 1) for im in images]
    batch = ((torch.stack(pixels) - mean) / std).to(model.device, model.dtype)
    return model(pixel_values=batch).pooler_output.float()


def _check(probe, prompts, measures, dino, keep, rank_by, generation) -> tuple[list[str], list[str], int, str]:
    prompts = validation.prompts(prompts)
    for p in prompts:
        validation.prompt("prompts", p, empty_ok=False, message="prompts must not be empty strings: give prompts that "
                          "describe images")
    if measures is None:
        measures = ["dino"] if dino is not None else ["pixel"]
    measures = [measures] if isinstance(measures, str) else list(measures)
    if not measures or any(m not in MEASURES for m in measures) or len(set(measures)) < len(measures):
        raise validation.InvalidInput(f"measures={measures!r} is not allowed: choose one or more of {MEASURES}, "
                                      f"each once")
    if "dino" in measures and dino is None:
        raise validation.InvalidInput("measure 'dino' needs dino= (a Dinov2Model or a local DINOv2 checkpoint "
                                      "directory); or use measures=['pixel']")
    if dino is not None and "dino" not in measures:
        raise validation.InvalidInput(f"dino= is for the 'dino' measure, which measures={measures!r} leaves out: add "
                                      f"'dino' to measures, or leave dino out")
    rank_by = validation.choice("rank_by", rank_by or measures[0], measures)
    blocks = probe.family.num_blocks
    keep = max(1, round(blocks * PUBLISHED_SHARE)) if keep is None else validation.integer("keep", keep, minimum=1)
    if keep > blocks:
        raise validation.InvalidInput(f"keep={keep} is more than the model's {blocks} blocks")
    if generation.get("output_type", "pil") != "pil":
        raise validation.InvalidInput("vital_layers compares images: leave output_type out (PIL images are needed)")
    for name in ("latents", "same_noise"):
        if name in generation:
            raise validation.InvalidInput(f"vital_layers generates every prompt from the noise of seed=: do not pass "
                                          f"{name}=")
    return prompts, measures, keep, rank_by


def vital_layers(probe, prompts: str | list[str], *, measures: str | Sequence[str] | None = None, dino=None,
                 seed: int = 0, keep: int | None = None, rank_by: str | None = None, progress: bool = True,
                 **generation: Any) -> VitalLayers:
    """Rank blocks by how much bypassing each changes the prompts' images (module docstring).

    One generation of all prompts per block (a batch, from the noise of `seed`), plus the full model's: on a
    large model give as many prompts as fit in one batch, and average calls over seeds or prompt sets.
    measures: any of "dino", "pixel", "judge" (default "dino" when `dino` is given, else "pixel").
    keep: how many top blocks are vital (default: 9/57 of the blocks, Stable Flow's share in FLUX.1-dev).
    generation: steps, guidance, height, width and other pipeline arguments, as for `probe.generate`.
    """
    validation.boolean("progress", progress)
    prompts, measures, keep, rank_by = _check(probe, prompts, measures, dino, keep, rank_by, generation)
    named = {m: [resolve(target) for target in _MEASURES_BY_NAME[m]] for m in measures if m in _MEASURES_BY_NAME}
    size = (generation.get("height", probe.preset.resolution), generation.get("width", probe.preset.resolution))
    for _, check_size in named.values():
        check_size(size)
    model = _dino_model(dino) if "dino" in measures else None
    inputs = probe.inputs(prompts, seed=seed, **generation)
    pipeline = probe.pipeline
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)  # one bar for the whole run, over blocks
    try:
        reference = pipeline(**inputs).images
        reference_features = dino_features(model, reference) if model is not None else None
        n_blocks = probe.family.num_blocks
        per_prompt = {m: np.zeros((n_blocks, len(prompts))) for m in measures}
        for block in tqdm(range(n_blocks), desc="bypassing blocks", unit="block", disable=not progress):
            with bypassed(probe, [block]):
                images = pipeline(**inputs).images
            if model is not None:
                similarity = torch.nn.functional.cosine_similarity(reference_features, dino_features(model, images))
                per_prompt["dino"][block] = (1.0 - similarity).cpu().numpy()
            for i, (ref, new) in enumerate(zip(reference, images)):
                if "pixel" in measures:
                    per_prompt["pixel"][block, i] = pixel_error(ref, new)
                for m, (change, _) in named.items():
                    per_prompt[m][block, i] = change(ref, new)
    finally:
        pipeline._progress_bar_config = saved
    scores = {m: v.mean(axis=1) for m, v in per_prompt.items()}
    params = {"seed": int(seed), "steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"],
              "height": inputs["height"], "width": inputs["width"], "measures": measures}
    return VitalLayers(scores, per_prompt, probe.family.block_labels(), rank_by, keep, prompts, params)

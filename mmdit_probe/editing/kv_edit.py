"""KV-Edit (Zhu et al., 2025): the background's keys and values kept from the source while the foreground is
regenerated.

What it takes from the paper: a mask splits the image tokens into foreground (to edit) and background
(to keep). In every attention of every block and at every step, the edit's background keys and values
are the source's; its foreground tokens and its text (the target prompt) make their own queries, keys and
values, so the foreground attends to [text, foreground, kept background]. The background of the result is
the source's latents, so it is kept exactly; the foreground starts from the same noise as the source
(from the inversion, for a real image).

How ours does it: source and target run as one batch; a patch on every block's `hook_k_img`/`hook_v_img`
(and SD3.5's image-only `attn2`) gives the target's background tokens the source's values, and after each
step the target's background latents are set to the source's (for a real image, at the last step, to the
image's own encoded latents, as the paper pastes the original background). The target's background
*queries* still run, but nothing reads their result (background keys and values are always replaced, and
the rest of a block works token by token), so its foreground equals the paper's decoupled attention, at the
cost of computing the background rows.

Where ours differs:
- The kept keys and values come from the source row of the same batch (the regeneration from the
  inverted noise, or the generated source), not from a cache filled during the inversion steps.
- Under classifier-free guidance (SD3; the paper's Flux.1-dev has none) each guidance half of the target
  keeps its own half's background.
- Not implemented: the paper's options of re-initialising the foreground noise, skipping early steps,
  attention-masked inversion, and the inversion-free variant.
- ``mask=None`` makes the mask from the edited words' T2I maps (as the paper's editor takes a user mask):
  one recording generation of both prompts, maps averaged over steps and the preset's top blocks,
  smoothed, max-normalised and thresholded at `theta` (source and target words united).

>>> result = kv_edit(probe, "in the center a red circle on a white background",
...                  "in the center a blue circle on a white background", mask=token_mask)
>>> result.source_image, result.edited_image, result.masks[0]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import names, validation
from ..attention import AttentionRecorder
from ..constants import GENERATION_KEYS
from ..patching import patch
from .base import EditResult, blend_mask, edited_words, inversion_options, source_and_target, start_from_image


def token_mask(probe, mask, height: int, width: int) -> torch.Tensor:
    """A (rows, cols) 0/1 token-grid mask from a token-grid or pixel mask (nonzero = edit here).

    A token is foreground when any pixel it covers is (KV-Edit's rule: mask > 0 after resizing).
    """
    grid = probe.family.grid(height, width)
    if isinstance(mask, torch.Tensor):
        m = mask.detach().float().cpu()
    else:
        try:
            m = torch.as_tensor(np.asarray(mask, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise validation.InvalidInput(f"mask of type {type(mask).__name__} is not allowed: give a 2-D array "
                                          f"or tensor") from error
    if not torch.isfinite(m).all():
        raise validation.InvalidInput("the mask holds NaN or infinite values")
    if tuple(m.shape) == grid:
        return (m != 0).float()
    if tuple(m.shape) == (height, width):
        step = probe.family.token_pixels
        return (m != 0).float().reshape(grid[0], step, grid[1], step).amax(dim=(1, 3))
    raise validation.InvalidInput(f"a mask of shape {tuple(m.shape)} fits neither the token grid {grid} nor the "
                                  f"image ({height}, {width}): give one of those (nonzero = edit here)")


def words_mask(probe, inputs: dict[str, Any], source: str, target: str, theta: float,
               blocks: list[int] | None) -> torch.Tensor:
    """The edited words' T2I mask: one recording generation of both prompts, maps averaged over all steps."""
    left, right = edited_words(source, target)
    length = inputs["max_sequence_length"]
    tables = [probe.tokens(source, length), probe.tokens(target, length)]
    for table, words in zip(tables, (left, right)):
        for word in words:
            table.positions(word)  # a word cut off by the tokenizer cannot make a mask: say so now
    recorder = AttentionRecorder(probe, inputs, blocks=blocks, kinds=["t2i"], rows="cond", positions=left + right,
                                 dtype=torch.float32)
    columns = [[recorder.positions.index(p) for p in table.positions(words)] if words else []
               for table, words in zip(tables, (left, right))]
    steps: list[torch.Tensor] = []  # filled inside the trace (mutated, as the trace body runs elsewhere)
    try:
        with probe.model.generate(**inputs) as tracer:
            for step in tracer.iter[0:inputs["num_inference_steps"]]:
                recorder.record(step)
                steps.append(recorder.step_maps(step).cpu())  # (block, row, image, word positions)
    finally:
        recorder.close()
    mean = torch.stack(steps).mean(dim=0)
    parts = [blend_mask(mean[:, row], cols, recorder.grid, theta) for row, cols in enumerate(columns) if cols]
    return torch.stack(parts).amax(dim=0)


def kv_edit(probe, source: str, target: str, *, mask=None, image=None, seed: int = 0, theta: float | None = None,
            mask_blocks: list[int] | None = None, inversion: str | None = None, iterations: int | None = None,
            **generation: Any) -> EditResult:
    """Regenerate the masked foreground of `source` as `target`, keeping the background (module docstring).

    mask: where to edit, nonzero = foreground: a token-grid mask (`probe.grid()`) or a pixel mask
        (height, width); None: from the edited words' T2I maps (`theta`, `mask_blocks`; default the preset's;
        refused with a given mask, which they would not change).
    image: a real image (PIL or uint8 array) described by `source`, inverted first (`inversion`,
        `iterations` as in `probe.invert`, default fixed-point, 3; refused without `image`); None edits the
        generation of `source` from `seed`.
    generation: steps, guidance, height, width, output_type and other pipeline arguments.
    ``result.masks[0]`` is the token mask used; ``result.params`` holds every setting.
    """
    validation.edit_prompts(source, target)
    for name in ("latents", "callback_on_step_end", "callback_on_step_end_tensor_inputs"):
        if name in generation:
            raise validation.InvalidInput(f"kv_edit sets {name} itself: do not pass it")
    inversion, iterations = inversion_options(image, inversion, iterations)
    if mask is not None:
        for name, value in (("theta", theta), ("mask_blocks", mask_blocks)):
            if value is not None:
                raise validation.InvalidInput(f"{name}= makes the mask from the edited words' maps, so it is unused "
                                              f"with mask=: leave it out, or leave mask out")
    inputs = probe.inputs([source, target], seed=seed, **generation)  # checks every generation argument
    probe.family.check_one_call_per_step(inputs)
    theta = validation.fraction("theta", probe.preset.theta if theta is None else theta, " (the threshold on "
                                "max-normalised maps)")
    if mask_blocks is not None:
        mask_blocks = probe.family.check_blocks("mask_blocks", mask_blocks, template="{name}={values} is out of range: "
                                                "this model has blocks 0..{last}")
    words = edited_words(source, target) if mask is None else ([], [])
    if mask is not None:
        fg = token_mask(probe, mask, inputs["height"], inputs["width"])
    elif not any(words):
        raise validation.InvalidInput("the prompts differ in no word, so no mask can be made from them: give mask=")
    clean = None
    if image is not None:
        sizes = {k: generation[k] for k in GENERATION_KEYS if k in generation}
        clean = start_from_image(probe, inputs, image, source, method=inversion, iterations=iterations, **sizes)
    if mask is None:
        blocks = mask_blocks or probe.family.present(probe.preset.top_layers) or None
        recording = {**inputs, "output_type": "latent", "latents": inputs["latents"].clone()}
        fg = words_mask(probe, recording, source, target, theta, blocks)

    family = probe.family
    background = torch.nonzero(fg.flatten() == 0).flatten()
    last = inputs["num_inference_steps"] - 1

    def keep_background(pipeline, step, timestep, tensors):
        latents = tensors["latents"]
        keep = family.mask_to_latents(fg, latents.shape[1:]).to(latents.device) == 0
        # The encoded image in the step's layout (Flux.2's callbacks see its grid packed into tokens).
        kept = family.transformer_input(clean)[0].to(latents) if clean is not None and step == last else latents[0]
        latents = latents.clone()
        latents[1] = torch.where(keep, kept, latents[1])
        return {"latents": latents}

    def keep_rows(x: torch.Tensor) -> torch.Tensor:
        return source_and_target(x, background.to(x.device))

    inputs["callback_on_step_end"] = keep_background
    inputs["callback_on_step_end_tensor_inputs"] = ["latents"]
    with probe.model.generate(**inputs) as tracer:
        if len(background):  # a full mask keeps nothing: the plain target generation
            for _ in tracer.iter[0:inputs["num_inference_steps"]]:
                for attention in family.attentions:  # execution order: blocks ascending, attn before attn2
                    for tap in ("k_img", "v_img"):
                        patch(probe, names.tap(attention.block, tap, attention.name), keep_rows)
        output = probe.model.output.save()
    params = {"method": "kv-edit", "source": source, "target": target, "seed": int(seed),
              "mask": "given" if mask is not None else "edited words' T2I maps",
              "theta": theta if mask is None else None,
              "source_words": words[0], "target_words": words[1], "foreground_tokens": int(fg.sum()),
              "steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"],
              "inversion": inversion}
    return EditResult(output.images[0], output.images[1], [fg.numpy()], None, params, inputs)

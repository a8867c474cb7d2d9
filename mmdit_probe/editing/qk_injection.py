"""Prompt-based editing, composed only of the public patching and attention primitives.

Source and target prompts run together, from the same initial noise, in one traced generation:

1. q/k injection: for the first `tau` of the steps, in the injected blocks, the target's image-stream
   queries and keys are replaced by the source's (variant "qiki"; the target keeps its own text q/k
   and all values). Only the conditional rows are patched under classifier-free guidance.
   "The first tau of the steps" are the steps s with s < tau * n (6 of 28 at tau = 0.2).
2. Local blending: for the first `eta` of the steps, the T2I maps of the edited words (top blocks,
   smoothed, max-normalised, thresholded at `theta`; source words and target words united) give a
   mask, and after each scheduler step ``x_target = x_source + mask * (x_target - x_source)``.

>>> result = edit(probe, "on the left a red circle on a white background",
...               "on the left a blue circle on a white background", seed=0)
>>> result.source_image, result.edited_image, result.masks[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import names, validation
from ..attention import AttentionRecorder
from ..constants import VARIANTS
from ..patching import patch, replace_rows, rows
from .base import EditResult, blend_mask, edited_words, start_from

# EditResult, edited_words and blend_mask moved to .base, VARIANTS to constants; these names stay bound here one
# release (and `edit` calls `blend_mask` by this module's name: tests replace it here).


def _blocks(family, name: str, chosen: list[int] | None, default: tuple[int, ...] | None) -> list[int]:
    """Blocks the caller chose (checked), else the preset's that exist in this model, else all."""
    if chosen is not None:
        return family.check_blocks(name, chosen)
    return family.present(default) or list(range(family.num_blocks))


def _inject_and_record(probe, step: int, blocks: list[int], inject: list[int], injected: tuple[str, ...],
                       recorder: AttentionRecorder | None, change) -> None:
    """One step inside the trace: patch the injected taps and record the blend blocks' maps,
    reading every tap once and in execution order (as nnsight requires)."""
    for block in blocks:
        patched = injected if block in inject else ()
        recording = recorder is not None and block in recorder.blocks and step in recorder.steps
        needed = ("q_img", "k_img", "q_txt", "k_txt") if recording else ()
        known = {}
        for name in names.TAP_ORDER:
            name_of = names.tap(block, name)
            if name in patched:
                known[name] = patch(probe, name_of, change)
            elif name in needed:
                known[name] = probe.hook(name_of).output
        if recording:
            recorder.record_block(step, block, **{k: v for k, v in known.items() if k in needed})


@dataclass
class _Plan:
    """An edit's checked arguments: everything decided before the model runs."""

    inputs: dict[str, Any]
    variant: str
    tau: float
    eta: float
    theta: float
    inject: list[int]
    inject_steps: list[int]
    blend_blocks: list[int]
    blend_steps: list[int]
    source_words: list[str]
    target_words: list[str]
    user_callback: Any
    user_tensors: list[str]


def _words(name: str, words: Any, table) -> list[str] | None:
    """None, or the chosen words (a str is one word), each checked against its prompt's token table."""
    if words is None:
        return None
    words = [words] if isinstance(words, str) else words
    if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
        raise validation.InvalidInput(f"{name}={words!r} is not allowed: give a list of words of the prompt")
    for word in words:
        table.positions(word)  # KeyError naming the prompt's words, or saying the word was cut off
    return list(words)


def _plan(probe, source: str, target: str, *, seed: int = 0, variant: str = "qiki", tau: float | None = None,
          eta: float | None = None, theta: float | None = None, inject_blocks: list[int] | None = None,
          blend_blocks: list[int] | None = None, local_blend: bool = True,
          source_words: list[str] | None = None, target_words: list[str] | None = None,
          latents: torch.Tensor | None = None, **generation: Any) -> _Plan:
    """Check every argument of `edit` and decide steps, blocks and words; runs no model."""
    validation.edit_prompts(source, target)
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise validation.InvalidInput(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    preset, family = probe.preset, probe.family
    what = {"tau": " (the share of the steps with q/k injection)", "eta": " (the share of the steps with local "
            "blending)", "theta": " (the threshold on max-normalised maps; above 1 no token passes)"}
    tau = validation.fraction("tau", preset.tau if tau is None else tau, what["tau"])
    eta = validation.fraction("eta", preset.eta if eta is None else eta, what["eta"])
    theta = validation.fraction("theta", preset.theta if theta is None else theta, what["theta"])
    local_blend = validation.boolean("local_blend", local_blend)
    if inject_blocks is not None:
        inject_blocks = validation.index_list("inject_blocks", inject_blocks, what="block indices")
    if blend_blocks is not None:
        blend_blocks = validation.index_list("blend_blocks", blend_blocks, what="block indices")
    inject = _blocks(family, "inject_blocks", inject_blocks, preset.inject_blocks)
    user_callback = generation.pop("callback_on_step_end", None)
    user_tensors = generation.pop("callback_on_step_end_tensor_inputs", None)
    inputs = probe.inputs([source, target], seed=seed, **generation)
    probe.family.check_one_call_per_step(inputs)
    start_from(inputs, latents)
    if user_callback is not None:
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            user_tensors = user_callback.tensor_inputs
        elif not callable(user_callback):
            raise validation.InvalidInput(f"callback_on_step_end={user_callback!r} is not callable")
    user_tensors = list(user_tensors or [])
    n_steps = inputs["num_inference_steps"]
    inject_steps = [s for s in range(n_steps) if s < tau * n_steps] if VARIANTS[variant] else []

    length = inputs["max_sequence_length"]
    tables = [probe.tokens(source, length), probe.tokens(target, length)]
    given = (source_words, target_words)
    source_words = _words("source_words", source_words, tables[0])
    target_words = _words("target_words", target_words, tables[1])
    if source_words is None and target_words is None:
        source_words, target_words = edited_words(source, target)
        if local_blend and eta > 0:  # their masks are needed: a word cut off by the tokenizer cannot make one
            _words("source_words (the words that differ)", source_words, tables[0])
            _words("target_words (the words that differ)", target_words, tables[1])
    elif local_blend and given[0] is not None and given[1] is not None and not source_words and not target_words:
        raise validation.InvalidInput("source_words and target_words are both empty, so no mask can be made: name "
                                      "the edited words, or pass local_blend=False")
    source_words, target_words = list(source_words or []), list(target_words or [])
    blend_steps: list[int] = []
    if local_blend and (source_words or target_words):
        blend_steps = [s for s in range(n_steps) if s < eta * n_steps]
    blend = _blocks(family, "blend_blocks", blend_blocks, preset.top_layers) if blend_steps else []
    return _Plan(inputs, variant, tau, eta, theta, inject, inject_steps, blend, blend_steps, source_words,
                 target_words, user_callback, user_tensors)


def check_edit(probe, source: str, target: str, **options: Any) -> None:
    """Refuse bad `edit` arguments without running anything (e.g. before a real image is inverted)."""
    _plan(probe, source, target, **options)


def edit(probe, source: str, target: str, *, seed: int = 0, variant: str = "qiki", tau: float | None = None,
         eta: float | None = None, theta: float | None = None, inject_blocks: list[int] | None = None,
         blend_blocks: list[int] | None = None, local_blend: bool = True,
         source_words: list[str] | None = None, target_words: list[str] | None = None,
         latents: torch.Tensor | None = None, **generation: Any) -> EditResult:
    """Edit `source` into `target` (see the module docstring). Defaults come from the probe's preset.

    generation: steps, guidance, height, width, output_type and other pipeline arguments. A
    `callback_on_step_end` of the caller runs after each step's local blending (it sees the blended latents).
    latents: an initial latent (e.g. from inversion) instead of the noise drawn for `seed`.
    Every argument is checked before the model runs; nothing stays switched on after an error.
    """
    plan = _plan(probe, source, target, seed=seed, variant=variant, tau=tau, eta=eta, theta=theta,
                 inject_blocks=inject_blocks, blend_blocks=blend_blocks, local_blend=local_blend,
                 source_words=source_words, target_words=target_words, latents=latents, **generation)
    family, inputs, theta = probe.family, plan.inputs, plan.theta
    source_words, target_words = plan.source_words, plan.target_words
    masks: dict[int, torch.Tensor] = {}
    user_callback = plan.user_callback

    def blend_latents(pipeline, step, timestep, tensors):
        latents = tensors["latents"]
        if step in masks:
            m = family.mask_to_latents(masks[step], latents.shape[1:]).to(latents)
            latents = latents.clone()
            latents[1] = latents[0] + m * (latents[1] - latents[0])
        if user_callback is None:
            return {"latents": latents}
        returned = user_callback(pipeline, step, timestep, {**tensors, "latents": latents})
        return {"latents": latents, **(returned or {})}

    def inject_rows(x: torch.Tensor) -> torch.Tensor:  # the target's conditional row takes the source's
        return replace_rows(x, rows(2, x, 0), rows(2, x, 1))

    inputs["callback_on_step_end"] = blend_latents
    inputs["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(["latents", *plan.user_tensors]))
    recorder = None
    try:
        if plan.blend_steps:
            recorder = AttentionRecorder(probe, inputs, blocks=plan.blend_blocks, steps=plan.blend_steps,
                                         kinds=["t2i"], rows="cond", positions=source_words + target_words,
                                         dtype=torch.float32)
            tables = recorder.tables
            columns = ([recorder.positions.index(p) for p in tables[0].positions(source_words)]
                       if source_words else [],
                       [recorder.positions.index(p) for p in tables[1].positions(target_words)]
                       if target_words else [])
        active = max([s + 1 for s in plan.inject_steps + plan.blend_steps], default=0)
        blocks = sorted(set(plan.inject) | set(recorder.blocks if recorder else []))
        with probe.model.generate(**inputs) as tracer:
            for step in tracer.iter[0:active]:
                injected = VARIANTS[plan.variant] if step in plan.inject_steps else ()
                _inject_and_record(probe, step, blocks, plan.inject, injected, recorder, inject_rows)
                if recorder is not None and step in plan.blend_steps:
                    t2i = recorder.step_maps(step)  # (block, row, image, text): rows are [source, target]
                    parts = [blend_mask(t2i[:, r], c, recorder.grid, theta) for r, c in enumerate(columns) if c]
                    masks[step] = torch.stack(parts).amax(dim=0)
            output = probe.model.output.save()
    finally:
        if recorder is not None:
            recorder.close()
    maps = recorder.maps() if recorder is not None else None
    images = output.images
    if maps is not None and inputs.get("output_type", "pil") == "pil":
        maps.images = list(images)
    params = {"source": source, "target": target, "seed": int(seed), "variant": plan.variant, "tau": plan.tau,
              "eta": plan.eta, "theta": theta, "inject_blocks": plan.inject, "inject_steps": plan.inject_steps,
              "blend_blocks": recorder.blocks if recorder else [], "blend_steps": plan.blend_steps,
              "source_words": source_words, "target_words": target_words, "steps": inputs["num_inference_steps"],
              "guidance": inputs["guidance_scale"]}
    return EditResult(images[0], images[1], [masks[s].cpu().numpy() for s in sorted(masks)], maps, params, inputs)

"""Prompt-based editing, composed only of the public patching and attention primitives.

Source and target prompts run together, from the same initial noise, in one traced generation:

1. q/k injection: for the first `tau` of the steps, in the injected blocks, the target's image-stream
   queries and keys are replaced by the source's (variant "qiki"; the target keeps its own text q/k
   and all values). Only the conditional rows are patched under classifier-free guidance as a doubled batch; where
   guidance is a second transformer call per step (`Family.calls_per_step`: Chroma, Flux.2 Klein base, true CFG),
   each call's batch is [source, target] and both calls of an injected step are patched.
   "The first tau of the steps" are the steps s with s < tau * n (6 of 28 at tau = 0.2); with
   ``step_rounding="floor"`` those with s < int(tau * n), as the paper's released code (5 of 28).
   Other variants replace other projections (`constants.VARIANTS`); the region replacements "I2I", "T2I", "I2T",
   "T2T" (`constants.REPLACEMENTS`) instead give the target, in one block of its pre-softmax scores, the source's
   scores, exactly and without the score matrix (`kernels.region_attention`), on every family (under its
   attention mask where it has one).
2. Local blending: for the first `eta` of the steps, the T2I maps of the edited words (top blocks,
   smoothed, optionally max-pooled, max-normalised, thresholded at `theta`; source words and target words united)
   give a mask, and after each scheduler step ``x_target = x_source + mask * (x_target - x_source)``. A mask comes
   from the maps of the last `n_prev_steps` blended steps (default 1: this step's), of the conditional call where
   guidance is a second call.

``paper="printed"`` (or ``"run"``) takes every option not given from the paper's released code
(`presets.paper`): its windows, SD3's 3x3 max-pool, masks from all blended steps so far, its top blocks.

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
from ..constants import EDIT_METHODS, REPLACEMENTS, STEP_ROUNDINGS, VARIANTS
from ..families.base import step_and_half
from ..kernels import region_attention
from ..patching import patch, replace_rows, rows
from ..presets import PAPER_READINGS
from ..presets import paper as paper_preset
from .base import EditResult, blend_mask, edited_words, start_from

# EditResult, edited_words and blend_mask moved to .base, VARIANTS to constants; these names stay bound here one
# release (and `edit` calls `blend_mask` by this module's name: tests replace it here).


def _blocks(family, name: str, chosen: list[int] | None, default: tuple[int, ...] | None) -> list[int]:
    """Blocks the caller chose (checked), else the preset's that exist in this model, else all."""
    if chosen is not None:
        return family.check_blocks(name, chosen)
    return family.present(default) or list(range(family.num_blocks))


def _inject_and_record(probe, call: int, blocks: list[int], inject: list[int], injected: tuple[str, ...],
                       recorder: AttentionRecorder | None, change, sourced: tuple[str, ...] = ()) -> None:
    """One transformer call inside the trace (`tracer.iter`'s index): patch the injected taps and record the blend
    blocks' maps, reading every tap once and in execution order (as nnsight requires). `sourced`: taps whose recorded
    values take the source's rows in the injected blocks, unpatched (the scores a region replacement gave the
    target)."""
    for block in blocks:
        patched = injected if block in inject else ()
        recording = recorder is not None and recorder.records(call, block)
        needed = ("q_img", "k_img", "q_txt", "k_txt") if recording else ()
        known = {}
        for name in names.TAP_ORDER:
            name_of = names.tap(block, name)
            if name in patched:
                known[name] = patch(probe, name_of, change)
            elif name in needed:
                known[name] = probe.hook(name_of).output
        if recording:
            for name in sourced if block in inject else ():
                known[name] = change(known[name])
            recorder.record_block(call, block, **{k: v for k, v in known.items() if k in needed})


class RegionReplacement:
    """The attention step of the injected blocks under a region replacement: in the target's conditional rows, the
    scores of `region`'s queries against its keys are the source's (`kernels.region_attention`); every other row
    and every step outside `steps` is the processor's own attention, bit for bit. Under an attention mask (Chroma's,
    Qwen-Image's over padded text) the target's mask applies to its rows' scores, the replaced ones included.

    Set as the tap processors' `region_replacement`; `step` is the step being run (the editor advances it).
    """

    def __init__(self, region: str, steps: list[int]) -> None:
        self.queries, self.keys = REPLACEMENTS[region]
        self.steps = set(steps)
        self.step = 0

    def __call__(self, q, k, v, streams, stock, mask=None):
        out, lse = stock()
        if self.step not in self.steps or self.keys not in streams or self.queries not in streams:
            return out, lse
        region = streams[self.keys]
        # Every other key: one range, or an index of several (Kontext's [text | image | reference] around the image).
        others = [s for name, s in streams.items() if name != self.keys]
        rest = others[0] if len(others) == 1 else torch.cat([torch.arange(k.shape[2], device=k.device)[s]
                                                             for s in others])
        queries = streams[self.queries]
        (source,), (target,) = rows(2, q, 0), rows(2, q, 1)
        source, target = slice(source, source + 1), slice(target, target + 1)  # views, not copies
        if mask is not None:  # the target's mask: its own padding, over the replaced scores as over the others
            mask = mask[target] if mask.shape[0] > 1 else mask
            mask = mask[:, :, queries] if mask.shape[2] > 1 else mask
        kept, kept_lse = region_attention(q[target, :, queries], k[target], v[target], q[source, :, queries],
                                          k[source], region, rest, attn_mask=mask)
        out[target, :, queries] = kept.to(out.dtype)  # in place: `stock()` made these tensors for this call only
        if lse is not None:
            lse[target, :, queries] = kept_lse.to(lse.dtype)
        return out, lse


@dataclass
class _Plan:
    """An edit's checked arguments: everything decided before the model runs."""

    inputs: dict[str, Any]
    variant: str
    blend_pool: int
    n_prev_steps: int | None  # None: every blended step so far
    step_rounding: str
    paper: str | None
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
    calls: int  # transformer calls per step (`Family.calls_per_step`)


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


def _processor(probe, block: int):
    """The tap processor of a block's joint attention."""
    return probe.pipeline.transformer.get_submodule(probe.family.attention(block).path).processor


def _window(share: float, n_steps: int, rounding: str) -> list[int]:
    """The first `share` of `n_steps` steps: s < share * n ("ceil"), or s < int(share * n) ("floor")."""
    end = int(share * n_steps) if rounding == "floor" else share * n_steps
    return [s for s in range(n_steps) if s < end]


def _blend_options(preset, blend_pool: Any, n_prev_steps: Any, step_rounding: Any) -> tuple[int, int | None, str]:
    """The checked local-blend and window options, each given or the preset's."""
    pool = preset.blend_pool if blend_pool is None else blend_pool
    pool = validation.positive_int("blend_pool", pool)
    if pool % 2 == 0:
        raise validation.InvalidInput(f"blend_pool={pool} is not allowed: give an odd side (1: no max-pool; the "
                                      f"paper's SD3 code: 3), so the pooled mask stays on the token grid")
    prev = preset.n_prev_steps if n_prev_steps is None else n_prev_steps
    prev = None if prev == "all" else validation.positive_int(
        "n_prev_steps", prev, default_hint=" (or 'all': every blended step so far)")
    rounding = validation.choice("step_rounding", preset.step_rounding if step_rounding is None else step_rounding,
                                 STEP_ROUNDINGS)
    return pool, prev, rounding


def _plan(probe, source: str, target: str, *, seed: int = 0, variant: str = "qiki", tau: float | None = None,
          eta: float | None = None, theta: float | None = None, inject_blocks: list[int] | None = None,
          blend_blocks: list[int] | None = None, local_blend: bool = True,
          source_words: list[str] | None = None, target_words: list[str] | None = None,
          latents: torch.Tensor | None = None, blend_pool: int | None = None, n_prev_steps: int | str | None = None,
          step_rounding: str | None = None, paper: str | None = None, **generation: Any) -> _Plan:
    """Check every argument of `edit` and decide steps, blocks and words; runs no model."""
    validation.edit_prompts(source, target)
    if not isinstance(variant, str) or variant not in EDIT_METHODS:
        raise validation.InvalidInput(f"unknown variant {variant!r}; choose from {', '.join(EDIT_METHODS)}")
    preset, family = probe.preset, probe.family
    if paper is not None:
        preset = paper_preset(preset, validation.choice("paper", paper, PAPER_READINGS))
    given_blend = {"blend_pool": blend_pool, "n_prev_steps": n_prev_steps}
    blend_pool, n_prev_steps, step_rounding = _blend_options(preset, blend_pool, n_prev_steps, step_rounding)
    what = {"tau": " (the share of the steps with q/k injection)", "eta": " (the share of the steps with local "
            "blending)", "theta": " (the threshold on max-normalised maps; above 1 no token passes)"}
    tau = validation.fraction("tau", preset.tau if tau is None else tau, what["tau"])
    eta = validation.fraction("eta", preset.eta if eta is None else eta, what["eta"])
    theta = validation.fraction("theta", preset.theta if theta is None else theta, what["theta"])
    local_blend = validation.boolean("local_blend", local_blend)
    for name, value in given_blend.items():
        if value is not None and not local_blend:
            raise validation.InvalidInput(f"{name}= shapes the local blend's masks, and local_blend=False makes none: "
                                          f"leave {name} out, or blend")
    inject = _blocks(family, "inject_blocks", inject_blocks, preset.inject_blocks)
    if blend_blocks is not None:  # its range is checked below, where blending uses it
        blend_blocks = validation.index_list("blend_blocks", blend_blocks, what="block indices")
    if variant in REPLACEMENTS:
        lacking = [b for b in inject if not _processor(probe, b).attends]
        if lacking:
            raise validation.InvalidInput(
                f"variant={variant!r} replaces attention scores, but the {family.name} processors of blocks "
                f"{lacking} do not run attention through TapProcessor.attend: choose a projection variant "
                f"({', '.join(VARIANTS)}) or other inject_blocks")
    user_callback = generation.pop("callback_on_step_end", None)
    user_tensors = generation.pop("callback_on_step_end_tensor_inputs", None)
    inputs = probe.inputs([source, target], seed=seed, **generation)
    calls = family.calls_per_step(inputs)
    start_from(inputs, latents)
    if user_callback is not None:
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if isinstance(user_callback, (PipelineCallback, MultiPipelineCallbacks)):
            user_tensors = user_callback.tensor_inputs
        elif not callable(user_callback):
            raise validation.InvalidInput(f"callback_on_step_end={user_callback!r} is not callable")
    user_tensors = list(user_tensors or [])
    n_steps = inputs["num_inference_steps"]
    replaces = variant in REPLACEMENTS or bool(VARIANTS.get(variant))
    inject_steps = _window(tau, n_steps, step_rounding) if replaces else []

    length = inputs["max_sequence_length"]
    tables = [probe.tokens(source, length), probe.tokens(target, length)]
    source_words = _words("source_words", source_words, tables[0])
    target_words = _words("target_words", target_words, tables[1])
    if source_words is None and target_words is None:
        source_words, target_words = edited_words(source, target)
        if local_blend and eta > 0:  # their masks are needed: a word cut off by the tokenizer cannot make one
            _words("source_words (the words that differ)", source_words, tables[0])
            _words("target_words (the words that differ)", target_words, tables[1])
    elif local_blend and source_words == [] and target_words == []:  # both given, both empty
        raise validation.InvalidInput("source_words and target_words are both empty, so no mask can be made: name "
                                      "the edited words, or pass local_blend=False")
    source_words, target_words = list(source_words or []), list(target_words or [])
    blend_steps = _window(eta, n_steps, step_rounding) if local_blend and (source_words or target_words) else []
    blend = _blocks(family, "blend_blocks", blend_blocks, preset.top_layers) if blend_steps else []
    return _Plan(inputs, variant, blend_pool, n_prev_steps, step_rounding, paper, tau, eta, theta, inject,
                 inject_steps, blend, blend_steps, source_words, target_words, user_callback, user_tensors, calls)


def check_edit(probe, source: str, target: str, **options: Any) -> None:
    """Refuse bad `edit` arguments without running anything (e.g. before a real image is inverted)."""
    _plan(probe, source, target, **options)


def edit(probe, source: str, target: str, *, seed: int = 0, variant: str = "qiki", tau: float | None = None,
         eta: float | None = None, theta: float | None = None, inject_blocks: list[int] | None = None,
         blend_blocks: list[int] | None = None, local_blend: bool = True,
         source_words: list[str] | None = None, target_words: list[str] | None = None,
         latents: torch.Tensor | None = None, blend_pool: int | None = None, n_prev_steps: int | str | None = None,
         step_rounding: str | None = None, paper: str | None = None, **generation: Any) -> EditResult:
    """Edit `source` into `target` (see the module docstring). Defaults come from the probe's preset.

    variant: a projection variant (`constants.VARIANTS`) or a region replacement (`constants.REPLACEMENTS`), injected in
    `inject_blocks` (the released code's `replace_blocks`) for the first `tau` of the steps.
    blend_blocks: the blocks whose maps make the masks (the released code's `aggregate_blocks`).
    blend_pool: side of the max-pool before thresholding (1: none). n_prev_steps: masks from the maps of the last
    n blended steps, or "all". step_rounding: "ceil" (s < tau * n) or "floor" (s < int(tau * n)), for the
    injection and the blending windows. paper: "printed" or "run" takes each of these not given, and the top
    blocks, from the paper's released code (`presets.paper`).
    generation: steps, guidance, height, width, output_type and other pipeline arguments. A
    `callback_on_step_end` of the caller runs after each step's local blending (it sees the blended latents).
    latents: an initial latent (e.g. from inversion) instead of the noise drawn for `seed`.
    Every argument is checked before the model runs; nothing stays switched on after an error.

    >>> result = edit(probe, "a red cat", "a blue cat", variant="T2I", paper="printed")
    """
    plan = _plan(probe, source, target, seed=seed, variant=variant, tau=tau, eta=eta, theta=theta,
                 inject_blocks=inject_blocks, blend_blocks=blend_blocks, local_blend=local_blend,
                 source_words=source_words, target_words=target_words, latents=latents, blend_pool=blend_pool,
                 n_prev_steps=n_prev_steps, step_rounding=step_rounding, paper=paper, **generation)
    inputs = plan.inputs
    masks: dict[int, torch.Tensor] = {}
    replacing = plan.variant in REPLACEMENTS and plan.inject_steps
    region = RegionReplacement(plan.variant, plan.inject_steps) if replacing else None
    swapped = [_processor(probe, b) for b in plan.inject] if replacing else []

    def blend_latents(pipeline, step, timestep, tensors):
        if region is not None:
            region.step = step + 1
        latents = tensors["latents"]
        if step in masks:
            m = probe.family.mask_to_latents(masks[step], latents.shape[1:]).to(latents)
            latents = latents.clone()
            latents[1] = latents[0] + m * (latents[1] - latents[0])
        if plan.user_callback is None:
            return {"latents": latents}
        returned = plan.user_callback(pipeline, step, timestep, {**tensors, "latents": latents})
        return {"latents": latents, **(returned or {})}

    def inject_rows(x: torch.Tensor) -> torch.Tensor:
        """The target's conditional row takes the source's (a second guidance call has one row per prompt)."""
        return replace_rows(x, rows(2, x, 0), rows(2, x, 1))

    inputs["callback_on_step_end"] = blend_latents
    inputs["callback_on_step_end_tensor_inputs"] = list(dict.fromkeys(["latents", *plan.user_tensors]))
    recorder = None
    history: list[torch.Tensor] = []  # the T2I maps of the blended steps so far
    sourced = ("q_img", "k_txt") if plan.variant == "T2I" else ()  # the region whose recorded scores are the source's
    try:
        for processor in swapped:
            processor.region_replacement = region
        if plan.blend_steps:
            recorder = AttentionRecorder(probe, inputs, blocks=plan.blend_blocks, steps=plan.blend_steps,
                                         kinds=["t2i"], rows="cond", positions=plan.source_words + plan.target_words,
                                         dtype=torch.float32)
            columns = [[recorder.positions.index(p) for p in table.positions(w)] if w else []
                       for table, w in zip(recorder.tables, (plan.source_words, plan.target_words))]
        active = max([s + 1 for s in plan.inject_steps + plan.blend_steps], default=0)
        blocks = sorted(set(plan.inject) | set(recorder.blocks if recorder else []))
        with probe.model.generate(**inputs) as tracer:
            for call in tracer.iter[0:active * plan.calls]:
                step, half = step_and_half(call, plan.calls)
                active_step = step in plan.inject_steps
                injected = VARIANTS.get(plan.variant, ()) if active_step else ()
                _inject_and_record(probe, call, blocks, plan.inject, injected, recorder, inject_rows,
                                   sourced if active_step else ())
                if recorder is not None and step in plan.blend_steps and half != "uncond":
                    history.append(recorder.step_maps(call))  # (block, row, image, text): rows are [source, target]
                    if plan.n_prev_steps is not None:
                        del history[:-plan.n_prev_steps]
                    t2i = torch.cat(history)  # blocks and steps, averaged alike
                    parts = [blend_mask(t2i[:, r], c, recorder.grid, plan.theta, plan.blend_pool)
                             for r, c in enumerate(columns) if c]
                    masks[step] = torch.stack(parts).amax(dim=0)
            output = probe.model.output.save()
    finally:
        for processor in swapped:
            processor.region_replacement = None
        if recorder is not None:
            recorder.close()
    maps = recorder.maps() if recorder is not None else None
    images = output.images
    if maps is not None and inputs.get("output_type", "pil") == "pil":
        maps.images = list(images)
    params = {"source": source, "target": target, "seed": int(seed), "variant": plan.variant, "tau": plan.tau,
              "eta": plan.eta, "theta": plan.theta, "inject_blocks": plan.inject, "inject_steps": plan.inject_steps,
              "blend_blocks": recorder.blocks if recorder else [], "blend_steps": plan.blend_steps,
              "source_words": plan.source_words, "target_words": plan.target_words,
              "steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"],
              "blend_pool": plan.blend_pool, "n_prev_steps": "all" if plan.n_prev_steps is None else plan.n_prev_steps,
              "step_rounding": plan.step_rounding, "paper": plan.paper}
    return EditResult(images[0], images[1], [masks[s].cpu().numpy() for s in sorted(masks)], maps, params, inputs)

"""Activation patching as one call: which hook, block, step, token and guidance half carry a difference.

Two prompts, *clean* and *corrupt* (e.g. "... red circle ..." and "... blue circle ..."), run from one
shared initial noise. Each cell of the grid is one more run of the base prompt in which some hook
points take the other run's values: with ``direction="noising"`` the clean run receives the corrupt
run's values (does this site carry the change?), with ``"denoising"`` the corrupt run receives the
clean run's (does this site restore it?). The metric says where each patched run ends up; the
default, the normalised projection onto the clean -> corrupt difference, reads 0 at the clean
output and 1 at the corrupt one.

Every grid dimension is either swept (named in `over`: one cell per entry) or joint (all its entries
patched together in every cell): ``hook`` (hook kinds such as "v_txt", "q_img", "out_img",
"attn2.q_img"), ``block``, ``step`` (single steps, "windows" = early/middle/late, or ranges),
``position`` (words and text positions for ``*_txt`` hooks, token-grid masks for ``*_img`` hooks)
and ``half`` of classifier-free guidance ("cond", "uncond", "both"): rows of a doubled batch, or, where
guidance is a second transformer call per step (`Family.calls_per_step`), the calls: "cond" patches each
step's first (conditional) call, "uncond" its second.

Cells run batched: each forward pass holds the clean run, the corrupt run and up to `batch_size`
patched runs, all from the same noise, and the patch copies rows inside that batch (`patching.rows`,
`replace_rows`), as one would by hand. The clean and corrupt runs are never patched.

>>> result = activation_patching(probe, "in the center a large red circle on a white background",
...                              "in the center a large blue circle on a white background",
...                              "v_txt", over=("block", "step"), steps="windows")
>>> result.values.shape, result.dims          # (6, 3), ('block', 'step')
>>> result.heatmap()                          # plotly; result.to_pandas() for a table
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import validation
from .._lazy import lazy
from ..constants import DIMS, DIRECTIONS, HALVES, OUTPUTS  # noqa: F401  (HALVES: moved to constants, stays here)
from ..families.base import step_and_half
from ..validation import InvalidInput
from .metrics import Metric, distance, projection
from .plan import _Cell, _make_cell, _member, _Planner
from .primitives import patch, replace_rows, rows, token_dim
from .result import PatchingResult

# shapes_judge reads the Shapes world's images: it lives in mmdit_probe.toy (moved there; this alias stays one
# release), found by name so that patching never imports the toy.
__getattr__, __dir__ = lazy(__name__, {"shapes_judge": "mmdit_probe.toy.patching"})


def activation_patching(probe, clean: str, corrupt: str, hooks: str | Sequence[str] | Mapping[str, str], *,
                        over: str | Sequence[str] = ("block",), blocks: Any = None, steps: Any = None,
                        positions: Any = None, half: str | Sequence[str] | None = None,
                        direction: str = "noising", metric: str | Metric = "projection", output: str = "image",
                        batch_size: int = 16, seed: int = 0, num_steps: int | None = None,
                        guidance: float | None = None, progress: bool = True, **generation: Any) -> PatchingResult:
    """Patch hook points between a clean and a corrupt run over a grid; see the module docstring.

    hooks: hook kinds ("v_txt", "q_img", "k_txt", "out_img", "attn2.q_img", ...).
    over: the dimensions to sweep, in the result's order, any of "hook", "block", "step",
        "position", "half"; every other dimension is patched jointly (all its entries at once).
    blocks: block indices, ranges, or a dict of named groups (default: every block; Flux's
        single-stream blocks follow the double-stream ones).
    steps: step indices, ranges, a dict of named ranges, or "windows" (early / middle / late thirds);
        default: every step (one cell per step when swept).
    positions: words of the prompts, text positions, ranges, or (rows, cols) token-grid masks for image
        hooks (boolean, or numbers in [0, 1] of which >= 0.5 select a token; NaN refused); a dict names them.
        Default: every token (swept: each word of the clean prompt).
    half: "cond", "uncond" or "both" rows of a classifier-free-guidance batch (default "both"; swept:
        all three).
    direction: "noising" (the clean run takes the corrupt run's values) or "denoising" (the reverse).
    metric: "projection" (0 = clean output, 1 = corrupt), "distance" (RMS change from the unpatched
        base run), `shapes_judge(...)` on the toy, or any f(patched (k, ...), clean, corrupt) -> (k,).
    output: "image" (pixels in [0, 1]; metrics see images) or "latent" (final latents, no decoding).
    batch_size: patched runs per forward pass (each pass also holds the clean and corrupt runs).
    num_steps, guidance, seed and other keywords: the generation (`Probe.inputs`), one shared noise.
    """
    over = (over,) if isinstance(over, str) else tuple(over)
    for dim in over:
        if dim not in DIMS:
            raise InvalidInput(f"over={over!r} holds {dim!r}: choose dimensions from {', '.join(DIMS)}")
    if len(set(over)) < len(over):
        raise InvalidInput(f"over={over!r} names a dimension twice")
    for name, value in (("clean", clean), ("corrupt", corrupt)):
        validation.prompt(name, value)
    validation.choice("direction", direction, DIRECTIONS)
    validation.choice("output", output, tuple(OUTPUTS))
    batch_size = validation.positive_int("batch_size", batch_size, default_hint="")
    validation.boolean("progress", progress)
    if isinstance(metric, str):
        validation.choice("metric", metric, ("projection", "distance"))
        if metric == "projection" and clean == corrupt:
            raise InvalidInput("clean and corrupt are the same prompt: the projection onto their difference is "
                               "undefined; use metric='distance' (0 = unchanged)")
    elif not callable(metric):
        raise InvalidInput(f"metric={metric!r} is not allowed: give 'projection', 'distance' or a function "
                           f"f(patched, clean, corrupt) -> one value per patched run")
    if getattr(metric, "needs_images", False) and output != "image":
        raise InvalidInput(f"metric {metric.__name__!r} reads images: run with output='image'")
    for key in ("output_type", "latents", "callback_on_step_end"):
        if key in generation:
            raise InvalidInput(f"activation_patching sets {key} itself; leave it out (output='image'/'latent' "
                               f"chooses the outputs)")
    base, source = (0, 1) if direction == "noising" else (1, 0)
    metric_name = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
    measure = {"projection": projection, "distance": distance(("clean", "corrupt")[base])}.get(metric, metric)

    # One check of the generation settings and the whole plan before any model call.
    inputs = probe.inputs([clean, corrupt], seed=seed, steps=num_steps, guidance=guidance,
                          output_type=OUTPUTS[output], **generation)
    calls = probe.family.calls_per_step(inputs)
    n_steps = inputs["num_inference_steps"]
    length = inputs.get("max_sequence_length") or probe.preset.max_sequence_length
    tables = (probe.tokens(clean, length), probe.tokens(corrupt, length))
    plan = _Planner(probe, tables, n_steps, probe.grid(inputs["height"], inputs["width"]),
                    probe.family.doubles_batch(inputs) or calls == 2)
    specs = {
        "hook": plan.hooks(hooks),
        "block": plan.blocks(blocks, "block" in over),
        "step": plan.steps(steps, "step" in over),
        "position": plan.positions(positions, "position" in over),
        "half": plan.halves(half, "half" in over),
    }
    for dim in DIMS:
        labels = [label for label, _ in specs[dim]]
        twice = [label for label in labels if labels.count(label) > 1]
        if dim in over and twice:
            raise InvalidInput(f"two {dim} entries share the label {twice[0]!r}: name them with a dict")
    cells = [_make_cell(specs, over, chosen) for chosen in itertools.product(*(range(len(specs[d])) for d in over))]
    for cell in cells:  # refuse unknown hooks / blocks and stream mismatches now, not mid-run
        plan.hook_names(cell.hooks, cell.blocks, cell.positions)
    if calls == 2:
        _check_negative_prompts(probe, inputs, cells, length)

    order = {name: i for i, name in enumerate(probe.hook_names)}
    pipeline = probe.pipeline
    saved_bar = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)  # one bar, over the batches
    values, outputs, references = [], [], None
    try:
        from tqdm.auto import tqdm

        chunks = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
        for chunk in tqdm(chunks, desc="activation patching", unit="batch", disable=not progress):
            out = _run_chunk(probe, plan, chunk, inputs, base, source, order, calls)
            measured = torch.as_tensor(measure(out[2:], out[0], out[1]), dtype=torch.float64).flatten().cpu()
            if measured.numel() != len(chunk):
                raise InvalidInput(f"metric {metric_name!r} returned {measured.numel()} values for {len(chunk)} "
                                   f"patched outputs: return one value per patched run")
            values.append(measured)
            outputs.append(out[2:].cpu())
            references = references or (out[0].cpu(), out[1].cpu())
    finally:
        pipeline._progress_bar_config = saved_bar
    shape = [len(specs[d]) for d in over]
    return PatchingResult(
        values=torch.cat(values).reshape(shape), dims=over,
        labels={d: [label for label, _ in specs[d]] for d in over},
        members={d: [_member(d, v) for _, v in specs[d]] for d in over},
        outputs=torch.cat(outputs).reshape(*shape, *outputs[0].shape[1:]),
        clean=references[0], corrupt=references[1], prompts=(clean, corrupt), direction=direction,
        metric=metric_name, output=output,
        joint={d: [_member(d, v) for _, v in specs[d]] for d in DIMS if d not in over})


def _check_negative_prompts(probe, inputs: dict[str, Any], cells: list[_Cell], length: int) -> None:
    """Where guidance is a second call per step, its text is the negative prompt's: one for both prompts or one each
    (a one-item list is made one each, so every run keeps its prompt's), and the text positions patched in that call
    must exist there (Qwen-Image's text is as long as the call's longest, so a shorter negative prompt has fewer)."""
    negative = inputs.get("negative_prompt")
    if isinstance(negative, list):
        if len(negative) not in (1, 2):
            raise InvalidInput(f"{len(negative)} negative prompts for the clean and corrupt prompts: give one "
                               f"negative_prompt, or one per prompt")
        inputs["negative_prompt"] = negative * (2 // len(negative))
    positions = sorted({p for cell in cells if cell.half != "cond" and cell.positions and cell.positions[0] == "txt"
                        for p in cell.positions[1]})
    if not positions:
        return
    negative = inputs.get("negative_prompt") or ""
    tables = [probe.tokens(text, length) for text in ([negative] * 2 if isinstance(negative, str) else negative)]
    try:
        probe.family.text_key_mask(tables, positions)
    except InvalidInput as error:
        raise InvalidInput(f"half 'uncond' / 'both' patches the unconditional call, whose text is the negative "
                           f"prompt: {error}; or patch half='cond'") from None


def _run_chunk(probe, plan: _Planner, chunk: list[_Cell], inputs: dict[str, Any], base: int, source: int,
               order: dict[str, int], calls: int = 1) -> torch.Tensor:
    """One batched generation: [clean, corrupt, patched runs...]; returns its outputs in that order."""
    n = 2 + len(chunk)
    runs = [0, 1] + [base] * len(chunk)
    run = {**inputs, "prompt": [inputs["prompt"][r] for r in runs],
           "latents": inputs["latents"][:1].repeat(n, *[1] * (inputs["latents"].ndim - 1))}
    if isinstance(inputs.get("negative_prompt"), list):  # one per prompt: each run keeps its prompt's
        run["negative_prompt"] = [inputs["negative_prompt"][r] for r in runs]
    run = probe.family.batch_inputs(run, n)
    # step -> hook name -> {(positions, half): [patched prompt indices]}: one replace_rows per group.
    by_step: dict[int, dict[str, dict[tuple, list[int]]]] = {}
    for i, cell in enumerate(chunk):
        names = plan.hook_names(cell.hooks, cell.blocks, cell.positions)
        positions = None if cell.positions is None else cell.positions[1]
        for step in cell.steps:
            for name in names:
                by_step.setdefault(step, {}).setdefault(name, {}).setdefault((positions, cell.half), []).append(2 + i)
    with probe.model.generate(**run) as tracer:
        for call in tracer.iter[0:(max(by_step) + 1) * calls]:
            step, half = step_and_half(call, calls)
            for name, groups in sorted(by_step.get(step, {}).items(), key=lambda site: order[site[0]]):
                dim = token_dim(name)
                patch(probe, name, lambda x, g=groups, d=dim, h=half: _copy(x, n, source, g, d, h))
        output = probe.model.output.save()
    return output.images


def _copy(x: torch.Tensor, n: int, source: int, groups: dict[tuple, list[int]], dim: int,
          call_half: str | None = None) -> torch.Tensor:
    """`x` with each group's patched rows taking the source run's values at the group's positions. `call_half`: the
    half this call computes where guidance is a second call (one row per run), None where one call holds every row."""
    for (positions, half), targets in groups.items():
        if call_half is None:
            target_rows = [r for t in targets for r in rows(n, x, t, half)]
            source_rows = rows(n, x, source, half) * len(targets)
        elif half in (call_half, "both"):
            target_rows, source_rows = list(targets), [source] * len(targets)
        else:
            continue
        x = replace_rows(x, source_rows, target_rows, positions, dim)
    return x

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
and ``half`` of a classifier-free-guidance batch ("cond", "uncond", "both").

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
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import validation
from ..attention import _doubles_batch, check_one_call_per_step
from ..taps import ACTIVATIONS, STREAMS
from ..validation import InvalidInput
from .primitives import patch, replace_rows, rows, token_dim

DIMS = ("hook", "block", "step", "position", "half")
HALVES = ("cond", "uncond", "both")
DIRECTIONS = ("noising", "denoising")
OUTPUTS = {"image": "pt", "latent": "latent"}
Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# -- metrics -------------------------------------------------------------------------------------
def projection(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Where each patched output lies along clean -> corrupt: <p - clean, d> / <d, d>, d = corrupt - clean.

    0 at the clean output, 1 at the corrupt one (the language-model "logit difference" analogue), on
    whatever the outputs are (images or latents); NaN, with a warning, where clean equals corrupt.
    """
    d = corrupt.flatten().double() - clean.flatten().double()
    norm = d @ d
    if norm == 0:
        warnings.warn("the clean and corrupt outputs are identical: the projection metric is undefined (NaN); "
                      "use metric='distance'", UserWarning, stacklevel=3)
    return (patched.flatten(1).double() - clean.flatten().double()) @ d / norm


def distance(base: str) -> Metric:
    """The root-mean-square difference of each patched output from the unpatched base run (0 = unchanged)."""
    def rms(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
        reference = clean if base == "clean" else corrupt
        return (patched.flatten(1).double() - reference.flatten().double()).pow(2).mean(1).sqrt()

    return rms


def shapes_judge(attribute: str = "colour", obj: int = 0) -> Metric:
    """A metric for the Shapes world (output="image"): the judge's reading of one object's attribute.

    1 where the judge reads the corrupt image's value (e.g. "blue"), 0 where it reads the clean
    image's, NaN where it reads something else or finds no object. Objects count from the left.

    >>> activation_patching(probe, clean, corrupt, "v_txt", metric=shapes_judge("colour"))
    """
    validation.choice("attribute", attribute, ("colour", "shape", "size", "position"))
    obj = validation.integer("obj", obj, minimum=0)
    from ..toy.judge import read_objects

    def read(image: torch.Tensor) -> str | None:
        if image.ndim != 3 or image.shape[0] != 3:
            raise InvalidInput("shapes_judge reads images: run with output='image'")
        pixels = (image.permute(1, 2, 0).double().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        found = read_objects(pixels)
        return getattr(found[obj], attribute) if len(found) > obj else None

    def judged(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
        low, high = read(clean), read(corrupt)
        if low is None or high is None or low == high:
            warnings.warn(f"the judge reads the clean and corrupt images' {attribute} as {low!r} and {high!r}: "
                          f"they must differ for this metric (NaN)", UserWarning, stacklevel=3)
        values = [1.0 if r == high and r != low else 0.0 if r == low and r != high else float("nan")
                  for r in map(read, patched)]
        return torch.tensor(values, dtype=torch.float64)

    judged.__name__ = f"judge {attribute}"
    judged.needs_images = True
    return judged


# -- the result ----------------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """A grid of metric values with named, labelled dimensions, and every cell's patched output.

    values: float64, one value per cell, dimensions in the order of `dims` (the `over` given).
    labels[dim]: the label of each entry along a dimension; members[dim]: what it stands for (hook
        kinds, block indices, step indices, token positions, guidance halves).
    outputs: each cell's final images (B, 3, H, W in [0, 1]) or latents, shape (*values.shape, ...).
    clean, corrupt: the two unpatched runs' outputs (from the first batch). Each cell is measured
        against the clean and corrupt runs of its own forward pass (they agree to within rounding).
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: dict[str, list[str]]
    members: dict[str, list[Any]]
    outputs: torch.Tensor
    clean: torch.Tensor
    corrupt: torch.Tensor
    prompts: tuple[str, str]
    direction: str
    metric: str
    output: str
    joint: dict[str, list[Any]] = field(default_factory=dict)  # what every cell patched along unswept dims

    def _index(self, where: Mapping[str, Any]) -> tuple:
        unknown = set(where) - set(self.dims)
        if unknown:
            raise InvalidInput(f"{sorted(unknown)} are not dimensions of this result; its dimensions are {self.dims}")
        index = []
        for dim in self.dims:
            if dim not in where:
                index.append(slice(None))
                continue
            label = str(where[dim])
            if label not in self.labels[dim]:
                raise InvalidInput(f"{dim}={where[dim]!r} is not in this result; its {dim} labels are "
                                   f"{self.labels[dim]}")
            index.append(self.labels[dim].index(label))
        return tuple(index)

    def value(self, **where: Any) -> float:
        """One cell's value, e.g. ``result.value(block=5, step="late")``."""
        found = self.values[self._index(where)]
        if found.ndim:
            raise InvalidInput(f"give a label for every dimension {self.dims} to pick one cell")
        return float(found)

    def cell_output(self, **where: Any) -> torch.Tensor:
        """One cell's patched output (image tensor or latents)."""
        index = self._index(where)
        if len(where) < len(self.dims):
            raise InvalidInput(f"give a label for every dimension {self.dims} to pick one cell")
        return self.outputs[index]

    def image(self, **where: Any):
        """One cell's patched image as PIL, e.g. ``image(block=5, step="late")``; ``image(run="clean")`` or
        ``image(run="corrupt")`` for the unpatched runs."""
        from PIL import Image

        if self.output != "image":
            raise InvalidInput("this result holds latents: run with output='image' to get images")
        run = where.pop("run", None)
        if run is not None:
            validation.choice("run", run, ("clean", "corrupt"))
            x = self.clean if run == "clean" else self.corrupt
        else:
            x = self.cell_output(**where)
        return Image.fromarray((x.permute(1, 2, 0).double().numpy() * 255).round().clip(0, 255).astype(np.uint8))

    def to_pandas(self):
        """A long table: one row per cell, one column per dimension (its label) and ``value``."""
        import pandas as pd

        cells = itertools.product(*(self.labels[d] for d in self.dims))
        table = pd.DataFrame([dict(zip(self.dims, c)) for c in cells], columns=list(self.dims))
        table["value"] = self.values.flatten().numpy()
        return table

    def heatmap(self, x: str | None = None, y: str | None = None, **where: Any):
        """A plotly heatmap of two dimensions (y down, x across), the others fixed by `where` labels.

        >>> result.heatmap()                                   # a 2-D result: dims[0] down, dims[1] across
        >>> result.heatmap(x="step", y="block", hook="v_txt")   # a 3-D one, at one hook
        """
        import plotly.express as px

        free = [d for d in self.dims if d not in where]
        if x is None and y is None:
            y, x = (free[0], free[1]) if len(free) >= 2 else (None, free[0] if free else None)
        elif x is None:
            x = next((d for d in free if d != y), None)
        elif y is None:
            y = next((d for d in free if d != x), None)
        if x is None:  # one free dimension: show it across
            x, y = y, None
        for dim in (x, y):
            if dim is not None and dim not in free:
                raise InvalidInput(f"{dim!r} is not a free dimension of this result; free: {free}")
        rest = [d for d in free if d not in (x, y)]
        if rest:
            raise InvalidInput(f"a heatmap shows two dimensions; fix {rest} with labels, e.g. "
                               f"heatmap({rest[0]}={self.labels[rest[0]][0]!r})")
        values = self.values[self._index(where)].numpy()
        kept = [d for d in self.dims if d in (x, y)]
        if y is None or x is None:
            values = values.reshape(1, -1)
        elif kept != [y, x]:
            values = values.T
        bounded = self.metric in ("projection",) or self.metric.startswith("judge")
        fixed = ", ".join(f"{k} {v}" for k, v in where.items())
        title = (f"{self.metric} ({self.direction}; 0 = clean, 1 = corrupt)" if bounded else
                 f"{self.metric} ({self.direction})") + (f" at {fixed}" if fixed else "")
        fig = px.imshow(values, x=self.labels[x] if x else None, y=self.labels[y] if y else [""],
                        color_continuous_scale="Viridis", zmin=0 if bounded else None,
                        zmax=1 if bounded else None, text_auto=".2f", aspect="auto",
                        labels={"x": x or "", "y": y or "", "color": self.metric}, title=title)
        fig.update_xaxes(type="category")
        fig.update_yaxes(type="category")
        return fig

    def __repr__(self) -> str:
        shape = " x ".join(f"{d} {len(self.labels[d])}" for d in self.dims) or "one cell"
        return (f"PatchingResult({shape}; {self.metric}, {self.direction}; clean {self.prompts[0]!r}, "
                f"corrupt {self.prompts[1]!r})")


# -- the experiment ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cell:
    hooks: tuple[str, ...]  # hook kinds, e.g. ("v_txt",) or ("attn2.q_img",)
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    positions: tuple[str, tuple[int, ...]] | None  # (stream, token positions); None: every token
    half: str


def _entries(name: str, spec: Any) -> list[tuple[str, Any]]:
    """(label, value) entries of a dimension's spec: a dict names them, a list lists them, else one entry."""
    if isinstance(spec, Mapping):
        if not spec:
            raise InvalidInput(f"{name}={{}} selects nothing")
        return [(str(k), v) for k, v in spec.items()]
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InvalidInput(f"{name}=[] selects nothing: give at least one entry, or leave {name} out")
        return [(_label(v), v) for v in spec]
    return [(_label(spec), spec)]


def _label(value: Any) -> str:
    if isinstance(value, range) and value.step == 1 and len(value):
        return f"{value.start}-{value.stop - 1}" if len(value) > 1 else str(value.start)
    if isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Integral) for v in value):
        return ",".join(map(str, value))
    return str(value)


def _indices(name: str, value: Any, upper: int, what: str) -> tuple[int, ...]:
    """Whole numbers in 0..upper-1 from an int, a range or a list of ints."""
    found = validation.index_list(name, list(value) if isinstance(value, range) else value, what=what)
    bad = [i for i in found if not 0 <= i < upper]
    if bad:
        raise InvalidInput(f"{name} holds {bad[0]}, out of range: this run has {what} 0..{upper - 1}")
    return tuple(found)


def _windows(n_steps: int) -> list[tuple[str, tuple[int, ...]]]:
    parts = np.array_split(np.arange(n_steps), 3)
    return [(label, tuple(int(s) for s in part)) for label, part in zip(("early", "middle", "late"), parts)
            if len(part)]


class _Planner:
    """Turns the dimension specs into labelled entries and the grid of cells, checking everything first."""

    def __init__(self, probe, tables, n_steps: int, grid: tuple[int, int], cfg: bool) -> None:
        self.probe, self.tables, self.n_steps, self.grid, self.cfg = probe, tables, n_steps, grid, cfg

    def hooks(self, spec: Any) -> list[tuple[str, tuple[str, ...]]]:
        entries = _entries("hooks", spec)
        kinds = [f"{a}_{s}" for a in ACTIVATIONS for s in STREAMS]
        found = []
        for label, kind in entries:
            if not isinstance(kind, str):
                raise InvalidInput(f"hooks holds {kind!r}: give hook kinds such as 'v_txt', 'q_img', 'out_img'")
            attention, _, short = kind.rpartition(".")
            short = short.removeprefix("hook_")
            if short not in kinds or attention not in ("", "attn", "attn2"):
                raise InvalidInput(f"unknown hook kind {kind!r}: give one of {', '.join(kinds)} (prefix 'attn2.' for "
                                   f"SD3.5-M's image-only attention)")
            found.append((label, ((f"{attention}." if attention == "attn2" else "") + short,)))
        return found

    def blocks(self, spec: Any, swept: bool) -> list[tuple[str, tuple[int, ...]]]:
        n = self.probe.family.num_blocks
        if spec is None:
            return [(str(b), (b,)) for b in range(n)] if swept else [("all", tuple(range(n)))]
        return [(label, _indices("blocks", v, n, "blocks")) for label, v in _entries("blocks", spec)]

    def steps(self, spec: Any, swept: bool) -> list[tuple[str, tuple[int, ...]]]:
        n = self.n_steps
        if spec is None:
            return [(str(s), (s,)) for s in range(n)] if swept else [("all", tuple(range(n)))]
        if spec == "windows":
            return _windows(n)
        if isinstance(spec, str):
            raise InvalidInput(f"steps={spec!r} is not allowed: give 'windows' (early/middle/late), step indices, "
                               f"ranges, or a dict of named ranges")
        return [(label, _indices("steps", v, n, "steps")) for label, v in _entries("steps", spec)]

    def positions(self, spec: Any, swept: bool) -> list[tuple[str, tuple[str, tuple[int, ...]] | None]]:
        """Entries (label, (stream, positions)), or None for every token."""
        if spec is None:
            if not swept:
                return [("all", None)]
            clean, corrupt = self.tables
            self.check_aligned()
            words = dict.fromkeys(t.word for t in clean.tokens if t.word is not None)
            found = []
            for word in words:
                positions = tuple(clean.positions(word))
                other = dict.fromkeys(t.word for t in corrupt.tokens if t.position in positions)
                label = word if list(other) == [word] else "/".join([word, *[w or "" for w in other if w != word]])
                found.append((label, ("txt", positions)))
            return found
        return [(label, self.position_entry(v)) for label, v in _entries("positions", spec)]

    def position_entry(self, value: Any) -> tuple[str, tuple[int, ...]]:
        if isinstance(value, (torch.Tensor, np.ndarray)):
            if value.ndim != 2 or tuple(value.shape) != tuple(self.grid):
                raise InvalidInput(f"an image-region mask must have the token grid's shape {tuple(self.grid)} "
                                   f"(rows, cols); got {tuple(value.shape)}")
            mask = validation.region_mask("an image-region mask", value)
            tokens = tuple(int(i) for i in torch.nonzero(mask.flatten()).flatten())
            if not tokens:
                raise InvalidInput(f"an image-region mask selects no token: give a mask with at least one True (or "
                                   f"value >= {validation.REGION_THRESHOLD})")
            return "img", tokens
        self.check_aligned()
        length = self.tables[0].text_length
        if isinstance(value, str):
            for table in self.tables:
                try:
                    return "txt", tuple(table.positions(value))
                except KeyError:
                    continue
            words = dict.fromkeys(self.tables[0].words + self.tables[1].words)
            raise InvalidInput(f"word {value!r} is in neither prompt; their words are: {', '.join(words)}")
        return "txt", _indices("positions", value, length, "text positions")

    def check_aligned(self) -> None:
        clean, corrupt = self.tables
        if clean.real_positions != corrupt.real_positions:
            raise InvalidInput(f"position patching pairs each token of one prompt with the same position of the "
                               f"other, but the prompts' token layouts differ ({len(clean.tokens)} real tokens in "
                               f"{clean.prompt!r}, {len(corrupt.tokens)} in {corrupt.prompt!r}): use prompts that "
                               f"differ word for word (one token each), or patch every position (positions=None)")

    def halves(self, spec: Any, swept: bool) -> list[tuple[str, str]]:
        if spec is None:
            spec = list(HALVES) if swept else "both"
        entries = _entries("half", spec)
        if not swept and len(entries) > 1:
            raise InvalidInput(f"half={spec!r} holds several halves: sweep them with over=(..., 'half'), or give "
                               f"one ('both' patches both)")
        for _, h in entries:
            validation.choice("half", h, HALVES)
            if h == "uncond" and not self.cfg:
                raise InvalidInput("half='uncond' needs classifier-free guidance, but this run has none (guidance <= 1 "
                                   "or a guidance-distilled model): patch half='cond' or 'both'")
        return [(label, h) for label, h in entries]

    def hook_names(self, kinds: Iterable[str], blocks: Iterable[int], positions) -> list[str]:
        """The hook point names of these kinds in these blocks, each checked against the model."""
        names = []
        for kind in kinds:
            attention, _, short = kind.rpartition(".")
            stream = short.rsplit("_", 1)[1]
            if positions is not None and positions[0] != stream:
                what = "words and text positions" if positions[0] == "txt" else "image-region masks"
                instead = "token-grid masks" if stream == "img" else "words or text positions"
                raise InvalidInput(f"{what} index the {positions[0]} stream, but hook {kind!r} is in the {stream} "
                                   f"stream: patch *_{positions[0]} hooks, or give {instead} as positions")
            for block in blocks:
                name = f"blocks.{block}.{attention or 'attn'}.hook_{short}"
                try:
                    self.probe.module_path(name)
                except (ValueError, IndexError) as error:
                    raise InvalidInput(f"hook {kind!r} in block {block}: {error}") from None
                names.append(name)
        return names


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
        if not isinstance(value, str):
            raise InvalidInput(f"{name}={value!r} is not allowed: give a prompt (str)")
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
    check_one_call_per_step(inputs)
    n_steps = inputs["num_inference_steps"]
    length = inputs.get("max_sequence_length") or probe.preset.max_sequence_length
    tables = (probe.tokens(clean, length), probe.tokens(corrupt, length))
    plan = _Planner(probe, tables, n_steps, probe.grid(inputs["height"], inputs["width"]),
                    _doubles_batch(probe.family, inputs))
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

    order = {name: i for i, name in enumerate(probe.hook_names)}
    pipeline = probe.pipeline
    saved_bar = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(disable=True)  # one bar, over the batches
    values, outputs, references = [], [], None
    try:
        from tqdm.auto import tqdm

        chunks = [cells[i:i + batch_size] for i in range(0, len(cells), batch_size)]
        for chunk in tqdm(chunks, desc="activation patching", unit="batch", disable=not progress):
            out = _run_chunk(probe, plan, chunk, inputs, base, source, order)
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


def _member(dim: str, value: Any) -> Any:
    if dim == "position":
        return None if value is None else list(value[1])
    return list(value) if isinstance(value, tuple) else value


def _make_cell(specs: dict[str, list], over: tuple[str, ...], chosen: tuple[int, ...]) -> _Cell:
    """One cell: the chosen entry along each swept dimension, the union of entries along the others."""
    picked = dict(zip(over, chosen))

    def along(dim: str) -> list:
        return [specs[dim][picked[dim]][1]] if dim in picked else [v for _, v in specs[dim]]

    positions = along("position")
    if None in positions:
        joined = None
    else:
        streams = {stream for stream, _ in positions}
        if len(streams) > 1:
            raise InvalidInput("positions mixes text positions (words) and image regions: sweep them separately")
        joined = (streams.pop(), tuple(sorted({p for _, group in positions for p in group})))
    return _Cell(hooks=tuple(dict.fromkeys(k for group in along("hook") for k in group)),
                 blocks=tuple(sorted({b for group in along("block") for b in group})),
                 steps=tuple(sorted({s for group in along("step") for s in group})),
                 positions=joined, half=along("half")[0])


def _run_chunk(probe, plan: _Planner, chunk: list[_Cell], inputs: dict[str, Any], base: int, source: int,
               order: dict[str, int]) -> torch.Tensor:
    """One batched generation: [clean, corrupt, patched runs...]; returns its outputs in that order."""
    prompts = list(inputs["prompt"])
    n = 2 + len(chunk)
    run = {**inputs, "prompt": [prompts[0], prompts[1]] + [prompts[base]] * len(chunk),
           "latents": inputs["latents"][:1].repeat(n, *[1] * (inputs["latents"].ndim - 1))}
    # (step, hook name) -> {(positions, half): [patched prompt indices]}: one replace_rows per group.
    sites: dict[tuple[int, str], dict[tuple, list[int]]] = {}
    for i, cell in enumerate(chunk):
        names = plan.hook_names(cell.hooks, cell.blocks, cell.positions)
        positions = None if cell.positions is None else cell.positions[1]
        for step in cell.steps:
            for name in names:
                sites.setdefault((step, name), {}).setdefault((positions, cell.half), []).append(2 + i)
    by_step: dict[int, list[tuple[str, dict]]] = {}
    for (step, name), groups in sites.items():
        by_step.setdefault(step, []).append((name, groups))
    last = max(by_step)
    with probe.model.generate(**run) as tracer:
        for step in tracer.iter[0:last + 1]:
            for name, groups in sorted(by_step.get(step, []), key=lambda site: order[site[0]]):
                dim = token_dim(name)
                patch(probe, name, lambda x, g=groups, d=dim: _copy(x, n, source, g, d))
        output = probe.model.output.save()
    return output.images


def _copy(x: torch.Tensor, n: int, source: int, groups: dict[tuple, list[int]], dim: int) -> torch.Tensor:
    """`x` with each group's patched rows taking the source run's values at the group's positions."""
    for (positions, half), targets in groups.items():
        target_rows = [r for t in targets for r in rows(n, x, t, half)]
        source_rows = rows(n, x, source, half) * len(targets)
        x = replace_rows(x, source_rows, target_rows, positions, dim)
    return x

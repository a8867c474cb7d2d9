"""The plan of an `activation_patching` grid: each dimension's spec turned into labelled entries, checked
against the model and the run before any model call, and the cells they make."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import names, validation
from ..constants import HALVES
from ..sampling.windows import step_windows
from ..validation import InvalidInput

_BLOCKS_MESSAGE = "{name} holds {block}, out of range: this run has blocks 0..{last}"


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
    found = validation.index_list(name, value, what=what)
    bad = [i for i in found if not 0 <= i < upper]
    if bad:
        raise InvalidInput(f"{name} holds {bad[0]}, out of range: this run has {what} 0..{upper - 1}")
    return tuple(found)


class _Planner:
    """Turns the dimension specs into labelled entries and the grid of cells, checking everything first."""

    def __init__(self, probe, tables, n_steps: int, grid: tuple[int, int], cfg: bool) -> None:
        self.probe, self.tables, self.n_steps, self.grid, self.cfg = probe, tables, n_steps, grid, cfg

    def hooks(self, spec: Any) -> list[tuple[str, tuple[str, ...]]]:
        found = []
        for label, kind in _entries("hooks", spec):
            if not isinstance(kind, str):
                raise InvalidInput(f"hooks holds {kind!r}: give hook kinds such as 'v_txt', 'q_img', 'out_img'")
            tap = names.parse_kind(kind)
            if tap is None:
                raise InvalidInput(f"unknown hook kind {kind!r}: give one of {', '.join(names.TAP_KINDS)} (prefix "
                                   f"'attn2.' for SD3.5-M's image-only attention)")
            found.append((label, (tap.kind,)))
        return found

    def blocks(self, spec: Any, swept: bool) -> list[tuple[str, tuple[int, ...]]]:
        n = self.probe.family.num_blocks
        if spec is None:
            return [(str(b), (b,)) for b in range(n)] if swept else [("all", tuple(range(n)))]
        return [(label, tuple(self.probe.family.check_blocks("blocks", v, template=_BLOCKS_MESSAGE)))
                for label, v in _entries("blocks", spec)]

    def steps(self, spec: Any, swept: bool) -> list[tuple[str, tuple[int, ...]]]:
        n = self.n_steps
        if spec is None:
            return [(str(s), (s,)) for s in range(n)] if swept else [("all", tuple(range(n)))]
        if spec == "windows":
            return [(label, tuple(part)) for label, part in step_windows(n).items() if label != "all" and part]
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
        return entries

    def hook_names(self, kinds: Iterable[str], blocks: Iterable[int], positions) -> list[str]:
        """The hook point names of these kinds in these blocks, each checked against the model."""
        found = []
        for kind in kinds:
            tap = names.parse_kind(kind)
            if positions is not None and positions[0] != tap.stream:
                what = "words and text positions" if positions[0] == "txt" else "image-region masks"
                instead = "token-grid masks" if tap.stream == "img" else "words or text positions"
                raise InvalidInput(f"{what} index the {positions[0]} stream, but hook {kind!r} is in the {tap.stream} "
                                   f"stream: patch *_{positions[0]} hooks, or give {instead} as positions")
            for block in blocks:
                name = names.tap(block, tap.short, tap.attention)
                try:
                    self.probe.module_path(name)
                except (ValueError, IndexError) as error:
                    raise InvalidInput(f"hook {kind!r} in block {block}: {error}") from None
                found.append(name)
        return found


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

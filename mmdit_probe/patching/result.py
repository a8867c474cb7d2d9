"""`PatchingResult`: the grid `activation_patching` returns, with its labels, outputs, table and heatmap."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import validation
from ..validation import InvalidInput


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

    def _index(self, where: Mapping[str, Any], one_cell: bool = False) -> tuple:
        unknown = set(where) - set(self.dims)
        if unknown:
            raise InvalidInput(f"{sorted(unknown)} are not dimensions of this result; its dimensions are {self.dims}")
        for dim in self.dims:
            if dim in where and str(where[dim]) not in self.labels[dim]:
                raise InvalidInput(f"{dim}={where[dim]!r} is not in this result; its {dim} labels are "
                                   f"{self.labels[dim]}")
        if one_cell and len(where) < len(self.dims):
            raise InvalidInput(f"give a label for every dimension {self.dims} to pick one cell")
        return tuple(self.labels[d].index(str(where[d])) if d in where else slice(None) for d in self.dims)

    def value(self, **where: Any) -> float:
        """One cell's value, e.g. ``result.value(block=5, step="late")``."""
        return float(self.values[self._index(where, one_cell=True)])

    def cell_output(self, **where: Any) -> torch.Tensor:
        """One cell's patched output (image tensor or latents)."""
        return self.outputs[self._index(where, one_cell=True)]

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
        if x is None and y is None and len(free) >= 2:
            y = free[0]  # then x = free[1]: dims[0] down, dims[1] across
        x = next((d for d in free if d != y), None) if x is None else x
        y = next((d for d in free if d != x), None) if y is None else y
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
        bounded = self.metric == "projection" or self.metric.startswith("judge")
        fixed = ", ".join(f"{k} {v}" for k, v in where.items())
        scale = "; 0 = clean, 1 = corrupt" if bounded else ""
        title = f"{self.metric} ({self.direction}{scale})" + (f" at {fixed}" if fixed else "")
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

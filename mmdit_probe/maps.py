"""`AttentionMaps`: recorded T2I / I2T maps with named dimensions, and the paper's remedies.

Stored tensors have dimensions (step, block, row, [head,] image token, text position): `row` is a
prompt (or, with rows="both", the unconditional prompts then the conditional ones), image tokens
are the token grid in raster order, and text positions are `positions` of the text sequence.
I2T maps are stored transposed, so in both kinds a word's map is a column.

>>> m = maps.word("cat", blocks="top")                   # mean over the preset's top layers, all steps
>>> m = smooth(m)                                         # Gaussian, kernel 7, sigma 1 on the token grid
>>> normalise(m).shape
(64, 64)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from scipy.ndimage import gaussian_filter

from .tokens import Token, TokenTable

KINDS = ("t2i", "i2t")


def smooth(m: torch.Tensor, kernel: int = 7, sigma: float = 1.0) -> torch.Tensor:
    """Gaussian smoothing of a (rows, cols) map on the token grid (the paper: kernel 7, sigma 1).

    On the CPU by scipy; a map on another device is smoothed there, by the same filter as two 1-D
    convolutions (equal to scipy's within float32 rounding), so editing masks never leave the GPU.
    """
    radius = kernel // 2
    if m.device.type != "cpu":
        return _gaussian_on_device(m.detach().float(), radius, sigma)
    out = gaussian_filter(m.detach().float().cpu().numpy(), sigma=sigma, truncate=radius / sigma, mode="reflect")
    return torch.from_numpy(out)


def _gaussian_on_device(m: torch.Tensor, radius: int, sigma: float) -> torch.Tensor:
    """scipy's `gaussian_filter(mode="reflect")` in torch: the same float64 weights, the same
    half-sample-symmetric edges (a b c | c b a), for grids of any size."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (x / sigma) ** 2)
    weights = (weights / weights.sum()).to(m)
    for dim in (0, 1):
        n = m.shape[dim]
        reflected = torch.arange(-radius, n + radius) % (2 * n)
        reflected = torch.where(reflected >= n, 2 * n - 1 - reflected, reflected).to(m.device)
        padded = m.index_select(dim, reflected).movedim(dim, -1)
        rows = padded.reshape(-1, 1, padded.shape[-1])
        m = F.conv1d(rows, weights.view(1, 1, -1)).reshape(*padded.shape[:-1], n).movedim(-1, dim)
    return m


def normalise(m: torch.Tensor, how: str = "max") -> torch.Tensor:
    """Scale a map to [0, 1]: by its max ("max", the paper's) or its range ("minmax")."""
    m = m.float()
    if how == "max":
        return m / m.max().clamp_min(1e-12)
    if how == "minmax":
        return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    raise ValueError(f"normalise how={how!r}; choose 'max' or 'minmax'")


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (rows, cols) map resized to an image's (height, width), bilinear."""
    return F.interpolate(m.float()[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


@dataclass
class AttentionMaps:
    t2i: torch.Tensor | None
    i2t: torch.Tensor | None
    steps: list[int]
    blocks: list[int]
    positions: list[int]
    tables: list[TokenTable]
    grid: tuple[int, int]
    rows: str = "cond"
    heads: str = "mean"
    top_layers: tuple[int, ...] = ()
    images: list = field(default_factory=list, repr=False)  # the generated images, when known
    attn2_blocks: list[int] = field(default_factory=list)  # SD3.5-M image-only attention, if recorded
    attn2_entropy: torch.Tensor | None = None  # (step, attn2 block, row, image token), nats

    @property
    def prompts(self) -> list[str]:
        return [t.prompt for t in self.tables]

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if getattr(self, k) is not None)

    def tensor(self, kind: str = "t2i") -> torch.Tensor:
        m = getattr(self, kind, None) if kind in KINDS else None
        if m is None:
            raise ValueError(f"no {kind!r} maps here; recorded kinds: {self.kinds}")
        return m

    # -- selection ----------------------------------------------------------
    def _block_index(self, blocks) -> list[int]:
        if blocks is None:
            return list(range(len(self.blocks)))
        if isinstance(blocks, str):
            if blocks != "top":
                raise ValueError(f"blocks={blocks!r}; use None (all), 'top' or a list of block indices")
            missing = [b for b in self.top_layers if b not in self.blocks]
            if missing or not self.top_layers:
                raise ValueError(f"top layers {list(self.top_layers)} were not all recorded (have {self.blocks})")
            blocks = self.top_layers
        blocks = [blocks] if isinstance(blocks, int) else list(blocks)
        for b in blocks:
            if b not in self.blocks:
                raise IndexError(f"block {b} was not recorded; recorded blocks: {self.blocks}")
        return [self.blocks.index(b) for b in blocks]

    def _step_index(self, steps) -> list[int]:
        if steps is None:
            return list(range(len(self.steps)))
        if isinstance(steps, slice):
            steps = range(*steps.indices(max(self.steps) + 1))
        steps = [steps] if isinstance(steps, int) else list(steps)
        for s in steps:
            if s not in self.steps:
                raise IndexError(f"step {s} was not recorded; recorded steps: {self.steps}")
        return [self.steps.index(s) for s in steps]

    def _row(self, prompt: int, half: str) -> int:
        n = len(self.tables)
        if not 0 <= prompt < n:
            raise IndexError(f"prompt index {prompt} out of range: {n} prompts")
        if self.rows == "both":
            return prompt + (n if half == "cond" else 0)
        if half != self.rows:
            raise ValueError(f"only the {self.rows!r} rows were recorded")
        return prompt

    def recorded_words(self, prompt: int = 0) -> list[str]:
        """The prompt's distinct words whose positions were all recorded (not truncated away)."""
        found = []
        for word in dict.fromkeys(self.tables[prompt].words):
            try:
                self.columns(word, prompt)
            except (KeyError, ValueError):
                continue
            found.append(word)
        return found

    def columns(self, words: str | int | Iterable[str | int], prompt: int = 0) -> list[int]:
        """Indices into the text dimension for a prompt's words (every tokenizer, every occurrence)."""
        wanted = self.tables[prompt].positions(words if isinstance(words, (str, int)) else list(words))
        missing = [p for p in wanted if p not in self.positions]
        if missing:
            raise ValueError(f"text positions {missing} were not recorded (recorded: {self.positions})")
        return [self.positions.index(p) for p in wanted]

    def select(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None, steps=None,
               head: int | None = None, half: str = "cond") -> torch.Tensor:
        """Maps of the chosen words before any averaging: (step, block, image token), word positions averaged."""
        m = self.tensor(kind)[self._step_index(steps)][:, self._block_index(blocks), self._row(prompt, half)]
        if self.heads == "all":
            m = m.float().mean(dim=2) if head is None else m[:, :, head]
        elif head is not None:
            raise ValueError("per-head maps were not recorded (heads='mean'); record with heads='all'")
        return m[..., self.columns(words, prompt)].float().mean(dim=-1)

    def word(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None, steps=None,
             head: int | None = None, half: str = "cond") -> torch.Tensor:
        """The (rows, cols) map of a word, or the mean of several, over the chosen blocks and steps.

        blocks: None (all recorded), "top" (the preset's top layers) or block indices.
        steps: None (all recorded), an index, a list or a slice.
        """
        m = self.select(words, prompt=prompt, kind=kind, blocks=blocks, steps=steps, head=head, half=half)
        return m.mean(dim=(0, 1)).reshape(self.grid)

    def per_block(self, words, *, prompt: int = 0, kind: str = "t2i", steps=None) -> torch.Tensor:
        """(block, rows, cols): a word's map in every recorded block, averaged over steps."""
        m = self.select(words, prompt=prompt, kind=kind, steps=steps)
        return m.mean(dim=0).reshape(len(self.blocks), *self.grid)

    def per_step(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None) -> torch.Tensor:
        """(step, rows, cols): a word's map at every recorded step, averaged over blocks."""
        m = self.select(words, prompt=prompt, kind=kind, blocks=blocks)
        return m.mean(dim=1).reshape(len(self.steps), *self.grid)

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | Path, *, extra_tensors: dict[str, torch.Tensor] | None = None,
             extra_metadata: dict[str, str] | None = None) -> Path:
        """One safetensors file: the maps, with everything else as JSON metadata. `extra_tensors` and
        `extra_metadata` ride along in the same file (a sweep record adds its image, masks and scores);
        `load` ignores them."""
        path = Path(path)
        meta = {
            "steps": self.steps, "blocks": self.blocks, "positions": self.positions, "grid": list(self.grid),
            "rows": self.rows, "heads": self.heads, "top_layers": list(self.top_layers),
            "attn2_blocks": self.attn2_blocks,
            "tables": [{"prompt": t.prompt, "text_length": t.text_length,
                        "tokens": [[k.position, k.encoder, k.piece, k.word, k.word_index] for k in t.tokens]}
                       for t in self.tables],
        }
        tensors = {k: getattr(self, k).contiguous() for k in self.kinds}
        if self.attn2_entropy is not None:
            tensors["attn2_entropy"] = self.attn2_entropy.contiguous()
        tensors.update({k: v.contiguous() for k, v in (extra_tensors or {}).items()})
        save_file(tensors, str(path), metadata={**(extra_metadata or {}), "mmdit_probe": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionMaps:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["mmdit_probe"])
        tensors = load_file(str(path))
        tables = [TokenTable(t["prompt"], [Token(*row) for row in t["tokens"]], t["text_length"])
                  for t in meta["tables"]]
        return cls(t2i=tensors.get("t2i"), i2t=tensors.get("i2t"), steps=meta["steps"], blocks=meta["blocks"],
                   positions=meta["positions"], tables=tables, grid=tuple(meta["grid"]), rows=meta["rows"],
                   heads=meta["heads"], top_layers=tuple(meta["top_layers"]),
                   attn2_blocks=meta.get("attn2_blocks", []), attn2_entropy=tensors.get("attn2_entropy"))

    def __repr__(self) -> str:
        shape = {k: tuple(getattr(self, k).shape) for k in self.kinds}
        return (f"AttentionMaps({len(self.tables)} prompt(s), steps {self.steps[0]}..{self.steps[-1]} "
                f"({len(self.steps)}), blocks {self.blocks}, grid {self.grid}, {len(self.positions)} text positions, "
                f"rows={self.rows!r}, heads={self.heads!r}, shapes {shape})")


"""`AttentionMaps`: recorded attention maps with named dimensions (`dims`), and the paper's remedies.

Stored tensors have dimensions (step, block, row, [head,] image token, text position): `row` is a
prompt (or, with rows="both", the unconditional prompts then the conditional ones), image tokens
are the token grid in raster order, and text positions are `positions` of the text sequence.
I2T maps are stored transposed, so in both kinds a word's map is a column. Concept maps
(`mmdit_probe.concepts`: "concept", output space, and "concept_xattn") have a concept where the
others have a text position: (step, block, row, image token, concept). T2T maps are (step, block, row,
[head,] text query position, text key position); I2I maps (step, block, row, [head,] image key token, query
patch), the query patches being `queries` (raster indices of the token grid), so a patch's map is a column too.
Reference-region maps (a context image's tokens, Flux.1 Kontext) have a reference token there: R2I and I2R (step,
block, row, [head,] image token, reference token); T2R has the reference grid where the others have the image's:
(step, block, row, [head,] reference token, text position).

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
from safetensors.torch import save_file
from scipy.ndimage import gaussian_filter

from . import validation
from .constants import (  # noqa: F401  (KINDS: maps.KINDS stays one release)
    CONCEPT_KINDS,
    KINDS,
    MAP_AXES,
    MAP_KINDS,
    REFERENCE_KINDS,
    REGIONS,
)
from .files import written_atomically
from .tokens import Token, TokenTable, normalise_word


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
    concepts: list[list[str]] = field(default_factory=list)  # each prompt's concept words, if concept tokens ran
    # {"concept": output-space maps, "concept_xattn": image queries x concept keys}, each (step, block, row,
    # image token, concept), softmax over the concepts
    concept_tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    t2t: torch.Tensor | None = None  # (step, block, row, [head,] text query, text key): text positions both
    i2i: torch.Tensor | None = None  # (step, block, row, [head,] image key token, query patch)
    queries: list[int] = field(default_factory=list)  # the I2I query patches, raster indices of the grid
    r2i: torch.Tensor | None = None  # image queries x reference keys: where each reference patch lands on the output
    i2r: torch.Tensor | None = None  # reference queries x image keys, stored (image token, reference token)
    t2r: torch.Tensor | None = None  # reference queries x text keys: (reference token, text position)
    reference_grid: tuple[int, int] | None = None  # the reference image's token grid, where reference maps ran

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], **fields) -> AttentionMaps:
        """Maps from {kind: tensor} (any kinds of `MAP_KINDS`) and the other fields: concept kinds go in
        `concept_tensors`, every other kind is the field of its name."""
        kinds = {k: tensors.get(k) for k, last in MAP_KINDS.items() if last != "concept"}
        concepts = {k: tensors[k] for k, last in MAP_KINDS.items() if last == "concept" and k in tensors}
        return cls(**kinds, concept_tensors=concepts, **fields)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every recorded map tensor by kind, in the order of `MAP_KINDS`."""
        held = {**self.concept_tensors, **{k: getattr(self, k) for k, last in MAP_KINDS.items() if last != "concept"}}
        return {k: held[k] for k in MAP_KINDS if held.get(k) is not None}

    @property
    def prompts(self) -> list[str]:
        return [t.prompt for t in self.tables]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The word-map kinds recorded ("t2i", "i2t")."""
        return tuple(k for k in self.tensors if MAP_KINDS[k] == "text")

    @property
    def region_kinds(self) -> tuple[str, ...]:
        """The attention regions recorded, of `constants.REGIONS` ("t2i", "i2t", "t2t", "i2i", "r2i", ...)."""
        return tuple(k for k in self.tensors if k in REGIONS)

    def dims(self, kind: str) -> tuple[str, ...]:
        """The names of a kind's stored dimensions.

        >>> maps.dims("i2i")
        ('step', 'block', 'row', 'image', 'query')
        """
        m = self.tensor(kind)
        axes = MAP_AXES[MAP_KINDS[kind]]
        head = ("head",) if m.ndim == 3 + len(axes) + 1 else ()
        return ("step", "block", "row", *head, *axes)

    @property
    def reference_kinds(self) -> tuple[str, ...]:
        """The reference-region map kinds recorded ("r2i", "i2r", "t2r"), if any."""
        return tuple(k for k in self.tensors if k in REFERENCE_KINDS)

    def reference_columns(self, patches=None) -> list[int]:
        """Indices into the reference dimension: None (every reference token), a (rows, cols) boolean mask over the
        reference grid, or (row, col) pairs of it."""
        if self.reference_grid is None:
            raise ValueError("no reference maps here: record kinds r2i/i2r/t2r with a context image (image=...)")
        rows, cols = self.reference_grid
        if patches is None:
            return list(range(rows * cols))
        if isinstance(patches, torch.Tensor):
            if patches.dtype != torch.bool or tuple(patches.shape) != (rows, cols):
                raise validation.InvalidInput(f"patches must be a boolean ({rows}, {cols}) mask over the reference "
                                              f"grid; got a {patches.dtype} tensor of shape {tuple(patches.shape)}")
            found = patches.flatten().nonzero().flatten().tolist()
        else:
            pairs = [patches] if isinstance(patches, tuple) else list(patches)
            if not pairs or not all(_is_patch(p, tuple) for p in pairs):
                raise validation.InvalidInput(f"patches={patches!r} is not allowed: give (row, col) pairs of the "
                                              f"reference grid {self.reference_grid}, a boolean mask, or None")
            for r, c in pairs:
                if not (0 <= r < rows and 0 <= c < cols):
                    raise IndexError(f"patch ({r}, {c}) is outside the reference grid {self.reference_grid}")
            found = [r * cols + c for r, c in pairs]
        if not found:
            raise validation.InvalidInput("patches selects no reference token: the mask is all False")
        return found

    @property
    def concept_kinds(self) -> tuple[str, ...]:
        """The concept map kinds recorded ("concept", "concept_xattn"), if concept tokens ran."""
        return tuple(k for k in self.tensors if MAP_KINDS[k] == "concept")

    def tensor(self, kind: str = "t2i") -> torch.Tensor:
        m = self.tensors.get(kind)
        if m is None:
            hint = {**dict.fromkeys(CONCEPT_KINDS, " (record with concepts=[...] for concept maps)"),
                    "t2t": " (record with kinds=[..., 't2t'])",
                    "i2i": " (record with kinds=[..., 'i2i'] and queries=...)"}
            raise ValueError(f"no {kind!r} maps here; recorded kinds: {self.region_kinds + self.concept_kinds}"
                             f"{hint.get(kind, '')}")
        return m

    def concept_columns(self, concepts, prompt: int = 0) -> list[int]:
        """Indices into the concept dimension of a prompt's concept maps."""
        names = validation.concept_list("concepts", concepts)
        prompt = _prompt(prompt, len(self.concepts), none="no concept maps here: record with concepts=[...]")
        found = []
        for name in names:
            word = normalise_word(name)
            if word not in self.concepts[prompt]:
                raise KeyError(f"concept {name!r} was not recorded for prompt {prompt}; its concepts: "
                               f"{self.concepts[prompt]}")
            found.append(self.concepts[prompt].index(word))
        return found

    # -- selection ----------------------------------------------------------
    def _block_index(self, blocks) -> list[int]:
        if isinstance(blocks, str):
            if blocks != "top":
                raise validation.InvalidInput(f"blocks={blocks!r}; use None (all), 'top' or a list of block indices")
            missing = [b for b in self.top_layers if b not in self.blocks]
            if missing or not self.top_layers:
                raise ValueError(f"top layers {list(self.top_layers)} were not all recorded (have {self.blocks})")
            blocks = self.top_layers
        return _indices_in("block", blocks, self.blocks)

    def _step_index(self, steps) -> list[int]:
        if isinstance(steps, slice):
            chosen = list(range(*steps.indices(max(self.steps) + 1)))
            if not chosen:
                raise validation.InvalidInput(f"steps={steps} selects no step: the recorded steps are {self.steps}")
            steps = chosen
        return _indices_in("step", steps, self.steps)

    def _row(self, prompt: int, half: str) -> int:
        n = len(self.tables)
        prompt = _prompt(prompt, n)
        validation.choice("half", half, ("cond", "uncond"))
        if self.rows == "both":
            return prompt + (n if half == "cond" else 0)
        if half != self.rows:
            raise ValueError(f"only the {self.rows!r} rows were recorded; half={half!r} is not available")
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
        words = validation.word_list("words", words)
        prompt = _prompt(prompt, len(self.tables))
        wanted = self.tables[prompt].positions(words)
        if not wanted:
            raise ValueError(f"words {words} of prompt {prompt} have no text positions: they were cut off by the "
                             f"tokenizers' length; shorten the prompt or raise max_sequence_length")
        missing = [p for p in wanted if p not in self.positions]
        if missing:
            raise ValueError(f"text positions {missing} were not recorded (recorded: {self.positions})")
        return [self.positions.index(p) for p in wanted]

    def select(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None, steps=None,
               head: int | None = None, half: str = "cond") -> torch.Tensor:
        """Maps of the chosen words before any averaging: (step, block, image token), word positions averaged.
        For concept kinds, `words` are concepts."""
        other = {"attn2": f"{kind} maps have no word dimension: read maps.{kind} (step, attn2 block, row, image "
                          f"token)",
                 "text_pair": f"{kind} maps are text x text: read maps.text_matrix() or maps.region('{kind}')",
                 "patch": f"{kind} maps are indexed by query patch: read maps.patch((row, col)) or "
                          f"maps.region('{kind}')"}
        if MAP_KINDS.get(kind) in other:
            raise ValueError(other[MAP_KINDS[kind]])
        if kind in CONCEPT_KINDS:
            if head is not None:
                raise ValueError("concept maps are head means; head= is for t2i/i2t maps recorded with heads='all'")
            m = self.tensor(kind)[self._step_index(steps)][:, self._block_index(blocks), self._row(prompt, half)]
            return m[..., self.concept_columns(words, prompt)].float().mean(dim=-1)
        m = self.region(kind, prompt=prompt, blocks=blocks, steps=steps, head=head, half=half)
        # R2I / I2R columns are reference patches (`reference_columns`), the others' text positions.
        columns = self.reference_columns(words) if MAP_KINDS.get(kind) == "reference" else self.columns(words, prompt)
        return m[..., columns].float().mean(dim=-1)

    def region(self, kind: str, *, prompt: int = 0, blocks=None, steps=None, head: int | None = None,
               half: str = "cond") -> torch.Tensor:
        """One prompt's maps of an attention region ("t2i", "i2t", "t2t", "i2i") before any averaging over blocks
        or steps: (step, block, first axis, last axis) as `dims(kind)` names them, heads averaged unless `head`.

        >>> maps.region("t2t", blocks="top").shape   # (steps, blocks, text query, text key)
        """
        validation.choice("kind", kind, tuple(REGIONS))
        m = self.tensor(kind)[self._step_index(steps)][:, self._block_index(blocks), self._row(prompt, half)]
        if head is None:
            return m.float().mean(dim=2) if self.heads == "all" else m
        head = validation.integer("head", head, minimum=0)
        if self.heads != "all":
            raise ValueError("per-head maps were not recorded (heads='mean'); record with heads='all'")
        if head >= m.shape[2]:
            raise IndexError(f"head {head} out of range: the maps have heads 0..{m.shape[2] - 1}")
        return m[:, :, head]

    def query_columns(self, patches) -> list[int]:
        """Indices into the query dimension of I2I maps for a patch (row, col) or a list of patches."""
        if not self.queries:
            raise ValueError("no I2I maps here: record with kinds=[..., 'i2i'] and queries=...")
        rows, cols = self.grid
        pairs = [patches] if _is_patch(patches, (tuple, list)) else patches
        if not isinstance(pairs, (tuple, list)) or not pairs:
            raise validation.InvalidInput(f"patches must be a patch (row, col) or a list of patches; got {patches!r}")
        found = []
        for patch in pairs:
            if not _is_patch(patch, (tuple, list)):
                raise validation.InvalidInput(f"a patch is (row, col), two whole numbers; got {patch!r}")
            if not (0 <= patch[0] < rows and 0 <= patch[1] < cols):
                raise IndexError(f"patch {tuple(patch)} is outside the {rows} x {cols} token grid")
            raster = patch[0] * cols + patch[1]
            if raster not in self.queries:
                raise KeyError(f"patch {tuple(patch)} was not recorded as an I2I query; recorded patches: "
                               f"{self.query_patches[:8]}{' ...' if len(self.queries) > 8 else ''}")
            found.append(self.queries.index(raster))
        return found

    @property
    def query_patches(self) -> list[tuple[int, int]]:
        """The recorded I2I query patches as (row, col) of the token grid."""
        return [divmod(q, self.grid[1]) for q in self.queries]

    def patch(self, patches, *, prompt: int = 0, blocks=None, steps=None, head: int | None = None,
              half: str = "cond") -> torch.Tensor:
        """The (rows, cols) I2I map of a query patch (row, col), or the mean of several: how much that image query
        attends to each image key, over the chosen blocks and steps (as `word`).

        >>> maps.patch((2, 3), blocks="top")
        """
        columns = self.query_columns(patches)
        m = self.region("i2i", prompt=prompt, blocks=blocks, steps=steps, head=head, half=half)
        return m[..., columns].float().mean(dim=(0, 1, -1)).reshape(self.grid)

    def text_matrix(self, *, prompt: int = 0, blocks=None, steps=None, head: int | None = None,
                    half: str = "cond") -> torch.Tensor:
        """The T2T map (text query, text key) over the recorded positions (`positions`), averaged over the chosen
        blocks and steps; label its axes with `position_labels(prompt)`.

        >>> maps.text_matrix(blocks="top").shape
        """
        return self.region("t2t", prompt=prompt, blocks=blocks, steps=steps, head=head, half=half).float().mean(
            dim=(0, 1))

    def position_labels(self, prompt: int = 0) -> list[str]:
        """A label per recorded text position: the prompt's token piece there, or its position number."""
        prompt = _prompt(prompt, len(self.tables))
        pieces = {t.position: t.piece for t in self.tables[prompt].tokens}
        return [pieces.get(p, str(p)) for p in self.positions]

    def _grid_of(self, kind: str) -> tuple[int, int]:
        """The token grid a kind's maps are over: the reference image's for T2R, the output image's otherwise."""
        return self.reference_grid if MAP_KINDS.get(kind) == "reference_text" else self.grid

    def word(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None, steps=None,
             head: int | None = None, half: str = "cond") -> torch.Tensor:
        """The (rows, cols) map of a word, or the mean of several, over the chosen blocks and steps.

        blocks: None (all recorded), "top" (the preset's top layers) or block indices.
        steps: None (all recorded), an index, a list or a slice.
        """
        m = self.select(words, prompt=prompt, kind=kind, blocks=blocks, steps=steps, head=head, half=half)
        return m.mean(dim=(0, 1)).reshape(self._grid_of(kind))

    def reference(self, patches=None, *, prompt: int = 0, kind: str = "r2i", blocks=None, steps=None,
                  head: int | None = None, half: str = "cond") -> torch.Tensor:
        """The (rows, cols) output-image map of reference patches, or the mean of several, like `word`: kind "r2i"
        (image queries x reference keys: where the patches' content lands on the output) or "i2r" (the patches'
        queries over the image keys). `patches`: None (the whole reference), a boolean mask over the reference
        grid, or (row, col) pairs. A word's map over the reference image is ``word(w, kind="t2r")``.

        >>> maps.reference([(2, 3)], blocks="top")
        """
        validation.choice("kind", kind, tuple(k for k in REFERENCE_KINDS if MAP_KINDS[k] == "reference"))
        return self.word(patches, prompt=prompt, kind=kind, blocks=blocks, steps=steps, head=head, half=half)

    def concept(self, concepts, *, prompt: int = 0, kind: str = "concept", blocks=None, steps=None,
                half: str = "cond") -> torch.Tensor:
        """The (rows, cols) map of a concept, or the mean of several, like `word`: kind "concept" (output space,
        ConceptAttention's) or "concept_xattn" (image queries x concept keys).

        >>> maps.concept("circle", blocks="top")
        """
        validation.choice("kind", kind, CONCEPT_KINDS)
        return self.word(concepts, prompt=prompt, kind=kind, blocks=blocks, steps=steps, half=half)

    def per_block(self, words, *, prompt: int = 0, kind: str = "t2i", steps=None) -> torch.Tensor:
        """(block, rows, cols): a word's map in every recorded block, averaged over steps."""
        m = self.select(words, prompt=prompt, kind=kind, steps=steps)
        return m.mean(dim=0).reshape(len(self.blocks), *self._grid_of(kind))

    def per_step(self, words, *, prompt: int = 0, kind: str = "t2i", blocks=None) -> torch.Tensor:
        """(step, rows, cols): a word's map at every recorded step, averaged over blocks."""
        m = self.select(words, prompt=prompt, kind=kind, blocks=blocks)
        return m.mean(dim=1).reshape(len(self.steps), *self._grid_of(kind))

    # -- persistence ---------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, extra_tensors: dict[str, torch.Tensor] | None = None,
             extra_metadata: dict[str, str] | None = None) -> Path:
        """One safetensors file: the maps, with everything else as JSON metadata. `extra_tensors` and
        `extra_metadata` ride along in the same file (a sweep record adds its image, masks and scores);
        `load` ignores them. The file is written whole or not at all (a temporary file in the same
        folder, renamed into place); an existing file is replaced only with `overwrite=True`."""
        path = Path(path)
        validation.boolean("overwrite", overwrite)
        if path.is_dir():
            raise IsADirectoryError(f"cannot save maps to {path}: it is a folder; give a file name such as "
                                    f"{path / 'maps.safetensors'}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists: pass overwrite=True to replace it, or choose another name")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save maps to {path}: the folder {path.parent} does not exist")
        meta = {
            "steps": self.steps, "blocks": self.blocks, "positions": self.positions, "grid": list(self.grid),
            "rows": self.rows, "heads": self.heads, "top_layers": list(self.top_layers),
            "attn2_blocks": self.attn2_blocks, "concepts": self.concepts,
            **({"queries": self.queries} if self.queries else {}),
            **({"reference_grid": list(self.reference_grid)} if self.reference_grid is not None else {}),
            "tables": [{"prompt": t.prompt, "text_length": t.text_length,
                        "tokens": [[k.position, k.encoder, k.piece, k.word, k.word_index] for k in t.tokens]}
                       for t in self.tables],
        }
        tensors = {k: m.contiguous() for k, m in self.tensors.items()}
        for name, value in (extra_tensors or {}).items():
            if name in tensors or not isinstance(value, torch.Tensor):
                raise validation.InvalidInput(f"extra_tensors[{name!r}] must be a tensor under a name other than "
                                              f"{', '.join(tensors)}")
            tensors[name] = value.contiguous()
        for name, value in (extra_metadata or {}).items():
            if name == "mmdit_probe" or not isinstance(name, str) or not isinstance(value, str):
                raise validation.InvalidInput(f"extra_metadata[{name!r}] must be a string under a name other than "
                                              f"'mmdit_probe'")
        try:
            with written_atomically(path) as temporary:
                save_file(tensors, str(temporary), metadata={**(extra_metadata or {}), "mmdit_probe": json.dumps(meta)})
        except Exception as error:
            reason = str(error).replace(str(temporary), str(path))
            raise OSError(f"could not save maps to {path}: {reason}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttentionMaps:
        """Maps written by `save`; the file is checked (metadata schema, tensor shapes against the token
        tables and grid, finite values, concept maps as probabilities over their prompt's concepts) and every
        error (`validation.InvalidInput`) names it."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no maps file at {path}")
        try:
            with safe_open(str(path), "pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in MAP_KINDS if k in f.keys()}
        except Exception as error:
            raise validation.InvalidInput(f"{path} is not a readable safetensors file ({error})") from None
        if "mmdit_probe" not in metadata:
            raise validation.InvalidInput(f"{path} holds no attention maps: its metadata has no 'mmdit_probe' entry "
                                          f"(files written by AttentionMaps.save have one)")
        try:
            meta = json.loads(metadata["mmdit_probe"])
        except json.JSONDecodeError as error:
            raise validation.InvalidInput(f"{path}: the maps metadata is not valid JSON ({error})") from None
        try:
            _check_meta(meta)
            tables = [TokenTable(t["prompt"], [Token(*row) for row in t["tokens"]], t["text_length"])
                      for t in meta["tables"]]
            maps = cls.from_tensors(tensors, steps=meta["steps"], blocks=meta["blocks"], positions=meta["positions"],
                                    tables=tables, grid=tuple(meta["grid"]), rows=meta["rows"], heads=meta["heads"],
                                    top_layers=tuple(meta["top_layers"]), attn2_blocks=meta.get("attn2_blocks", []),
                                    concepts=meta.get("concepts", []), queries=meta.get("queries", []),
                                    reference_grid=tuple(meta["reference_grid"]) if "reference_grid" in meta else None)
            maps._check_tensors()
        except (KeyError, TypeError, ValueError) as error:
            raise validation.InvalidInput(f"{path} is not a valid maps file: {error}") from None
        return maps

    def _check_tensors(self) -> None:
        """Tensor shapes against the metadata (steps, blocks, rows, grid, positions) and finite values."""
        if not self.region_kinds:
            raise ValueError("it holds neither t2i nor i2t maps (nor t2t, i2i, r2i, i2r, t2r)")
        if ("i2i" in self.tensors) != bool(self.queries):
            raise ValueError("its I2I maps and its metadata's query patches ('queries') come only together")
        if any(not 0 <= q < self.grid[0] * self.grid[1] for q in self.queries) or sorted(set(self.queries)) != \
                self.queries:
            raise ValueError(f"its query patches {self.queries[:8]} are not distinct sorted raster indices of the "
                             f"{self.grid} token grid")
        if self.reference_kinds and self.reference_grid is None:
            raise ValueError(f"it holds reference maps ({', '.join(self.reference_kinds)}) but its metadata gives no "
                             f"reference_grid")
        if self.concepts and not self.concept_kinds:
            raise ValueError("its metadata names concepts but holds no concept maps")
        if self.concept_kinds and not self.concepts:
            raise ValueError(f"it holds concept maps ({', '.join(self.concept_kinds)}) but its metadata names no "
                             f"concepts")
        for kind, m in self.tensors.items():
            expected, says = self._shape(kind, m)
            if tuple(m.shape) != expected:
                raise ValueError(f"{kind} has shape {tuple(m.shape)}, but its metadata ({says}) says {expected}")
            if not m.is_floating_point() or not torch.isfinite(m).all():
                raise ValueError(f"{kind} holds NaN, infinite or non-float values (a damaged file)")
            if MAP_KINDS[kind] == "concept":
                self._check_probabilities(kind, m.float())
        length = max(t.text_length for t in self.tables)
        if any(not 0 <= p < length for p in self.positions):
            raise ValueError(f"positions {self.positions} do not fit the token tables ({length} text positions)")

    def _shape(self, kind: str, m: torch.Tensor) -> tuple[tuple[int, ...], str]:
        """The shape the metadata gives a kind's tensor, and the entries it comes from."""
        rows = len(self.tables) * (2 if self.rows == "both" else 1)
        size = {"image": (self.grid[0] * self.grid[1], "grid"), "text": (len(self.positions), "positions"),
                "query": (len(self.queries), "queries"),
                "concept": (max(map(len, self.concepts), default=0), "concepts"),
                "reference": (self.reference_grid[0] * self.reference_grid[1] if self.reference_grid else 0,
                              "reference_grid")}
        axes = MAP_AXES[MAP_KINDS[kind]]
        per_head = kind in REGIONS and self.heads == "all"
        heads = (m.shape[3],) if per_head and m.ndim == 6 else ()
        blocks = ("attn2_blocks", self.attn2_blocks) if MAP_KINDS[kind] == "attn2" else ("blocks", self.blocks)
        says = ["steps", blocks[0], "rows", *(["heads"] if per_head else []), *(size[a][1] for a in axes)]
        return (len(self.steps), len(blocks[1]), rows, *heads, *(size[a][0] for a in axes)), ", ".join(says)

    def _check_probabilities(self, kind: str, m: torch.Tensor) -> None:
        """Concept maps are a softmax over each prompt's own concepts: every value in [0, 1], each image token's
        values summing to one over the prompt's concepts, zero in a shorter list's spare slots."""
        what = (f"{kind} concept maps must be probabilities (a softmax over each prompt's concepts: values in [0, 1] "
                f"that sum to one per image token)")
        if m.min() < 0 or m.max() > 1:
            raise ValueError(f"{what}, but they run from {float(m.min()):g} to {float(m.max()):g}")
        n = len(self.tables)
        for row in range(m.shape[2]):
            prompt = row % n  # rows="both": the unconditional prompts, then the conditional ones
            own = len(self.concepts[prompt])
            total = m[:, :, row, :, :own].sum(dim=-1)
            # Maps are stored in a compact dtype (bfloat16 keeps about 3 significant digits): sums round off.
            if (total - 1).abs().max() > 0.02 or m[:, :, row, :, own:].any():
                raise ValueError(f"{what}, but prompt {prompt}'s sum to {float(total.min()):g} to "
                                 f"{float(total.max()):g} over its {own} concepts")

    def __repr__(self) -> str:
        shape = {k: tuple(m.shape) for k, m in self.tensors.items()}
        return (f"AttentionMaps({len(self.tables)} prompt(s), steps {self.steps[0]}..{self.steps[-1]} "
                f"({len(self.steps)}), blocks {self.blocks}, grid {self.grid}, {len(self.positions)} text positions, "
                f"rows={self.rows!r}, heads={self.heads!r}, shapes {shape})")


def _prompt(value, n: int, none: str | None = None) -> int:
    """A prompt index checked against the `n` prompts held; with none held, ValueError(`none`) if given."""
    prompt = validation.integer("prompt", value, minimum=0)
    if n == 0 and none is not None:
        raise ValueError(none)
    if prompt >= n:
        raise IndexError(f"prompt index {prompt} out of range: {n} prompts")
    return prompt


def _indices_in(noun: str, chosen, recorded: list[int]) -> list[int]:
    """Where the chosen block or step indices sit among the recorded ones (None: all of them)."""
    if chosen is None:
        return list(range(len(recorded)))
    chosen = validation.index_list(f"{noun}s", chosen, what=f"recorded {noun} indices")
    for c in chosen:
        if c not in recorded:
            raise IndexError(f"{noun} {c} was not recorded; recorded {noun}s: {recorded}")
    return [recorded.index(c) for c in chosen]


def _is_patch(value, types) -> bool:
    """Whether `value` is a (row, col) pair of Python ints, as one of `types`."""
    return isinstance(value, types) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_meta(meta) -> None:
    """The metadata schema `AttentionMaps.save` writes; raises ValueError saying which entry is wrong."""
    def ints(name, value, *, empty=False):
        if not isinstance(value, list) or (not value and not empty) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"metadata {name!r} must be a list of whole numbers; got {value!r}")

    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be a JSON object; got {type(meta).__name__}")
    for name in ("steps", "blocks", "positions", "grid"):
        ints(name, meta.get(name))
    ints("top_layers", meta.get("top_layers"), empty=True)
    ints("attn2_blocks", meta.get("attn2_blocks", []), empty=True)
    ints("queries", meta.get("queries", []), empty=True)
    concepts = meta.get("concepts", [])
    if not isinstance(concepts, list) or not all(isinstance(c, list) and all(isinstance(w, str) for w in c)
                                                 for c in concepts):
        raise ValueError(f"metadata 'concepts' must be one list of words per prompt; got {concepts!r}")
    for name in [n for n in ("reference_grid", "grid") if n in meta]:
        ints(name, meta[name])
        if len(meta[name]) != 2 or min(meta[name]) < 1:
            raise ValueError(f"metadata {name!r} must be [rows, cols] of positive numbers; got {meta[name]!r}")
    if meta.get("rows") not in ("cond", "uncond", "both") or meta.get("heads") not in ("mean", "all"):
        raise ValueError(f"metadata rows={meta.get('rows')!r} / heads={meta.get('heads')!r} are not valid")
    tables = meta.get("tables")
    if not isinstance(tables, list) or not tables:
        raise ValueError("metadata 'tables' must be a non-empty list of token tables")
    for t in tables:
        if not isinstance(t, dict) or not isinstance(t.get("prompt"), str) or not isinstance(t.get("text_length"), int):
            raise ValueError(f"a token table needs a prompt and a text_length; got {t!r:.200}")
        for row in t.get("tokens", None) or []:
            if not (isinstance(row, list) and len(row) == 5 and isinstance(row[0], int) and isinstance(row[1], str)
                    and isinstance(row[2], str) and (row[3] is None or isinstance(row[3], str))
                    and (row[4] is None or isinstance(row[4], int))):
                raise ValueError(f"a token row must be [position, encoder, piece, word, word index]; got {row!r}")
        if not isinstance(t.get("tokens"), list):
            raise ValueError("a token table needs a list of tokens")
    _check_concept_meta(concepts, len(tables))


def _check_concept_meta(concepts: list[list[str]], n_prompts: int) -> None:
    """Concept lists as the recorder writes them: none, or one per prompt, each of two or more distinct
    normalised words (`maps.concept` reads the first column of a word, and a softmax over one concept is 1.0)."""
    if concepts and len(concepts) != n_prompts:
        raise ValueError(f"metadata 'concepts' holds {len(concepts)} concept lists for {n_prompts} prompt(s): it needs "
                         f"one list per prompt")
    for prompt, words in enumerate(concepts):
        for word in words:
            if normalise_word(word) != word or " " in word:
                raise ValueError(f"metadata concept {word!r} of prompt {prompt} is not a concept word as recorded "
                                 f"(one lowercase word without punctuation)")
            if words.count(word) > 1:
                raise ValueError(f"metadata 'concepts' names the concept {word!r} twice for prompt {prompt}: each "
                                 f"column of the concept maps is one concept")
        if len(words) < 2:
            raise ValueError(f"metadata 'concepts': prompt {prompt} has fewer than two concepts ({words}): concept "
                             f"maps are a softmax over two or more concepts")

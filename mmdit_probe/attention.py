"""Record exact attention maps of the four regions of joint attention inside an nnsight generation.

T2I: each image query's attention probability on each text key; I2T: each text query's on each
image key; T2T: each text query's on each text key; I2I: chosen image queries' on each image key.
All are the true softmax over the *whole* joint key set, from the tapped q and k and the row
normalisers (log-sum-exp) that the fused kernel returns; the joint N x N matrix is never built (I2I
of every query patch costs N x N values per block and step, hence its size guard). Maps are reduced
as they are recorded (head mean, conditional half, the prompt's real text positions by default) and
copied to host memory in a compact dtype, by copies that do not wait for the
GPU: recording adds no synchronisation inside the block loop.

`record(call)` takes the index of the transformer call, which `tracer.iter` walks. With one call per denoising step it
is the step. Where guidance runs as a second call per step (`Family.calls_per_step`: Chroma and Flux.2 Klein base at
guidance > 1, true CFG), call 2s is step s's conditional call and 2s + 1 its unconditional one: loop over
`recorder.calls` (every call of the run) and the maps come out as with one call per step, rows="both" stored as a
doubled batch's [uncond | cond].

>>> inputs = probe.inputs(["on the left a red circle"], seed=0)
>>> recorder = AttentionRecorder(probe, inputs)
>>> with probe.model.generate(**inputs) as tracer:
...     for call in tracer.iter[0:recorder.calls]:
...         recorder.record(call)
>>> maps = recorder.maps()
>>> maps.word("red").shape            # (rows, cols) of the token grid
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from . import validation
from .concepts import ConceptStream, check_concepts, concept_maps
from .constants import CONCEPT_KINDS, KINDS, MAP_AXES, MAP_KINDS, REFERENCE_KINDS, REGIONS, ROWS
from .families import Family
from .families.base import step_and_half
from .kernels import attention_entropy, query_chunks
from .maps import AttentionMaps
from .names import RECORDED_TAPS, RECORDED_TAPS_REFERENCE, tap
from .tokens import normalise_word
from .validation import one_call_per_step as check_one_call_per_step  # noqa: F401

# Moved: attention_entropy to .kernels, check_one_call_per_step to validation.one_call_per_step, _doubles_batch to
# Family.doubles_batch; these aliases stay one release.
_doubles_batch = Family.doubles_batch


class AttentionRecorder:
    """Collects maps step by step; `maps()` returns them as an `AttentionMaps`.

    blocks: global block indices (default: every block, Flux single-stream ones included).
    steps: denoising step indices to keep (default: all).
    kinds: any of "t2i", "i2t" (the default, both), "t2t", "i2i" (`constants.REGIONS`); where the family has a
        reference region (Flux.1 Kontext with a context image) also "r2i", "i2r", "t2r", over the reference image's
        token grid.
    heads: "mean" (default) or "all".
    rows: "cond" (default), "uncond" or "both" halves of classifier-free guidance (a doubled batch, or a second
        transformer call per step). Unconditional rows see the negative prompt's text at the same text positions (its
        own padding and mask, as the kernel applied them).
    positions: "real" (default: the prompts' real tokens), "all", text positions, or words.
    queries: the image query patches of I2I maps (needed with "i2i", refused without): a patch (row, col), a box
        (slice(r0, r1), slice(c0, c1)), a list of patches, or "all" (refused with InvalidInput naming the memory
        when their maps alone exceed max_gb: N x N values per step, block and row).
    max_gb: refuse (before running) a recording whose maps would exceed this much memory.
    attn2: also record SD3.5-M's image-only attention (`attn2`) of the chosen blocks that have it,
        as the entropy of each image query's attention (nats, head mean); never mixed into T2I/I2T.
    concepts: words carried through the blocks as concept tokens (`mmdit_probe.concepts`), one list for
        every prompt or one list per prompt; their "concept" (output space) and "concept_xattn" maps
        are recorded beside T2I/I2T, same blocks, steps and rows, head mean. The generation is unchanged.
    """

    def __init__(self, probe, inputs: dict[str, Any], *, blocks: Iterable[int] | None = None,
                 steps: Iterable[int] | None = None, kinds: Iterable[str] = KINDS, heads: str = "mean",
                 rows: str = "cond", positions: str | list[int] | list[str] = "real", queries: Any = None,
                 dtype: torch.dtype = torch.float16, max_gb: float = 4.0, attn2: bool = False,
                 concepts: Iterable[str] | Iterable[Iterable[str]] | None = None) -> None:
        self.probe = probe
        family = probe.family
        self.calls_per_step = family.calls_per_step(inputs)
        self.prompts = list(inputs["prompt"])
        self.n_steps = inputs["num_inference_steps"]
        self.calls = self.n_steps * self.calls_per_step  # what `tracer.iter` walks: every transformer call
        length = inputs.get("max_sequence_length", probe.preset.max_sequence_length)
        # Every option is checked here, before the generation runs (validation names what to do).
        if blocks is not None:
            blocks = family.check_blocks("blocks", blocks)
        if steps is not None:
            steps = validation.index_list("steps", steps, what="step indices")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        allowed = tuple(k for k in REGIONS if family.has_reference or k not in REFERENCE_KINDS)
        if not kinds or not set(kinds) <= set(allowed) or len(set(kinds)) < len(kinds):
            raise validation.InvalidInput(f"kinds must be a non-empty subset of {allowed}, each once; got {kinds}")
        if ("i2i" in kinds) != (queries is not None):
            raise validation.InvalidInput("I2I maps need their query patches: pass kinds with 'i2i' and queries=... "
                                          "(a patch (row, col), a box, a list of patches or 'all') together")
        self.reference_grid = None
        if set(kinds) & set(REFERENCE_KINDS):
            self.reference_grid = family.reference_grid(inputs)
            if self.reference_grid is None:
                raise validation.InvalidInput(f"kinds {[k for k in kinds if k in REFERENCE_KINDS]} are maps of the "
                                              f"reference region, but these inputs carry no reference image: pass "
                                              f"image=... (the context image)")
        validation.choice("heads", heads, ("mean", "all"))
        validation.choice("rows", rows, ROWS)
        if rows != "cond" and not (family.doubles_batch(inputs) or self.calls_per_step == 2):
            raise validation.InvalidInput(f"rows={rows!r} needs classifier-free guidance, but this run has none "
                                          f"(guidance <= 1 or a guidance-distilled model): record rows='cond'")
        # The guidance halves recorded, each its own transformer call where guidance is a second call.
        self._halves = ((None,) if self.calls_per_step == 1 else
                        {"cond": ("cond",), "uncond": ("uncond",), "both": ("uncond", "cond")}[rows])
        if not isinstance(positions, str):
            positions = validation.word_list("positions", positions)
        dtype = validation.float_dtype("dtype", dtype)
        max_gb = validation.number("max_gb", max_gb, low=0.0)
        validation.boolean("attn2", attn2)
        self.tables = [probe.tokens(p, length) for p in self.prompts]
        self.grid = family.grid(inputs["height"], inputs["width"])
        self.blocks = sorted(range(family.num_blocks) if blocks is None else blocks)
        self.steps = set(range(self.n_steps) if steps is None else steps)
        for s in self.steps:
            if not 0 <= s < self.n_steps:
                raise IndexError(f"step {s} out of range: this run has steps 0..{self.n_steps - 1}")
        self.kinds = kinds
        self.heads, self.rows, self.dtype = heads, rows, dtype
        self.positions = self._positions(positions, family.text_length(length))
        self.queries = [] if queries is None else self._queries(queries)
        # Which tokens of each stream a stored axis holds, by name (moved to each device once, in `_indices`).
        self._index = {"text": torch.tensor(self.positions), "query": torch.tensor(self.queries, dtype=torch.long)}
        # Padding the kernel masks out, per guidance half: a second call's text is the negative prompt's.
        self._key_mask = {None: family.text_key_mask(self.tables, self.positions)}
        self._key_mask["cond"] = self._key_mask[None]
        if "uncond" in self._halves:
            self._key_mask["uncond"] = self._negative_key_mask(inputs, length)
        self.attn2_blocks = [a.block for a in family.attentions if a.name == "attn2" and a.block in self.blocks]
        if attn2 and not self.attn2_blocks:
            raise validation.InvalidInput("attn2=True, but none of the chosen blocks has an image-only attn2 "
                                          "(SD3.5-M has, in blocks 0-12)")
        self.attn2_blocks = self.attn2_blocks if attn2 else []
        self._concept_lists = None if concepts is None else check_concepts(concepts, len(self.prompts))
        # The blocks of every kind recorded (concept maps: the concept stream's, which are the recorder's).
        self._kind_blocks = {**dict.fromkeys(kinds, self.blocks),
                             **dict.fromkeys(CONCEPT_KINDS if concepts is not None else (), self.blocks),
                             **({"attn2_entropy": self.attn2_blocks} if self.attn2_blocks else {})}
        self._check_memory(family, max_gb, all_queries=isinstance(queries, str))
        # Maps go straight into one host buffer per kind, (step, block, ...), with copies that do not
        # wait for the GPU (pinned memory): nothing inside the block loop synchronises.
        self._step_slot = {s: i for i, s in enumerate(sorted(self.steps))}
        self._host: dict[str, torch.Tensor] = {}
        self._filled: dict[str, set[tuple[int, int, str | None]]] = {}  # (step, block, half)
        self._device: torch.device | None = None
        self._current: tuple[int, dict[str, dict[int, torch.Tensor]]] = (-1, {})  # this step's maps, on device
        self._index_on: dict[tuple[torch.device, int], tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        attentions = [family.attention(b) for b in self.blocks] + [family.attention(b, "attn2")
                                                                   for b in self.attn2_blocks]
        self._processors = [probe.pipeline.transformer.get_submodule(a.path).processor for a in attentions]
        self._processor_of = dict(zip(self.blocks, self._processors))  # the joint attention's, by block
        self.concepts = None
        if concepts is not None:
            self.concepts = ConceptStream(probe, concepts, len(self.prompts), length, blocks=self.blocks,
                                          records=self.records, keep=self._keep_concepts)
            self.concepts.install()
        for processor in self._processors:
            processor.record_lse = True

    def _negative_key_mask(self, inputs: dict[str, Any], length: int) -> torch.Tensor | None:
        """The text key mask of the unconditional call: its text is the negative prompts' (Chroma's default "",
        Flux.2 Klein's always ""), padded and masked as their own."""
        if inputs.get("negative_prompt_embeds") is not None:
            raise validation.InvalidInput(f"rows={self.rows!r} records the unconditional call, whose text the recorder "
                                          f"reads from negative_prompt: pass negative_prompt as text rather than "
                                          f"negative_prompt_embeds, or record rows='cond'")
        negative = inputs.get("negative_prompt")
        if negative is None or isinstance(negative, str):  # one negative prompt for every prompt ("" by default)
            negative = ["" if negative is None else negative] * len(self.prompts)
        negative = validation.prompts(negative, "negative_prompt")
        if len(negative) != len(self.prompts):
            raise validation.InvalidInput(f"{len(negative)} negative prompts for {len(self.prompts)} prompts: give one "
                                          f"negative_prompt, or one per prompt")
        tables = [self.probe.tokens(p, length) for p in negative]
        try:
            return self.probe.family.text_key_mask(tables, self.positions)
        except validation.InvalidInput as error:
            raise validation.InvalidInput(f"rows={self.rows!r} records the unconditional call, whose text is the "
                                          f"negative prompt: {error}; or record rows='cond'") from None

    def estimated_bytes(self, heads: int) -> int:
        """Host memory of the maps: every recorded kind's (step, block, row, [head,] ...) buffer."""
        return sum(self._kind_bytes(kind, heads) for kind in self._kind_blocks)

    def _kind_bytes(self, kind: str, heads: int) -> int:
        """Host memory of one kind's buffer: its axes (`constants.MAP_AXES`) at this recording's sizes."""
        size = {"image": self.grid[0] * self.grid[1], "text": len(self.positions), "query": len(self.queries),
                "concept": max(map(len, self._concept_lists or ()), default=0),
                "reference": math.prod(self.reference_grid) if self.reference_grid else 0}
        per_row = math.prod(size[axis] for axis in MAP_AXES[MAP_KINDS[kind]])
        per_row *= heads if kind in REGIONS and self.heads == "all" else 1
        rows = len(self.prompts) * (2 if self.rows == "both" else 1)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return len(self.steps) * len(self._kind_blocks[kind]) * rows * per_row * itemsize

    def _check_memory(self, family, max_gb: float, all_queries: bool) -> None:
        heads = self.probe.pipeline.transformer.get_submodule(family.attention(self.blocks[0]).path).heads
        if all_queries and self._kind_bytes("i2i", heads) / 2**30 > max_gb:
            tokens = self.grid[0] * self.grid[1]
            raise validation.InvalidInput(
                f"queries='all' maps every image query's attention on every image key: {tokens} x {tokens} values "
                f"per step, block, row{' and head' if self.heads == 'all' else ''}, about "
                f"{self._kind_bytes('i2i', heads) / 2**30:.3g} GB for {len(self.steps)} step(s) and "
                f"{len(self.blocks)} block(s) (limit max_gb={max_gb}). Choose queries: a patch (row, col), a box "
                f"(slice(r0, r1), slice(c0, c1)) or a list of patches; or record fewer steps or blocks; or raise "
                f"max_gb.")
        need = self.estimated_bytes(heads) / 2**30
        if need > max_gb:
            raise MemoryError(
                f"recording these maps needs about {need:.1f} GB (limit max_gb={max_gb}). Record fewer blocks or "
                f"steps, heads='mean', positions=[words], fewer I2I queries, or kinds=['t2i'] — or raise max_gb.")

    def _queries(self, queries) -> list[int]:
        """The I2I query patches as raster indices of the token grid, sorted and distinct."""
        rows, cols = self.grid
        forms = ("queries must be 'all', a patch (row, col), a box (slice(r0, r1), slice(c0, c1)) or a list of "
                 f"patches, on the {rows} x {cols} token grid")
        if isinstance(queries, str):
            validation.choice("queries", queries, ("all",))
            return list(range(rows * cols))

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if isinstance(queries, tuple) and len(queries) == 2 and all(isinstance(s, slice) for s in queries):
            for s, n, axis in zip(queries, (rows, cols), ("rows", "cols")):
                start, stop = (0 if s.start is None else s.start), (n if s.stop is None else s.stop)
                if not (whole(start) and whole(stop) and s.step in (None, 1) and 0 <= start < stop <= n):
                    raise validation.InvalidInput(f"queries box {axis} {s} must be slice(start, stop) with "
                                                  f"0 <= start < stop <= {n}: {forms}")
            return torch.arange(rows * cols).view(rows, cols)[queries].flatten().tolist()
        if isinstance(queries, (list, tuple)) and len(queries) == 2 and all(whole(v) for v in queries):
            queries = [queries]
        if not isinstance(queries, (list, tuple)) or not queries:
            raise validation.InvalidInput(f"{forms}; got {queries!r:.200}")
        chosen = set()
        for patch in queries:
            if not (isinstance(patch, (list, tuple)) and len(patch) == 2 and all(whole(v) for v in patch)):
                raise validation.InvalidInput(f"{forms}; got the patch {patch!r:.100}")
            if not (0 <= patch[0] < rows and 0 <= patch[1] < cols):
                raise validation.InvalidInput(f"query patch {tuple(patch)} is outside the {rows} x {cols} token grid "
                                              f"(rows 0..{rows - 1}, cols 0..{cols - 1})")
            chosen.add(patch[0] * cols + patch[1])
        return sorted(chosen)

    def _positions(self, positions, text_length: int) -> list[int]:
        if isinstance(positions, str):
            if positions == "real":
                return sorted(set().union(*(t.real_positions for t in self.tables)))
            if positions == "all":
                return list(range(text_length))
            positions = [positions]
        chosen: set[int] = set()
        for p in positions:
            if isinstance(p, str):
                found = set().union(*(t.positions(p) for t in self.tables if normalise_word(p) in t.words))
                if not found:
                    raise KeyError(f"word {p!r} is in none of the prompts {self.prompts}")
                chosen.update(found)
            elif 0 <= p < text_length:
                chosen.add(int(p))
            else:
                raise IndexError(f"text position {p} out of range 0..{text_length - 1}")
        return sorted(chosen)

    def _row_index(self, batch: int, half: str | None = None) -> torch.Tensor:
        """The rows of a transformer call's batch to record: of a doubled batch the recorded half's, of a one-half call
        (`half`: guidance as a second call) all of them."""
        n = len(self.prompts)
        if half is not None:
            if batch != n:
                raise ValueError(f"unexpected batch of {batch} rows for {n} prompts in the {half} call")
            return torch.arange(n)
        if batch == n:
            if self.rows == "cond":
                return torch.arange(n)
            raise ValueError(f"rows={self.rows!r} needs classifier-free guidance, but this run has none "
                             f"(guidance <= 1 or a guidance-distilled model)")
        if batch != 2 * n:
            raise ValueError(f"unexpected batch of {batch} rows for {n} prompts")
        return {"cond": torch.arange(n, 2 * n), "uncond": torch.arange(n), "both": torch.arange(2 * n)}[self.rows]

    def _indices(self, device: torch.device, batch: int,
                 half: str | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Row indices and the axes' token indices on the taps' device, copied there once (a copy can wait for
        the GPU)."""
        key = (device, batch, half is None)
        if key not in self._index_on:
            self._index_on[key] = (self._row_index(batch, half).to(device),
                                   {axis: index.to(device) for axis, index in self._index.items()})
        return self._index_on[key]

    def step_and_half(self, call: int) -> tuple[int, str | None]:
        """The denoising step of a transformer call, and its guidance half where guidance is a second call (None where
        one call holds every row)."""
        return step_and_half(call, self.calls_per_step)

    def records(self, call: int, block: int) -> bool:
        """Whether `record_block(call, block)` records anything (a chosen block and step, a recorded half)."""
        step, half = self.step_and_half(call)
        return step in self.steps and block in self.blocks and half in self._halves

    # Largest float32 logits block (bytes) of one region computed at once; larger ones go in query chunks.
    CHUNK_BYTES = 2**29

    def _region(self, kind: str, taps: dict[str, torch.Tensor], index: dict[str, torch.Tensor], bias) -> torch.Tensor:
        """One region's probabilities exp(q k^T / sqrt d - lse_q) from the taps (`constants.REGIONS`): text tokens
        are the recorded positions; image tokens are every token on the first stored axis, the chosen query
        patches on the last; reference tokens every one. `bias` (from `_mask`) gives the slice of the attention
        mask the kernel applied, if any. Returns (row, [head,] first axis, last axis)."""
        q_stream, k_stream, order = REGIONS[kind]
        # Each stream's tokens on the first and on the last stored axis (None: every token).
        first = {"txt": index["text"], "img": None, "ref": None}
        last = {"txt": index["text"], "img": index["query"], "ref": None}
        q_index, k_index = (last, first) if order == "kq" else (first, last)
        q_index, k_index = q_index[q_stream], k_index[k_stream]
        q, lse, k = taps[f"q_{q_stream}"], taps[f"lse_{q_stream}"], taps[f"k_{k_stream}"]
        if q_index is not None:
            q, lse = q[:, :, q_index], lse[:, :, q_index]
        if k_index is not None:
            k = k[:, :, k_index]
        parts = []
        for rows, logits in query_chunks(q, k, self.CHUNK_BYTES, bias(q_stream, k_stream, q_index, k_index)):
            p = torch.exp(logits - lse[:, :, rows].unsqueeze(-1))
            parts.append(p.mean(dim=1) if self.heads == "mean" else p)
        m = torch.cat(parts, dim=-2)
        return m.transpose(-1, -2) if order == "kq" else m

    def _keep(self, name: str, call: int, block: int, blocks: list[int], m: torch.Tensor) -> None:
        """Copy one call's map into its host buffer's (step, block) slot, at its rows (a second call's half: the
        unconditional rows first, as in a doubled batch), without waiting for the device."""
        step, half = self.step_and_half(call)
        rows = m.shape[0] * len(self._halves)
        if name not in self._host:
            self._device = m.device
            self._host[name] = torch.empty((len(self._step_slot), len(blocks), rows, *m.shape[1:]), dtype=m.dtype,
                                           pin_memory=m.device.type == "cuda")
            self._filled[name] = set()
        start = self._halves.index(half) * m.shape[0]
        self._host[name][self._step_slot[step], blocks.index(block), start:start + m.shape[0]].copy_(
            m, non_blocking=True)
        self._filled[name].add((step, block, half))
        if name in KINDS:
            if self._current[0] != call:
                self._current = (call, {})
            self._current[1].setdefault(name, {})[block] = m

    TAPS = RECORDED_TAPS

    def record(self, call: int) -> None:
        """Read the taps of the chosen blocks in this transformer call (`tracer.iter`'s index: the step where there
        is one call per step; see the module docstring). Call once per call inside the trace."""
        for block in self.blocks:
            self.record_block(call, block)

    def record_block(self, call: int, block: int, **known: torch.Tensor) -> None:
        """Record one block in one transformer call. Taps already read by the caller in this call (e.g. after
        patching them) are passed as `known` (q_img=..., k_img=...) and are not read again."""
        if not self.records(call, block):
            return
        half = self.step_and_half(call)[1]
        names = RECORDED_TAPS_REFERENCE if self.reference_grid is not None else self.TAPS
        taps = {name: known[name] if name in known else self.probe.hook(tap(block, name)).output for name in names}
        rows, index = self._indices(taps["q_img"].device, taps["q_img"].shape[0], half)
        if self.reference_grid is not None and taps["q_ref"].shape[2] != math.prod(self.reference_grid):
            raise RuntimeError(f"block {block} saw {taps['q_ref'].shape[2]} reference tokens, but the reference "
                               f"image's grid {self.reference_grid} has {math.prod(self.reference_grid)}: record with "
                               f"the inputs given to the recorder")
        bias = self._mask(block, rows, taps["q_img"].shape[2], taps["q_txt"].shape[2], half)
        taps = {name: t[rows].float() for name, t in taps.items()}
        for kind in self.kinds:
            self._keep(kind, call, block, self.blocks, self._region(kind, taps, index, bias).to(self.dtype))
        if block in self.attn2_blocks:
            q, k, lse = (self.probe.hook(tap(block, n, "attn2")).output[rows].float()
                         for n in ("q_img", "k_img", "lse_img"))
            self._keep("attn2_entropy", call, block, self.attn2_blocks,
                       attention_entropy(q, k, lse).mean(dim=1).to(self.dtype))

    def _keep_concepts(self, call: int, block: int, q_img: torch.Tensor, k_concepts: torch.Tensor,
                       image_out: torch.Tensor, concept_out: torch.Tensor) -> None:
        """Keep one block's concept maps (`concepts.concept_maps`) at the recorded rows."""
        rows, _ = self._indices(q_img.device, q_img.shape[0], self.step_and_half(call)[1])
        key_mask = self.concepts.key_mask
        maps = concept_maps(*(t[rows] for t in (q_img, k_concepts, image_out, concept_out)),
                            None if key_mask is None else key_mask[rows])
        for kind, m in maps.items():
            self._keep(kind, call, block, self.blocks, m.to(self.dtype))

    def _mask(self, block: int, rows: torch.Tensor, n_image: int, n_text: int, half: str | None = None):
        """A function (query stream, key stream, query tokens, key tokens) -> the slice of this call's attention mask
        that the kernel applied to those logits, (row, 1, queries, keys), or None where the call had no mask (token
        indices within each stream; None: all of them). Only the slices are copied, never the whole mask. Two
        sources: the mask a processor kept from the call (Chroma's own, or one given through
        `joint_attention_kwargs`), or the family's text key mask (Qwen-Image's padding: rows are [uncond | cond] or
        cond, so a row's prompt is row % prompts; the negative prompts' in a second, unconditional call)."""
        processor = self._processor_of[block]
        mask = getattr(processor, "recorded_mask", None)
        key_mask = self._key_mask[half]
        if mask is None and key_mask is None:
            return lambda query, key, q_index, k_index: None
        if mask is None:
            keep = key_mask.to(rows.device)[rows % len(self.prompts)][:, None, None, :]
            return lambda query, key, q_index, k_index: keep if key == "txt" else None
        image_first = self.probe.family.image_first
        at = {"img": 0 if image_first else n_text, "txt": n_image if image_first else 0}
        at["ref"] = at["img"] + n_image
        sizes = {"img": n_image, "txt": n_text, "ref": mask.shape[-1] - n_image - n_text}

        def span(stream, index):
            if index is None:
                return slice(at[stream], at[stream] + sizes[stream])
            return index.to(mask.device) + at[stream]

        def bias(query, key, q_index, k_index):
            m = mask[:, :, span(query, q_index)]
            return m[..., span(key, k_index)][rows.to(mask.device)]
        return bias

    def step_maps(self, call: int, kind: str = "t2i") -> torch.Tensor:
        """The maps of the transformer call being recorded (the step, with one call per step), on the model's device,
        stacked over the blocks recorded so far: (block, row, [head,] image, text); a one-half call's rows only."""
        current, maps = self._current
        if current != call or kind not in maps:
            what = "step" if self.calls_per_step == 1 else "call"
            raise KeyError(f"no {kind} maps of {what} {call} in progress; step_maps reads the step being recorded (the "
                           f"transformer call, where guidance is a second call per step)")
        return torch.stack([maps[kind][b] for b in self.blocks if b in maps[kind]])

    def close(self) -> None:
        """Stop asking the kernels for log-sum-exps (`maps()` does this too)."""
        for processor in self._processors:
            processor.record_lse = False
            if getattr(processor, "recorded_mask", None) is not None:
                processor.recorded_mask = None  # the pipeline's mask, kept for the recorder only
        if self.concepts is not None:
            self.concepts.remove()

    def _gathered(self, name: str, blocks: list[int], steps: list[int]) -> torch.Tensor:
        filled = self._filled.get(name, set())
        missing = [(s, b) for s in steps for b in blocks if any((s, b, h) not in filled for h in self._halves)]
        if missing and name in CONCEPT_KINDS:  # the concept stream fills these, not `record`
            raise RuntimeError(f"{name} maps are missing for (step, block) {missing[:5]}: the concept stream did not "
                               f"run through every recorded block")
        if missing:
            calls = " and both of its transformer calls" if len(self._halves) > 1 else ""
            raise RuntimeError(f"{name} was recorded for only some blocks of a step (missing (step, block) "
                               f"{missing[:5]}); record every chosen block at each recorded step{calls}")
        host = self._host[name]
        if len(steps) == len(self._step_slot):
            return host
        return host[[self._step_slot[s] for s in steps]]

    def maps(self) -> AttentionMaps:
        """Stop recording and return the maps."""
        self.close()
        steps = sorted({s for name in self.kinds if name in self._filled for s, _, _ in self._filled[name]})
        if not steps:
            raise RuntimeError("nothing was recorded: call recorder.record(call) inside the trace's loop over "
                               "tracer.iter[0:recorder.calls]")
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # the non-blocking copies have landed
        self._current = (-1, {})
        tensors = {kind: self._gathered(kind, blocks, steps) for kind, blocks in self._kind_blocks.items()}
        return AttentionMaps.from_tensors(
            tensors, steps=steps, blocks=self.blocks, positions=self.positions, tables=self.tables, grid=self.grid,
            rows=self.rows, heads=self.heads, top_layers=tuple(self.probe.preset.top_layers),
            reference_grid=self.reference_grid, attn2_blocks=self.attn2_blocks,
            concepts=self.concepts.concepts if self.concepts is not None else [], queries=self.queries)

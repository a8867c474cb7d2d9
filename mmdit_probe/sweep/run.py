"""Generate a prompt set, record the word maps of chosen blocks and steps, score them against masks.

>>> from mmdit_probe.sweep import sweep, toy_prompts
>>> result = sweep("toy", toy_prompts(8), "out/sweep", num_steps=4)
>>> result.table                     # out/sweep/scores.parquet

Every prompt gives one record, ``OUT/records/<prompt id>.safetensors``, written to a temporary name
and renamed, so it is either whole or absent: the word maps (loadable with `AttentionMaps.load`),
the image, the masks and the scores, with a checksum. A rerun with the same OUT skips finished
prompts, redoes missing, partial, corrupt or failed ones, and refuses a changed configuration. Every
option is checked (against the model too) before anything is written, so a refused command leaves
no folder behind. A prompt that fails while running (a mask source that breaks, a missing mask
file) gets a record saying why, with the traceback; the others go on. The same
call runs alone or under ``torchrun --nproc_per_node N`` / ``accelerate launch --num_processes N``:
accelerate's `PartialState` hands each process its share of the unfinished prompts; processes
share nothing but the output folder. The main process then merges the records into one Parquet
table, one row per prompt x word x kind x block x step x metric x grid ("pixels": the map upsampled
to the mask, as `metrics.score_map` does; "tokens": the mask pooled to the token grid); a word the
mask source found no mask for gets one row with `scored` false and no kind, block, step or value. With
`windows`, each named step range (`sampling.windows.step_windows`: early, middle, late thirds, all) adds
rows that score the map averaged over the window's recorded steps: `window` names it, `step` is -1.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import validation
from .._lazy import lazy, resolve
from ..constants import GRIDS, KINDS, WINDOWS
from ..files import written_atomically
from ..maps import normalise, smooth
from ..metrics import METRICS, score_maps, token_mask
from ..sampling.windows import step_windows
from ..tokens import FUNCTION_WORDS, normalise_word
from ..validation import InvalidInput

RECORD_VERSION = 2  # 2: window slots after the steps in the score array
SCORING_BYTES = 64 << 20  # of upsampled maps scored at once: faster on a CPU than 16 or 256 MB
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Prompt sets offered by name, each a function (n, seed) -> PromptItems; the Shapes world's lives in
# mmdit_probe.toy and is found at call time, so that the sweep never imports the toy.
PROMPT_SOURCES = {"toy": "mmdit_probe.toy.sweep:toy_prompts"}
__getattr__, __dir__ = lazy(__name__, {"toy_prompts": "mmdit_probe.toy.sweep"})  # moved there; alias stays one release


@dataclass
class PromptItem:
    """One prompt of a sweep: its id (the record's file name), text, seed, and for Shapes-world
    prompts the scene (the toy mask source needs it). `word_types` groups words in the report."""

    id: str
    prompt: str
    seed: int
    scene: Any = field(default=None, repr=False)
    word_types: dict[str, str] = field(default_factory=dict, repr=False)


def load_prompts(path: str | Path, seed: int = 0) -> list[PromptItem]:
    """Prompts from a file: ``.jsonl`` (one object a line: "prompt", optional "id", "seed" and
    "word_types", e.g. {"cat": "animal"}) or plain text (one prompt a line; blank lines and lines
    starting with # are skipped). Missing ids are p00000, p00001, ...; missing seeds `seed + i` for
    the i-th prompt. A bad line is refused (`InvalidInput`) with the file's name and the line's number."""
    path, seed = Path(path), validation.integer("seed", seed)
    if not path.exists():
        raise InvalidInput(f"prompt file {path} does not exist (give a .txt or .jsonl file, or 'toy')")
    if path.is_dir():
        raise InvalidInput(f"prompt file {path} is a folder: give a .txt or .jsonl file, or 'toy'")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"prompt file {path} is not a UTF-8 text file: give one prompt a line (.txt) or one JSON "
                           f"object a line (.jsonl)") from None
    items: list[PromptItem] = []
    line_of: dict[str, int] = {}  # id -> the line that gave it
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or (path.suffix != ".jsonl" and line.startswith("#")):
            continue
        where, i = f"{path}, line {number}", len(items)
        try:
            entry = _json_line(line) if path.suffix == ".jsonl" else {"prompt": line}
            item = _checked_item(PromptItem(str(entry.get("id", f"p{i:05d}")), entry["prompt"],
                                            entry.get("seed", seed + i), word_types=entry.get("word_types", {})))
        except InvalidInput as error:
            raise InvalidInput(f"{where}: {error}") from None
        if item.id in line_of:
            raise InvalidInput(f"{where}: the id {item.id!r} is already used on line {line_of[item.id]}: give each "
                               f"prompt its own id")
        line_of[item.id] = number
        items.append(item)
    if not items:
        raise InvalidInput(f"prompt file {path} holds no prompts: give one prompt a line (.txt) or one JSON object "
                           f"a line (.jsonl)")
    return items


def _json_line(line: str) -> dict:
    """One line of a .jsonl prompt file: an object with a "prompt"."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise InvalidInput(f"not valid JSON ({error}); give one object a line") from None
    if not isinstance(entry, dict):
        raise InvalidInput(f"give a JSON object such as {{\"prompt\": \"a cat\"}}; got {line[:60]}")
    if "prompt" not in entry:
        raise InvalidInput(f"no \"prompt\" in {sorted(entry)}: every line needs one")
    return entry


def _checked_item(item: PromptItem) -> PromptItem:
    """A prompt's fields checked: an id that can name a file, the prompt's text, a whole-number seed (made a
    Python int: the configuration's hash is of JSON) and word types {word: type}."""
    if not isinstance(item.id, str) or not _ID.match(item.id):
        raise InvalidInput(f"the id {item.id!r} names a file, so use letters, digits, '.', '_', '-' only (starting "
                           f"with a letter or digit)")
    validation.prompt("prompt", item.prompt,
                      message="{name}={value!r} ({type}) is not allowed: give the prompt's text (str)")
    seed = validation.integer("seed", item.seed)
    types = item.word_types
    if not isinstance(types, dict) or not all(isinstance(x, str) for pair in types.items() for x in pair):
        raise InvalidInput(f"word_types={types!r} is not allowed: give {{word: type}} as strings, e.g. "
                           f"{{\"cat\": \"animal\"}}")
    if "all" in types.values():
        # The report's type "all" is every word together; a word typed "all" would be counted in it twice.
        raise InvalidInput(f"word_types={types!r}: the type 'all' names every word in the report; call these words' "
                           f"type something else")
    return replace(item, seed=seed)


def _prompt_items(prompts, n: int, seed: int) -> list[PromptItem]:
    """The sweep's prompts, each checked, with distinct ids."""
    if isinstance(prompts, str) and prompts in PROMPT_SOURCES:
        return resolve(PROMPT_SOURCES[prompts])(n, seed)
    if isinstance(prompts, (str, Path)):
        return load_prompts(prompts, seed)
    if isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise InvalidInput(f"prompts={prompts!r} is not allowed: give 'toy', a prompt file or a list of PromptItems")
    items = list(prompts)
    if not items:
        raise InvalidInput("prompts=[] is empty: give at least one prompt")
    checked, seen = [], set()
    for item in items:
        if not isinstance(item, PromptItem):
            raise InvalidInput(f"prompts must be PromptItems (or 'toy', or a prompt file); got {item!r}")
        try:
            checked.append(_checked_item(item))
        except InvalidInput as error:
            raise InvalidInput(f"prompt {item.id!r}: {error}") from None
        if item.id in seen:
            raise InvalidInput(f"prompt ids name the records, so they must be unique; {item.id!r} is repeated")
        seen.add(item.id)
    return checked


@dataclass
class SweepConfig:
    """Everything that decides a record's content; stored as OUT/config.json and compared on rerun."""

    model: str
    prompts: str  # where they came from ("toy", a file name)
    prompts_sha256: str  # of every (id, prompt, seed)
    n_prompts: int
    masks: str
    blocks: list[int]
    record_steps: list[int]
    kinds: list[str]
    words: str | list[str]
    resolution: int
    num_steps: int
    guidance: float
    threshold: float
    smoothing: bool
    grids: list[str]
    maps_dtype: str
    windows: list[str] = field(default_factory=list)
    version: int = RECORD_VERSION

    def window_steps(self) -> dict[str, list[int]]:
        """Each window's recorded steps, as indices into `record_steps`."""
        ranges = step_windows(self.num_steps)
        return {w: [i for i, s in enumerate(self.record_steps) if s in ranges[w]] for w in self.windows}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class SweepResult:
    out: Path
    table: Path | None  # the merged Parquet table (None on processes other than the main one)
    done: int
    total: int
    config: SweepConfig
    failed: dict[str, str] | None = None  # prompt id -> why it failed (None on processes other than the main one)

    @property
    def complete(self) -> bool:
        return self.done == self.total


class ConfigMismatch(InvalidInput):
    """A rerun into an output folder made with different options (a usage error: exit code 2 in the CLI)."""


def sweep(model, prompts: list[PromptItem] | str | Path, out: str | Path, **options) -> SweepResult:
    """Run (or resume) a sweep into `out`; see the module docstring and `prepare_sweep` for the options,
    all of which are checked before anything is written."""
    return prepare_sweep(model, prompts, out, **options).run()


@dataclass
class PreparedSweep:
    """A sweep whose options are all checked and whose model is loaded; nothing is written until `run`."""

    probe: Any
    prompts: list[PromptItem]
    out: Path
    config: SweepConfig
    masks: Any
    max_prompts: int | None
    keep_going: bool
    progress: bool
    state: Any  # accelerate's PartialState: this process's place among the sweep's processes

    def run(self) -> SweepResult:
        """Write the configuration, run this process's share of the unfinished prompts, merge the records."""
        state, config, prompts = self.state, self.config, self.prompts
        records = self.out / "records"
        started = time.time()
        if state.is_main_process:
            records.mkdir(parents=True, exist_ok=True)
            _check_config(self.out, config, write=True)
            with written_atomically(self.out / "prompts.jsonl") as temporary:
                temporary.write_bytes("".join(
                    json.dumps({"id": p.id, "prompt": p.prompt, "seed": p.seed}) + "\n" for p in prompts).encode())
        state.wait_for_everyone()
        _check_config(self.out, config, write=True)  # every process: it may have been started with other options
        todo = [p for p in prompts if not valid_record(records / f"{p.id}.safetensors", config)]
        done_before = len(prompts) - len(todo)
        # Nobody writes a record before everyone has listed what is left, so every process splits the same list.
        state.wait_for_everyone()
        todo = todo[:self.max_prompts]  # None: all

        bar = tqdm(total=len(prompts), initial=done_before, desc="sweep", unit="prompt",
                   disable=not (self.progress and state.is_main_process))

        def show(written: int) -> None:
            bar.n = done_before + written
            bar.refresh()

        with state.split_between_processes(todo) as mine:
            for item in mine:
                try:
                    maps, extra, meta = run_prompt(self.probe, item, config, self.masks)
                except Exception as error:  # one prompt's data never stops the sweep; its record says why
                    if not self.keep_going:
                        raise
                    maps, extra, meta = _unscored(item, config, failed=f"{type(error).__name__}: {error}",
                                                  traceback="".join(traceback.format_exception(error)))
                meta["process"] = state.process_index  # which process made it; not part of the results
                _write_record(records / f"{item.id}.safetensors", maps, extra, meta)
                show(_written_since(records, started))
        if state.is_main_process:
            # The others' records appear as files; counting them is all the coordination needed.
            while (written := _written_since(records, started)) < len(todo):
                show(written)
                time.sleep(0.5)
            show(len(todo))
            bar.close()
        state.wait_for_everyone()
        if not state.is_main_process:
            return SweepResult(self.out, None, done_before + len(todo), len(prompts), config)
        table, done, failed = merge(self.out, prompts, config)
        return SweepResult(self.out, table, done, len(prompts), config, failed)


def prepare_sweep(model, prompts: list[PromptItem] | str | Path, out: str | Path, *, masks=None, blocks=None,
                  record_steps=None, kinds=KINDS, words: str | list[str] = "content", resolution: int | None = None,
                  num_steps: int | None = None, guidance: float | None = None, seed: int = 0, n: int = 100,
                  threshold: float = 0.5, smoothing: bool = False, grids=GRIDS, maps_dtype: str = "float16",
                  windows=(), max_prompts: int | None = None, keep_going: bool = True,
                  progress: bool = True) -> PreparedSweep:
    """Check every option of a sweep, load the model and return the sweep, ready to `run`; writes nothing.
    Bad input raises `InvalidInput`: options that need no model before it loads, the others against it.

    model: a preset name, hub id or local directory (loaded on this process's device), or a `Probe`.
    prompts: "toy" (`n` held-out Shapes-world captions), a prompt file (`load_prompts`), or PromptItems.
    masks: a mask source (`mmdit_probe.sweep.masks`); default `ToyMasks` for toy prompts.
    blocks, record_steps: which blocks and denoising steps to record and score (default: all).
    kinds: "t2i" and/or "i2t". words: "content" (not a, the, on, ...), "all", or a list of words.
    windows: step ranges ("early", "middle", "late", "all": thirds of `num_steps`, as `toy.evaluate`)
        whose maps are averaged, then scored, as extra rows.
    resolution, num_steps, guidance: generation settings (default: the preset's).
    threshold: θ in [0, 1] for the IoU of the max-normalised map.
    max_prompts: stop after this many unfinished prompts (all processes together); rerun to go on.
    keep_going: record a prompt that fails and go on with the others (default), or raise its error.
    """
    from accelerate import PartialState

    from ..probe import Probe, load
    from .masks import mask_source

    # What needs no model first, so that a typo costs no model load.
    seed = validation.integer("seed", seed)
    n = validation.count("n", n, " (how many toy prompts)")
    threshold = validation.threshold("threshold", threshold)
    guidance = None if guidance is None else validation.number("guidance", guidance, low=0.0)
    max_prompts = None if max_prompts is None else validation.count("max_prompts", max_prompts, " (or None for all)")
    for name, flag in (("smoothing", smoothing), ("keep_going", keep_going), ("progress", progress)):
        validation.boolean(name, flag)
    kinds, grids = _subset("kinds", kinds, KINDS), _subset("grids", grids, GRIDS)
    windows = _subset("windows", windows, WINDOWS, empty=True)
    words = _check_words(words)
    dtype = getattr(torch, maps_dtype, None) if isinstance(maps_dtype, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInput(f"maps_dtype={maps_dtype!r} is not allowed: give a floating-point torch dtype's name "
                           f"('float16', 'bfloat16' or 'float32')")
    if blocks is not None:
        blocks = validation.index_list("blocks", blocks, what="block indices")
    if record_steps is not None:
        record_steps = validation.index_list("record_steps", record_steps, what="step indices")
    source_name = "items" if not isinstance(prompts, (str, Path)) else "toy" if prompts == "toy" else Path(prompts).name
    items = _prompt_items(prompts, n, seed)
    out = _check_out(out)
    masks = mask_source("toy") if masks is None else masks
    if not callable(masks) or not callable(getattr(masks, "describe", None)):
        raise InvalidInput(f"masks={masks!r} is not a mask source: give ToyMasks(), FolderMasks(DIR) or GroundedSam() "
                           f"(mmdit_probe.sweep.masks)")
    if masks.describe() == "toy" and any(item.scene is None for item in items):
        raise InvalidInput("toy masks need Shapes-world prompts (prompts='toy'); for your own prompts give "
                           "masks=FolderMasks(DIR) or GroundedSam() (--masks DIR or --masks grounded-sam)")

    state = PartialState(cpu=not torch.cuda.is_available())
    probe = model if isinstance(model, Probe) else load(model, device=state.device)
    probe.pipeline.set_progress_bar_config(disable=True)
    preset, num_blocks = probe.preset, probe.family.num_blocks
    if blocks is not None:
        probe.family.check_blocks("blocks", blocks, template="{name}={bad} is not allowed: the model has blocks "
                                                             "0..{last}")
    num_steps = preset.steps if num_steps is None else validation.positive_int("num_steps", num_steps)
    outside = [s for s in record_steps or () if not 0 <= s < num_steps]
    if outside:
        raise InvalidInput(f"record_steps={outside} is not allowed: there are {num_steps} steps (0..{num_steps - 1})")
    config = SweepConfig(
        model=model if isinstance(model, str) else preset.name,
        prompts=source_name,
        prompts_sha256=hashlib.sha256(json.dumps([[p.id, p.prompt, p.seed] for p in items]).encode()).hexdigest(),
        n_prompts=len(items), masks=masks.describe(),
        blocks=sorted(range(num_blocks) if blocks is None else blocks),
        record_steps=sorted(range(num_steps) if record_steps is None else record_steps), kinds=kinds,
        words=words if isinstance(words, str) else sorted(normalise_word(w) for w in words),
        resolution=preset.resolution if resolution is None else validation.image_side(
            "resolution", resolution, probe.family.token_pixels, probe.family.max_image_side), num_steps=num_steps,
        guidance=float(preset.guidance if guidance is None else guidance), threshold=threshold,
        smoothing=smoothing, grids=grids, maps_dtype=maps_dtype, windows=windows)
    probe.family.calls_per_step({"guidance_scale": config.guidance})  # refuses what recording refuses
    empty = [w for w, chosen in config.window_steps().items() if not chosen]
    if empty:
        raise InvalidInput(f"windows {empty} hold none of the recorded steps {config.record_steps} "
                           f"(of {config.num_steps}); record steps in them or leave them out")
    _check_config(out, config)
    return PreparedSweep(probe, items, out, config, masks, max_prompts, keep_going, progress, state)


def _subset(name: str, values, allowed: tuple[str, ...], *, empty: bool = False) -> list[str]:
    """Names among `allowed` (one name or several), in `allowed`'s order."""
    chosen = [values] if isinstance(values, str) else list(values) if isinstance(values, Iterable) else None
    if chosen is None or any(v not in allowed for v in chosen) or not (chosen or empty):
        wanted = "among" if empty else "a non-empty subset of"
        raise InvalidInput(f"{name} must be {wanted} {allowed}; got {values!r}")
    return [a for a in allowed if a in chosen]


def _check_words(words) -> str | list[str]:
    """"content", "all", or a non-empty list of words (not word indices: each prompt has its own)."""
    if isinstance(words, str):
        if words not in ("content", "all"):
            raise InvalidInput(f"words={words!r} is not allowed: give 'content', 'all' or a list of words, "
                               f"e.g. [{words!r}]")
        return words
    words = validation.word_list("words", words)
    numbers = [w for w in words if not isinstance(w, str)]
    if numbers:
        raise InvalidInput(f"words must be words (str), not word indices (each prompt has its own); got {numbers}")
    return words


def _check_out(out) -> Path:
    """The output folder: absent or a folder, with no file on its way."""
    if not isinstance(out, (str, Path)):
        raise InvalidInput(f"out={out!r} is not allowed: give a folder (str or Path)")
    out = Path(out)
    for parent in (out, *out.parents):
        if parent.exists() and not parent.is_dir():
            raise InvalidInput(f"out {out}: {parent} is a file, not a folder; choose another folder")
    return out


def _stored_config(path: Path, fix: str, keys: tuple[str, ...] = ()) -> dict:
    """The options a sweep's config.json holds; `InvalidInput`, ending in `fix`, for a file that is none."""
    config = validation.json_file(path, fix)
    if not isinstance(config, dict) or not set(keys) <= set(config):
        raise InvalidInput(f"{path} is not a sweep's configuration ({config!r:.80}): {fix}")
    return config


def _check_config(out: Path, config: SweepConfig, *, write: bool = False) -> None:
    """A rerun into `out` must have the options its config.json was made with; `write` stores them if it has none."""
    path = out / "config.json"
    if not path.exists():
        if write:
            with written_atomically(path) as temporary:
                temporary.write_bytes(json.dumps(asdict(config), indent=2).encode())
        return
    old = _stored_config(path, f"give a new --out, or delete {out} to start over")
    new = asdict(config)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
        raise ConfigMismatch(
            f"{out} holds a sweep made with other options ({path}); changed: " + "; ".join(changed)
            + f". Rerun with the original options to resume it, or give a new --out (or delete {out}) to start over.")


def _unscored(item: PromptItem, config: SweepConfig, **meta: str) -> tuple[None, dict[str, torch.Tensor], dict]:
    """A record with no maps and no scores, as `run_prompt` returns one. A failed prompt's `meta` says why, with the
    traceback; such a record is never valid, so the next run retries the prompt."""
    return None, {"scores": torch.zeros(0, dtype=torch.float64)}, {
        "id": item.id, "prompt": item.prompt, "seed": item.seed, "config": config.sha256, "words": [], "unmasked": [],
        "shape": [], **meta}


def _written_since(records: Path, started: float) -> int:
    return sum(1 for p in records.glob("*.safetensors") if p.stat().st_mtime >= started)


def _choose_words(table, words: str | list[str]) -> list[tuple[int, str]]:
    """(word index, word) of the prompt's chosen words that have text positions (not truncated away)."""
    present = [(i, w) for i, w in enumerate(table.words) if table.positions(i)]
    if words == "all":
        return present
    if words == "content":
        return [(i, w) for i, w in present if w not in FUNCTION_WORDS]
    return [(i, w) for i, w in present if w in set(words)]


def run_prompt(probe, item: PromptItem, config: SweepConfig, masks) -> tuple[Any, dict[str, torch.Tensor], dict]:
    """Generate one prompt, record its maps, get masks and score: (maps, extra tensors, record metadata)."""
    table = probe.tokens(item.prompt)
    words = _choose_words(table, config.words)
    if not words:
        return _unscored(item, config)
    positions = sorted({p for i, _ in words for p in table.positions(i)})
    record = {"blocks": config.blocks, "steps": config.record_steps, "kinds": config.kinds, "positions": positions,
              "dtype": getattr(torch, config.maps_dtype)}
    generation = probe.generate(item.prompt, seed=item.seed, steps=config.num_steps, guidance=config.guidance,
                                height=config.resolution, width=config.resolution, record=record)
    maps, image = generation.maps, np.asarray(generation.images[0].convert("RGB"))
    found = masks(item, image, words)
    for mask in found.values():
        if mask.shape != image.shape[:2]:
            raise ValueError(f"{masks.describe()} gave a {mask.shape} mask for a {image.shape[:2]} image")
    scored = [(i, w) for i, w in words if i in found]
    windows = list(config.window_steps().values())
    n_blocks, n_slots = len(config.blocks), len(config.record_steps) + len(windows)  # slots: steps, then windows
    scores = np.zeros((len(scored), len(config.kinds), n_blocks, n_slots, len(METRICS), len(config.grids)))
    device = probe.pipeline.device  # the maps are kept on the host; score where the model runs
    for w, (index, _) in enumerate(scored):
        mask = found[index].astype(bool)
        targets = {"pixels": mask, "tokens": token_mask(mask, maps.grid)}
        for k, kind in enumerate(config.kinds):
            stack = maps.select(index, kind=kind)  # (step, block, image token)
            # A window's map is the mean over its steps, as `AttentionMaps.per_block(steps=...)` takes it.
            slots = torch.cat([stack, *(stack[chosen].mean(dim=0, keepdim=True) for chosen in windows)])
            flat = torch.stack([normalise(smooth(m) if config.smoothing else m)
                                for m in slots.reshape(-1, *maps.grid)]).to(device)  # (slot x block, rows, cols)
            for g, grid in enumerate(config.grids):
                values = _score(flat, targets[grid], config.threshold)  # (slot x block, metric)
                scores[w, k, :, :, :, g] = values.reshape(n_slots, n_blocks, -1).transpose(1, 0, 2)
    meta = {**_unscored(item, config)[2], "words": [[i, w, item.word_types.get(w, "other")] for i, w in scored],
            "unmasked": [[i, w] for i, w in words if i not in found], "shape": list(scores.shape)}
    packed = np.stack([np.packbits(found[i].astype(bool).ravel()) for i, _ in scored]) if scored else np.zeros((0, 0))
    extra = {"scores": torch.from_numpy(scores), "image": torch.from_numpy(image.copy()),
             "masks": torch.from_numpy(packed.astype(np.uint8))}
    return maps, extra, meta


def _score(maps: torch.Tensor, target, threshold: float) -> np.ndarray:
    """`score_maps` of (N, rows, cols) maps, at most SCORING_BYTES of upsampled maps at a time: (N, metric)."""
    chunk = max(1, SCORING_BYTES // (4 * int(np.prod(np.shape(target)))))
    parts = [score_maps(c, target, threshold) for c in maps.split(chunk)]
    return torch.stack([torch.cat([part[m] for part in parts]) for m in METRICS], dim=1).cpu().double().numpy()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        # reshape(-1): an empty tensor (a prompt with no scored word) may have stride 0, which `view` refuses
        digest.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_record(path: Path, maps, extra: dict[str, torch.Tensor], meta: dict) -> None:
    meta["checksum"] = _checksum({**extra, **({} if maps is None else {k: maps.tensor(k) for k in maps.kinds})})
    if maps is not None:  # `save` writes whole or not at all
        maps.save(path, overwrite=True, extra_tensors=extra, extra_metadata={"sweep": json.dumps(meta)})
    else:
        with written_atomically(path) as temporary:
            save_file(extra, str(temporary), metadata={"sweep": json.dumps(meta)})


def read_record(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A record's metadata and tensors (scores, image, masks, maps); raises if it is partial or corrupt."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["sweep"])
    tensors = load_file(str(path))
    if _checksum(tensors) != meta["checksum"]:
        raise ValueError(f"record {path} is corrupt (checksum mismatch)")
    return meta, tensors


def record_masks(meta: dict, tensors: dict[str, torch.Tensor]) -> dict[int, np.ndarray]:
    """The masks stored in a record: {word index: boolean (height, width)}."""
    height, width = tensors["image"].shape[:2]
    return {i: np.unpackbits(row.numpy())[:height * width].reshape(height, width).astype(bool)
            for (i, _, _), row in zip(meta["words"], tensors["masks"])}


def valid_record(path: Path, config: SweepConfig) -> bool:
    """Whether a record is whole, uncorrupted, made with this configuration, and not of a failed prompt."""
    try:
        meta, _ = read_record(path)
    except Exception:  # absent, truncated, garbled or half-written: any failure to read means redo
        return False
    return meta.get("config") == config.sha256 and "failed" not in meta


SCHEMA = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                    ("word_index", pa.int32()), ("word", pa.string()), ("word_type", pa.string()),
                    ("kind", pa.string()), ("block", pa.int32()), ("step", pa.int32()), ("window", pa.string()),
                    ("metric", pa.string()), ("grid", pa.string()), ("value", pa.float64()), ("scored", pa.bool_())])


def merge(out: str | Path, prompts: list[PromptItem], config: SweepConfig) -> tuple[Path, int, dict[str, str]]:
    """Merge the finished records, in prompt order, into OUT/scores.parquet; returns (path, records merged,
    {prompt id: why it failed} of the failed ones)."""
    out = Path(out)
    tables, done, failed = [], 0, {}
    for item in prompts:
        path = out / "records" / f"{item.id}.safetensors"
        try:
            meta, tensors = read_record(path)
        except Exception:  # missing or corrupt: left for the next run
            continue
        if "failed" in meta:
            failed[item.id] = meta["failed"]
            continue
        done += 1
        if meta["words"]:
            tables.append(_rows(meta, tensors["scores"].numpy(), config))
        if meta["unmasked"]:
            tables.append(_unscored_rows(meta, item))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    path = out / "scores.parquet"
    with written_atomically(path) as temporary:
        pq.write_table(table, temporary)
    return path, done, failed


def _unscored_rows(meta: dict, item: PromptItem) -> pa.Table:
    """One row per word the mask source found no mask for: `scored` false, no kind, block, step or value
    (so a filter on `window`, or a mean that skips nulls, leaves them out)."""
    return pa.Table.from_pylist([{"prompt_id": meta["id"], "prompt": meta["prompt"], "seed": meta["seed"],
                                  "word_index": i, "word": w, "word_type": item.word_types.get(w, "other"),
                                  "scored": False} for i, w in meta["unmasked"]], schema=SCHEMA)


def _rows(meta: dict, scores: np.ndarray, config: SweepConfig) -> pa.Table:
    """One row per element of the record's (word, kind, block, step or window, metric, grid) score array."""
    w, k, b, s, m, g = np.indices(scores.shape).reshape(6, -1)
    index, word, word_type = np.array(meta["words"], dtype=object).T
    steps = np.array(config.record_steps + [-1] * len(config.windows))
    windows = np.array(["step"] * len(config.record_steps) + config.windows)
    n = scores.size
    return pa.table({"prompt_id": [meta["id"]] * n, "prompt": [meta["prompt"]] * n, "seed": np.full(n, meta["seed"]),
                     "word_index": index[w], "word": word[w], "word_type": word_type[w],
                     "kind": np.array(config.kinds)[k], "block": np.array(config.blocks)[b], "step": steps[s],
                     "window": windows[s], "metric": np.array(METRICS)[m], "grid": np.array(config.grids)[g],
                     "value": scores.ravel(), "scored": np.ones(n, bool)}, schema=SCHEMA)

"""Generate a prompt set, record the word maps of chosen blocks and steps, score them against masks.

>>> from mmdit_probe.sweep import sweep, toy_prompts
>>> result = sweep("toy", toy_prompts(8), "out/sweep", num_steps=4)
>>> result.table                     # out/sweep/scores.parquet

Every prompt gives one record, ``OUT/records/<prompt id>.safetensors``, written to a temporary name
and renamed, so it is either whole or absent: the word maps (loadable with `AttentionMaps.load`),
the image, the masks and the scores, with a checksum. A rerun with the same OUT skips finished
prompts, redoes missing, partial or corrupt ones, and refuses a changed configuration. The same
call runs alone or under ``torchrun --nproc_per_node N`` / ``accelerate launch --num_processes N``:
accelerate's `PartialState` hands each process its share of the unfinished prompts; processes
share nothing but the output folder. The main process then merges the records into one Parquet
table, one row per prompt x word x kind x block x step x metric x grid ("pixels": the map upsampled
to the mask, as `metrics.score_map` does; "tokens": the mask pooled to the token grid). With
`windows`, each named step range (`toy.evaluate.step_slices`: early, middle, late thirds, all) adds
rows that score the map averaged over the window's recorded steps: `window` names it, `step` is -1.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..files import written_atomically
from ..maps import KINDS, normalise, smooth
from ..metrics import METRICS, score_maps, token_mask
from ..tokens import FUNCTION_WORDS, normalise_word
from ..validation import InvalidInput

RECORD_VERSION = 2  # 2: window slots after the steps in the score array
GRIDS = ("pixels", "tokens")
WINDOWS = ("early", "middle", "late", "all")
SCORING_BYTES = 64 << 20  # of upsampled maps scored at once: faster on a CPU than 16 or 256 MB
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class PromptItem:
    """One prompt of a sweep: its id (the record's file name), text, seed, and for Shapes-world
    prompts the scene (the toy mask source needs it). `word_types` groups words in the report."""

    id: str
    prompt: str
    seed: int
    scene: Any = field(default=None, repr=False)
    word_types: dict[str, str] = field(default_factory=dict, repr=False)


def toy_prompts(n: int = 100, seed: int = 0) -> list[PromptItem]:
    """`n` held-out Shapes-world captions (never seen in training); prompt i gets seed `seed + i`.

    >>> toy_prompts(2)[0].prompt
    'on the left a small green square and on the right a large red circle on a black background'
    """
    from ..toy.world import WORD_TYPE, caption, sample_split_scene

    rng = np.random.default_rng(seed)
    scenes = [sample_split_scene(rng, held_out=True) for _ in range(n)]
    return [PromptItem(f"toy{i:05d}", caption(s), seed + i, s, WORD_TYPE) for i, s in enumerate(scenes)]


def load_prompts(path: str | Path, seed: int = 0) -> list[PromptItem]:
    """Prompts from a file: ``.jsonl`` (one object a line: "prompt", optional "id", "seed" and
    "word_types", e.g. {"cat": "animal"}) or plain text (one prompt a line; blank lines and lines
    starting with # are skipped). Missing ids are p00000, p00001, ...; missing seeds `seed + line`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} does not exist (give a .txt or .jsonl file, or 'toy')")
    lines = [line.strip() for line in path.read_text().splitlines()]
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in lines if line]
    else:
        entries = [{"prompt": line} for line in lines if line and not line.startswith("#")]
    items = [PromptItem(str(e.get("id", f"p{i:05d}")), e["prompt"], int(e.get("seed", seed + i)),
                        word_types=e.get("word_types", {})) for i, e in enumerate(entries)]
    check_ids(items)
    return items


def check_ids(items: list[PromptItem]) -> None:
    bad = [it.id for it in items if not _ID.match(it.id)]
    if bad:
        raise ValueError(f"prompt ids name files, so use letters, digits, '.', '_', '-' only: {bad[:5]}")
    seen: set[str] = set()
    doubled = [it.id for it in items if it.id in seen or seen.add(it.id)]
    if doubled:
        raise ValueError(f"prompt ids must be unique; repeated: {sorted(set(doubled))[:5]}")


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
        from ..toy.evaluate import step_slices

        ranges = step_slices(self.num_steps)
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

    @property
    def complete(self) -> bool:
        return self.done == self.total


class ConfigMismatch(InvalidInput):
    """A rerun into an output folder made with different options (a usage error: exit code 2 in the CLI)."""


def sweep(model, prompts: list[PromptItem] | str, out: str | Path, *, masks=None, blocks=None, record_steps=None,
          kinds=KINDS, words: str | list[str] = "content", resolution: int | None = None,
          num_steps: int | None = None, guidance: float | None = None, seed: int = 0, n: int = 100,
          threshold: float = 0.5, smoothing: bool = False, grids=GRIDS, maps_dtype: str = "float16",
          windows=(), max_prompts: int | None = None, progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep into `out`; see the module docstring.

    model: a preset name, hub id or local directory (loaded on this process's device), or a `Probe`.
    prompts: "toy" (`n` held-out Shapes-world captions), a prompt file (`load_prompts`), or PromptItems.
    masks: a mask source (`mmdit_probe.sweep.masks`); default `ToyMasks` for toy prompts.
    blocks, record_steps: which blocks and denoising steps to record and score (default: all).
    kinds: "t2i" and/or "i2t". words: "content" (not a, the, on, ...), "all", or a list of words.
    windows: step ranges ("early", "middle", "late", "all": thirds of `num_steps`, as `toy.evaluate`)
        whose maps are averaged, then scored, as extra rows.
    resolution, num_steps, guidance: generation settings (default: the preset's).
    max_prompts: stop after this many unfinished prompts (all processes together); rerun to go on.
    """
    from accelerate import PartialState

    from ..probe import Probe, load
    from .masks import ToyMasks

    state = PartialState(cpu=not torch.cuda.is_available())
    probe = model if isinstance(model, Probe) else load(model, device=state.device)
    probe.pipeline.set_progress_bar_config(disable=True)
    source_name = prompts if isinstance(prompts, str) else "items"
    if isinstance(prompts, str):
        prompts = toy_prompts(n, seed) if prompts == "toy" else load_prompts(prompts, seed)
    check_ids(prompts)
    masks = masks if masks is not None else ToyMasks()
    preset = probe.preset
    config = SweepConfig(
        model=model if isinstance(model, str) else preset.name,
        prompts=Path(source_name).name if source_name != "toy" else "toy",
        prompts_sha256=hashlib.sha256(json.dumps([[p.id, p.prompt, p.seed] for p in prompts]).encode()).hexdigest(),
        n_prompts=len(prompts), masks=masks.describe(),
        blocks=sorted(int(b) for b in (range(probe.family.num_blocks) if blocks is None else blocks)),
        record_steps=[], kinds=[k for k in KINDS if k in kinds],
        words=words if isinstance(words, str) else sorted(normalise_word(w) for w in words),
        resolution=int(resolution or preset.resolution), num_steps=int(num_steps or preset.steps),
        guidance=float(preset.guidance if guidance is None else guidance), threshold=float(threshold),
        smoothing=bool(smoothing), grids=[g for g in GRIDS if g in grids], maps_dtype=maps_dtype,
        windows=[w for w in WINDOWS if w in windows])
    config.record_steps = sorted(int(s) for s in (range(config.num_steps) if record_steps is None else record_steps))
    _check_options(config, kinds, grids, windows)

    out = Path(out)
    records = out / "records"
    started = time.time()
    if state.is_main_process:
        records.mkdir(parents=True, exist_ok=True)
        _write_or_check_config(out, config)
        _write_atomically(out / "prompts.jsonl", "".join(
            json.dumps({"id": p.id, "prompt": p.prompt, "seed": p.seed}) + "\n" for p in prompts).encode())
    state.wait_for_everyone()
    _write_or_check_config(out, config)  # every process: it may have been started with other options
    todo = [p for p in prompts if not valid_record(records / f"{p.id}.safetensors", config)]
    done_before = len(prompts) - len(todo)
    # Nobody writes a record before everyone has listed what is left, so every process splits the same list.
    state.wait_for_everyone()
    todo = todo[:max_prompts] if max_prompts is not None else todo

    bar = tqdm(total=len(prompts), initial=done_before, desc="sweep", unit="prompt",
               disable=not (progress and state.is_main_process))
    with state.split_between_processes(todo) as mine:
        for item in mine:
            maps, extra, meta = run_prompt(probe, item, config, masks)
            meta["process"] = state.process_index  # which process made it; not part of the results
            _write_record(records / f"{item.id}.safetensors", maps, extra, meta)
            bar.n = done_before + _written_since(records, started)
            bar.refresh()
    if state.is_main_process:
        # The others' records appear as files; counting them is all the coordination needed.
        while (written := _written_since(records, started)) < len(todo):
            bar.n = done_before + written
            bar.refresh()
            time.sleep(0.5)
        bar.n = done_before + len(todo)
        bar.close()
    state.wait_for_everyone()
    table, done = None, done_before + len(todo)
    if state.is_main_process:
        table, done = merge(out, prompts, config)
    return SweepResult(out, table, done, len(prompts), config)


def _check_options(config: SweepConfig, kinds, grids, windows) -> None:
    if not config.kinds or set(kinds) - set(KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}; got {list(kinds)}")
    if not config.grids or set(grids) - set(GRIDS):
        raise ValueError(f"grids must be a non-empty subset of {GRIDS}; got {list(grids)}")
    bad = [s for s in config.record_steps if not 0 <= s < config.num_steps]
    if bad:
        raise ValueError(f"record steps {bad} are outside 0..{config.num_steps - 1} ({config.num_steps} steps)")
    if set(windows) - set(WINDOWS):
        raise ValueError(f"windows must be among {WINDOWS}; got {list(windows)}")
    empty = [w for w, chosen in config.window_steps().items() if not chosen]
    if empty:
        raise ValueError(f"windows {empty} hold none of the recorded steps {config.record_steps} "
                         f"(of {config.num_steps}); record steps in them or leave them out")
    if not hasattr(torch, config.maps_dtype):
        raise ValueError(f"maps_dtype {config.maps_dtype!r} is not a torch dtype (try float16 or bfloat16)")


def _write_or_check_config(out: Path, config: SweepConfig) -> None:
    path = out / "config.json"
    if not path.exists():
        _write_atomically(path, json.dumps(asdict(config), indent=2).encode())
        return
    old = json.loads(path.read_text())
    new = asdict(config)
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k)]
    if changed:
        raise ConfigMismatch(
            f"{out} holds a sweep made with other options ({path}); changed: " + "; ".join(changed)
            + f". Rerun with the original options to resume it, or give a new --out (or delete {out}) to start over.")


def _write_atomically(path: Path, data: bytes) -> None:
    with written_atomically(path) as temporary:
        temporary.write_bytes(data)


def _written_since(records: Path, started: float) -> int:
    return sum(1 for p in records.glob("*.safetensors") if p.stat().st_mtime >= started)


def _choose_words(table, words: str | list[str]) -> list[tuple[int, str]]:
    """(word index, word) of the prompt's chosen words that have text positions (not truncated away)."""
    present = [(i, w) for i, w in enumerate(table.words) if table.positions(i)]
    if words == "all":
        return present
    if words == "content":
        return [(i, w) for i, w in present if w not in FUNCTION_WORDS]
    if isinstance(words, str):
        raise ValueError(f"words={words!r}: use 'content', 'all' or a list of words")
    return [(i, w) for i, w in present if w in set(words)]


def run_prompt(probe, item: PromptItem, config: SweepConfig, masks) -> tuple[Any, dict[str, torch.Tensor], dict]:
    """Generate one prompt, record its maps, get masks and score: (maps, extra tensors, record metadata)."""
    table = probe.tokens(item.prompt)
    words = _choose_words(table, config.words)
    meta: dict[str, Any] = {"id": item.id, "prompt": item.prompt, "seed": item.seed, "config": config.sha256,
                            "words": [], "unmasked": [], "shape": []}
    if not words:
        return None, {"scores": torch.zeros(0, dtype=torch.float64)}, meta
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
    meta.update(words=[[i, w, item.word_types.get(w, "other")] for i, w in scored],
                unmasked=[[i, w] for i, w in words if i not in found], shape=list(scores.shape))
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
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _write_record(path: Path, maps, extra: dict[str, torch.Tensor], meta: dict) -> None:
    tensors = dict(extra)
    if maps is not None:
        tensors.update({k: maps.tensor(k) for k in maps.kinds})
    meta["checksum"] = _checksum(tensors)
    if maps is not None:  # `save` writes whole or not at all
        maps.save(path, overwrite=True, extra_tensors=extra, extra_metadata={"sweep": json.dumps(meta)})
        return
    from safetensors.torch import save_file

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
    """Whether a record is whole, uncorrupted, and made with this configuration."""
    if not path.exists():
        return False
    try:
        meta, _ = read_record(path)
    except Exception:  # truncated, garbled or half-written: any failure to read means redo
        return False
    return meta.get("config") == config.sha256


def merge(out: str | Path, prompts: list[PromptItem], config: SweepConfig) -> tuple[Path, int]:
    """Merge the finished records, in prompt order, into OUT/scores.parquet; returns (path, records merged)."""
    out = Path(out)
    tables, done = [], 0
    for item in prompts:
        path = out / "records" / f"{item.id}.safetensors"
        try:
            meta, tensors = read_record(path)
        except Exception:  # missing or corrupt: left for the next run
            continue
        done += 1
        if meta["words"]:
            tables.append(_rows(meta, tensors["scores"].numpy(), config))
    schema = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
                        ("word_index", pa.int32()), ("word", pa.string()), ("word_type", pa.string()),
                        ("kind", pa.string()), ("block", pa.int32()), ("step", pa.int32()), ("window", pa.string()),
                        ("metric", pa.string()), ("grid", pa.string()), ("value", pa.float64())])
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    path = out / "scores.parquet"
    with written_atomically(path) as temporary:
        pq.write_table(table, temporary)
    return path, done


def _rows(meta: dict, scores: np.ndarray, config: SweepConfig) -> pa.Table:
    """One row per element of the record's (word, kind, block, step or window, metric, grid) score array."""
    w, k, b, s, m, g = np.indices(scores.shape).reshape(6, -1)
    words = meta["words"]
    n = scores.size
    steps = np.array(config.record_steps + [-1] * len(config.windows))
    windows = np.array(["step"] * len(config.record_steps) + config.windows)
    return pa.table({
        "prompt_id": pa.array([meta["id"]] * n, pa.string()),
        "prompt": pa.array([meta["prompt"]] * n, pa.string()),
        "seed": pa.array(np.full(n, meta["seed"]), pa.int64()),
        "word_index": pa.array(np.array([x[0] for x in words])[w], pa.int32()),
        "word": pa.array(np.array([x[1] for x in words])[w], pa.string()),
        "word_type": pa.array(np.array([x[2] for x in words])[w], pa.string()),
        "kind": pa.array(np.array(config.kinds)[k], pa.string()),
        "block": pa.array(np.array(config.blocks)[b], pa.int32()),
        "step": pa.array(steps[s], pa.int32()),
        "window": pa.array(windows[s], pa.string()),
        "metric": pa.array(np.array(METRICS)[m], pa.string()),
        "grid": pa.array(np.array(config.grids)[g], pa.string()),
        "value": pa.array(scores.ravel(), pa.float64()),
    })

"""Editing on the Shapes world, scored by the judge: every editing method on the same edits.

    python -m mmdit_probe.toy.evaluate_edits --n 16 --out reports/toy_edits
    python -m mmdit_probe.toy.evaluate_edits --study variants --n 36 --out reports/toy_edit_variants
    python -m mmdit_probe.toy.evaluate_edits --study parity --n 16 --out reports/toy_edit_parity

Held-out scenes, each with one edit: an object's colour, an object's shape, or the background.
The default study ("methods") runs every method on every edit twice: on the scene *generated* from
the edit's seed (each method starts from the caption and that seed) and on the scene *rendered*
(never generated: each method gets the image and inverts it its own way, or not at all):
the paper's q/k injection + local blending (`probe.edit`, `probe.edit_image`), FlowEdit,
RF-Solver-Edit, FireFlow's edit, Stable Flow and KV-Edit. Per method:
- success: the judge reads the target attribute in the edited image;
- preservation: the judge reads the untouched objects as it read them in the source image, and
  PSNR between source and edited images outside the edited region;
- cost: transformer forward calls per edit (a batch of rows is one call) and wall time.
The "variants" study compares q/k injection variants (none, qiki, qk, kivi), with and without local
blending, and qiki + blending after the Euler-sampler inversions, against FlowEdit.
The "parity" study runs every projection variant and attention-region replacement of `probe.edit`
(`constants.EDIT_METHODS`: the paper's released code's eight, qikikt, none, I2I, T2I, I2T, T2T), each with
local blending, on the same generated edits, with the methods study's success, preservation and cost.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import numpy as np
from tqdm.auto import tqdm

from ..constants import EDIT_METHODS
from ..editing.fireflow import fireflow_edit
from ..editing.flowedit import flowedit
from ..editing.inversion import pixel_error
from ..editing.kv_edit import kv_edit
from ..editing.rf_solver import rf_solver_edit
from ..editing.stable_flow import default_layers, stable_flow
from ..editing.vital_layers import vital_layers
from ..validation import InvalidInput
from .evaluate import command_line
from .judge import match_objects, read_background, read_objects
from .world import BACKGROUNDS, COLOURS, SHAPES, caption, render, sample_split_scene, with_object

EDIT_TYPES = ("colour", "shape", "background")


def sample_edit(rng: np.random.Generator):
    """A held-out scene, the edited scene, the edit type and the edited object's index (None: background)."""
    scene = sample_split_scene(rng, held_out=True)
    kind = EDIT_TYPES[rng.integers(len(EDIT_TYPES))]
    if kind == "background":
        new = rng.choice([b for b in BACKGROUNDS if b != scene.background])
        return scene, replace(scene, background=str(new)), kind, None
    index = int(rng.integers(len(scene.objects)))
    obj = scene.objects[index]
    if kind == "colour":
        change = {"colour": str(rng.choice([c for c in COLOURS if c != obj.colour]))}
    else:
        change = {"shape": str(rng.choice([s for s in SHAPES if s != obj.shape]))}
    return scene, with_object(scene, index, **change), kind, index


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if not mask.any():
        return float("nan")
    mse = float(((a.astype(float) - b.astype(float)) ** 2)[mask].mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def score(source_image, edited_image, scene, target, kind: str, index) -> dict:
    """Success and preservation of one edit, read by the judge from the images themselves."""
    src, out = np.asarray(source_image), np.asarray(edited_image)
    # The source image shows `scene`, the edited one should show `target`: the judge's own matching.
    before = match_objects(scene, read_objects(src))
    after = match_objects(target, read_objects(out))
    if kind == "background":
        success = read_background(out) == target.background
        kept = [r for r in before if r is not None]
        edited_region = ~np.any([r.mask for r in kept], axis=0) if kept else np.ones(src.shape[:2], bool)
    else:
        reading, new = after[index], target.objects[index]
        success = reading is not None and (reading.colour, reading.shape) == (new.colour, new.shape)
        region = [r.mask for r in (before[index], reading) if r is not None]
        edited_region = np.any(region, axis=0) if region else np.zeros(src.shape[:2], bool)
    untouched = [(b, a) for i, (b, a) in enumerate(zip(before, after))
                 if b is not None and (kind == "background" or i != index)]
    preserved = [a is not None and (a.colour, a.shape) == (b.colour, b.shape) for b, a in untouched]
    return {"success": float(success), "preserved": float(np.mean(preserved)) if preserved else float("nan"),
            "psnr_outside": psnr(src, out, ~edited_region)}


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: float(np.nanmean([r[k] for r in rows if np.isfinite(r[k])] or [np.nan])) for k in keys}


def _edit_types(edits: list[tuple]) -> dict[str, int]:
    """How many of the `sample_edit` edits are of each type, by type name."""
    return dict(sorted(Counter(kind for _, _, kind, _ in edits).items()))


def _add(results: dict[str, list[dict]], name: str, kind: str, row: dict) -> None:
    """`row` under `name` (all edit types together) and under ``name/kind``."""
    results[name].append(row)
    results[f"{name}/{kind}"].append(row)


def variant_study(probe, n: int = 20, seed: int = 0, variants=("none", "qiki", "qk", "kivi")) -> dict:
    """q/k injection variants with and without blending; on rendered scenes qiki + blending after each
    inversion of the pipeline's Euler sampler, against FlowEdit."""
    rng = np.random.default_rng(seed)
    edits = [sample_edit(rng) for _ in range(n)]
    results: dict[str, list[dict]] = defaultdict(list)
    for i, (scene, target, kind, index) in enumerate(tqdm(edits, desc="generated edits")):
        for variant in variants:
            for blend in (False, True):
                r = probe.edit(caption(scene), caption(target), seed=seed + i, variant=variant, local_blend=blend)
                _add(results, f"{variant}{'+blend' if blend else ''}", kind,
                     score(r.source_image, r.edited_image, scene, target, kind, index))
    for i, (scene, target, kind, index) in enumerate(tqdm(edits, desc="rendered scenes")):
        image = render(scene)[0]
        for method in EULER_INVERSIONS:
            r = probe.edit_image(image, caption(scene), caption(target), method=method, seed=seed + i)
            row = score(image, r.edited_image, scene, target, kind, index)
            results[f"rendered/{method}/qiki+blend"].append(row)
            # The source row regenerates from the inverted latent untouched: it is the reconstruction.
            results[f"rendered/{method}/reconstruction"].append({"pixel_error": pixel_error(r.source_image, image)})
        edited = flowedit(probe, image, caption(scene), caption(target), seed=seed + i)
        results["rendered/flowedit"].append(score(image, edited, scene, target, kind, index))
    return {"study": "variants", "n": n, "edit_types": _edit_types(edits),
            "results": {k: _mean(v) for k, v in results.items()}}


EULER_INVERSIONS = ("euler", "heun", "fixed-point")
# An editor: (probe, source caption, target caption, seed, image or None) -> (source image, edited image).
# With image=None the source is generated from the seed; otherwise the image is the source, and what the
# editor returns as its source (its reconstruction) is not scored.
Editor = Callable[..., tuple]


def _qiki(probe, source, target, seed, image):
    if image is None:
        r = probe.edit(source, target, seed=seed)
    else:
        r = probe.edit_image(image, source, target, seed=seed)
    return r.source_image, r.edited_image


def _flowedit(probe, source, target, seed, image):
    if image is None:
        image = probe.generate(source, seed=seed).images[0]
    return image, flowedit(probe, image, source, target, seed=seed)


def _editor(edit, **options) -> Editor:
    """An editing function of `mmdit_probe.editing` (it takes `seed=` and `image=`) as an `Editor`."""
    def run(probe, source, target, seed, image):
        r = edit(probe, source, target, seed=seed, image=image, **options)
        return r.source_image, r.edited_image
    return run


def editors(probe) -> tuple[dict[str, Editor], dict]:
    """Every editing method, and notes on how each was set up."""
    try:
        layers, origin = default_layers(probe), "stable_flow.default_layers (published, else measured)"
    except InvalidInput:  # a model with no known vital layers: find them here, on training captions
        training = np.random.default_rng(1)
        prompts = [caption(sample_split_scene(training, held_out=False)) for _ in range(8)]
        layers = vital_layers(probe, prompts, measures="pixel", progress=False).vital
        origin = "vital_layers (pixel measure) on 8 training captions, by this run"
    found: dict[str, Editor] = {"qiki+blend": _qiki, "flowedit": _flowedit,
                                "rf-solver-edit": _editor(rf_solver_edit),
                                "fireflow-edit": _editor(fireflow_edit),
                                "stable-flow": _editor(stable_flow, layers=layers),
                                "kv-edit": _editor(kv_edit)}  # mask from the edited words' T2I maps
    return found, {"stable-flow": {"layers": list(layers), "layers_from": origin}}


class CallCounter:
    """Counts the transformer's forward calls (one call: a whole batch, both guidance halves)."""

    def __init__(self, probe) -> None:
        self.calls = 0
        self.handle = probe.pipeline.transformer.register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1

    def timed(self, run: Callable):
        """`run()`, and what it cost: the transformer's forward calls and the wall time."""
        self.calls = 0
        start = time.perf_counter()
        out = run()
        return out, {"model_calls": float(self.calls), "seconds": time.perf_counter() - start}


def method_study(probe, n: int = 16, seed: int = 0) -> dict:
    """Every editor on the same edits, generated and rendered (module docstring)."""
    rng = np.random.default_rng(seed)
    edits = [sample_edit(rng) for _ in range(n)]
    methods, notes = editors(probe)
    results: dict[str, list[dict]] = defaultdict(list)
    counter = CallCounter(probe)
    try:
        for i, (scene, target, kind, index) in enumerate(tqdm(edits, desc="edits (every method)")):
            rendered = render(scene)[0]
            for setting, image in (("generated", None), ("rendered", rendered)):
                for name, run in methods.items():
                    (source_image, edited), cost = counter.timed(
                        partial(run, probe, caption(scene), caption(target), seed + i, image))
                    source_image = rendered if image is not None else source_image
                    _add(results, f"{setting}/{name}", kind,
                         {**score(source_image, edited, scene, target, kind, index), **cost})
    finally:
        counter.handle.remove()
    return {"study": "methods", "n": n, "seed": seed, "edit_types": _edit_types(edits),
            "steps": probe.preset.steps, "notes": notes, "results": {k: _mean(v) for k, v in results.items()}}


def parity_study(probe, n: int = 16, seed: int = 0, methods=EDIT_METHODS) -> dict:
    """Every variant and region replacement of `probe.edit`, with local blending, on the same generated edits."""
    rng = np.random.default_rng(seed)
    edits = [sample_edit(rng) for _ in range(n)]
    results: dict[str, list[dict]] = defaultdict(list)
    counter = CallCounter(probe)
    try:
        for i, (scene, target, kind, index) in enumerate(tqdm(edits, desc="edits (every variant)")):
            for method in methods:
                r, cost = counter.timed(partial(probe.edit, caption(scene), caption(target), seed=seed + i,
                                                variant=method))
                _add(results, f"generated/{method}+blend", kind,
                     {**score(r.source_image, r.edited_image, scene, target, kind, index), **cost})
    finally:
        counter.handle.remove()
    return {"study": "parity", "n": n, "seed": seed, "edit_types": _edit_types(edits),
            "steps": probe.preset.steps, "results": {k: _mean(v) for k, v in results.items()}}


def table(report: dict) -> list[str]:
    """The report's main rows as a Markdown table."""
    if report["study"] == "variants":
        lines = ["| method | success | untouched objects kept | PSNR outside edit |", "|---|---|---|---|"]
        for name, r in report["results"].items():
            if "success" in r and ("/" not in name or name.startswith("rendered")):
                lines.append(f"| {name} | {r['success']:.2f} | {r['preserved']:.2f} | {r['psnr_outside']:.1f} |")
        for name, r in report["results"].items():
            if "pixel_error" in r:
                lines.append(f"| {name} | mean abs pixel error {r['pixel_error']:.1f} | | |")
        return lines
    lines = ["| scenes | method | success | untouched objects kept | PSNR outside edit (dB) | model calls | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        if name.count("/") == 1:
            setting, method = name.split("/")
            lines.append(f"| {setting} | {method} | {r['success']:.2f} | {r['preserved']:.2f} | "
                         f"{r['psnr_outside']:.1f} | {r['model_calls']:.0f} | {r['seconds']:.1f} |")
    return lines


def figure(report: dict, out) -> None:
    """Bar chart of success and preservation per method (all edit types together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report["study"] == "variants":
        rows = {k: v for k, v in report["results"].items()
                if "success" in v and ("/" not in k or (k.startswith("rendered") and k.count("/") <= 2))}
    else:
        rows = {k: v for k, v in report["results"].items() if k.count("/") == 1}
    names = list(rows)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.2))
    ax.bar(x - 0.2, [rows[k]["success"] for k in names], 0.4, label="edit success")
    ax.bar(x + 0.2, [rows[k]["preserved"] for k in names], 0.4, label="untouched objects kept")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(f"Shapes-world edits (n={report['n']}), judged on the images")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "edits.png", dpi=110)
    plt.close(fig)


STUDIES = {"methods": method_study, "variants": variant_study, "parity": parity_study}


def main(argv: list[str] | None = None) -> None:
    def study_option(parser):
        parser.add_argument("--study", choices=tuple(STUDIES), default="methods",
                            help="every editing method (default), q/k injection variants, or every variant and "
                                 "region replacement (parity)")

    args, probe = command_line(__doc__, 16, "reports/toy_edits", argv, study_option)
    study = STUDIES[args.study]
    report = study(probe, n=args.n, seed=args.seed)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    lines = table(report)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    figure(report, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

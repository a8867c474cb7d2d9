"""Vital layers of the toy model: 8 held-out Shapes-world captions, seeds 0 and 1, judge and pixel measures.

Run from the repository root: ``python benchmarks/toy_vital_layers.py`` (writes reports/toy_vital_layers/report.json).
"""

import json
import time
from pathlib import Path

import numpy as np

import mmdit_probe
from mmdit_probe.toy.world import caption, sample_split_scene


def ranking(scores: np.ndarray) -> list[int]:
    return [int(b) for b in np.argsort(-scores, kind="stable")]


probe = mmdit_probe.load("toy")
rng = np.random.default_rng(0)
prompts = [caption(sample_split_scene(rng, held_out=True)) for _ in range(8)]
out: dict = {"prompts": prompts, "seeds": {}}
start = time.time()
for seed in (0, 1):
    found = probe.vital_layers(prompts, measures=["judge", "pixel"], seed=seed, progress=False)
    scores = found.scores
    out["seeds"][seed] = {"judge": scores["judge"].round(4).tolist(), "pixel": scores["pixel"].round(3).tolist(),
                          "ranking_judge": found.ranking, "ranking_pixel": ranking(scores["pixel"])}
    print(seed, out["seeds"][seed], flush=True)
judge = np.mean([v["judge"] for v in out["seeds"].values()], axis=0)
pixel = np.mean([v["pixel"] for v in out["seeds"].values()], axis=0)
out["mean"] = {"judge": judge.round(4).tolist(), "pixel": pixel.round(3).tolist(),
               "ranking_judge": ranking(judge), "ranking_pixel": ranking(pixel)}
out["seconds"] = round(time.time() - start, 1)
print(out["mean"], out["seconds"])
target = Path(__file__).resolve().parent.parent / "reports" / "toy_vital_layers" / "report.json"
target.parent.mkdir(parents=True, exist_ok=True)
target.write_text(json.dumps(out, indent=1))

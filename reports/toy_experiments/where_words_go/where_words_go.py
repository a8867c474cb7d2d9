"""Where a shape or colour word's T2I attention lands: its own object, the other object, or neither.

    python reports/toy_experiments/where_words_go/where_words_go.py > reports/toy_experiments/where_words_go/result.txt

One-off reading of the shipped toy model on 40 held-out captions (default sampler), per block:
pixel IoU (as `toy.evaluate` scores it), and the share of the word map's total attention that falls
on its own object and on the other object (each token weighted by its share of the object), for
scenes with one object and with two.
"""

from collections import defaultdict

import numpy as np
import torch

import mmdit_probe
from mmdit_probe.maps import normalise
from mmdit_probe.metrics import coverage, score_map
from mmdit_probe.toy.judge import word_masks_from_image
from mmdit_probe.toy.world import WORD_TYPE, caption, sample_split_scene

probe = mmdit_probe.load("toy")
probe.pipeline.set_progress_bar_config(disable=True)
rng = np.random.default_rng(0)
scenes = [sample_split_scene(rng, held_out=True) for _ in range(40)]
scores = defaultdict(list)


def share(word_map: torch.Tensor, object_mask: np.ndarray) -> float:
    """The fraction of the map's total attention on the object's tokens, weighted by coverage."""
    weights = torch.as_tensor(coverage(object_mask, tuple(word_map.shape)))
    return float((word_map * weights).sum() / word_map.sum())


for start in range(0, len(scenes), 10):
    group = scenes[start:start + 10]
    out = probe.generate([caption(s) for s in group], seed=start, same_noise=False, record=True)
    for i, scene in enumerate(group):
        masks = word_masks_from_image(scene, np.asarray(out.images[i]))
        words = out.maps.tables[i].words
        objects = [m for w, m in masks.items() if WORD_TYPE[words[w]] == "shape"]
        for word, mask in masks.items():
            word_type = WORD_TYPE[words[word]]
            if word_type not in ("shape", "colour"):
                continue
            others = [m for m in objects if not np.array_equal(m, mask)]
            key = (word_type, len(objects))
            for block, m in enumerate(out.maps.per_block(word, prompt=i)):
                m = m.float()
                scores[key + (block, "iou")].append(score_map(normalise(m), mask)["iou"])
                scores[key + (block, "own object")].append(share(m, mask))
                scores[key + (block, "other object")].append(sum(share(m, o) for o in others))
print("per block 0..5, mean over words")
for word_type in ("shape", "colour"):
    for n_objects in (1, 2):
        count = len(scores[(word_type, n_objects, 0, "iou")])
        for what in ("iou", "own object", "other object"):
            values = [np.mean(scores[(word_type, n_objects, b, what)]) for b in range(probe.family.num_blocks)]
            print(f"{word_type:>6} words, {n_objects} object(s), {count:3d} words, {what:>12}: "
                  + " ".join(f"{v:.2f}" for v in values))

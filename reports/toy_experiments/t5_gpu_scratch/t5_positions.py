"""Each word's T2I map through one text encoder's positions only: CLIP's or T5's (one-off reading).

    # with ../t5_cpu_finetune/t5.patch applied, on an exported T5 arm:
    python reports/toy_experiments/t5_gpu_scratch/t5_positions.py runs/t5/export > t5_positions.txt

50 held-out captions, default sampler; per word type and block, the mean pixel IoU (as
`toy.evaluate` scores it) of the map averaged over the word's CLIP positions, then over its T5
positions.
"""

import sys
from collections import defaultdict

import numpy as np

import mmdit_probe
from mmdit_probe.maps import normalise
from mmdit_probe.metrics import score_map
from mmdit_probe.toy.judge import word_masks_from_image
from mmdit_probe.toy.world import WORD_TYPE, caption, sample_split_scene

probe = mmdit_probe.load(sys.argv[1])
probe.pipeline.set_progress_bar_config(disable=True)
rng = np.random.default_rng(0)
scenes = [sample_split_scene(rng, held_out=True) for _ in range(50)]
scores = defaultdict(list)
for start in range(0, len(scenes), 10):
    group = scenes[start:start + 10]
    out = probe.generate([caption(s) for s in group], seed=start, same_noise=False, record=True)
    maps = out.maps
    for i, scene in enumerate(group):
        t2i = maps.tensor("t2i")[:, :, maps._row(i, "cond")].float()  # (step, block, image, text)
        for word, mask in word_masks_from_image(scene, np.asarray(out.images[i])).items():
            word_type = WORD_TYPE[maps.tables[i].words[word]]
            for encoder in ("clip", "t5"):
                columns = [maps.positions.index(p) for p in maps.tables[i].positions(word, encoders=(encoder,))]
                per_block = t2i[..., columns].mean(-1).mean(0).reshape(len(maps.blocks), *maps.grid)
                for block, m in enumerate(per_block):
                    scores[(encoder, word_type, block)].append(score_map(normalise(m), mask)["iou"])
print("T2I pixel IoU per block 0..5, through one encoder's positions")
for encoder in ("clip", "t5"):
    for word_type in ("shape", "colour", "background", "size", "position"):
        values = [np.mean(scores[(encoder, word_type, b)]) for b in range(len(maps.blocks))]
        print(f"{encoder:>4} {word_type:>10}: " + " ".join(f"{v:.2f}" for v in values))

"""The shipped toy model: loads offline, generates deterministically, draws what it is told."""

import numpy as np
import pytest
import torch

import mmdit_probe
from mmdit_probe.presets import preset
from mmdit_probe.toy.judge import judge, summarise
from mmdit_probe.toy.model import CLIP_LENGTH, T5_LENGTH
from mmdit_probe.toy.world import IMAGE_SIZE, caption, sample_split_scene

# On 100 held-out captions the shipped weights (step 10253) drew every colour, 98% of shapes and
# every background right (python -m mmdit_probe.toy.evaluate); a handful of prompts must not fall
# far below that.
MIN_COLOUR, MIN_SHAPE, MIN_BACKGROUND = 0.85, 0.75, 0.9


@pytest.fixture(scope="module")
def toy():
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    return probe


def test_toy_loads_offline_with_its_preset(toy):
    p = preset("toy")
    assert toy.preset == p and toy.family.name == "sd3"
    assert (p.resolution, p.max_sequence_length) == (IMAGE_SIZE, T5_LENGTH)
    assert toy.pipeline.tokenizer.model_max_length == CLIP_LENGTH
    assert toy.grid() == (8, 8)
    assert all(b < toy.family.num_blocks for b in p.top_layers)


def test_generation_is_deterministic_for_a_seed(toy):
    prompt = "on the left a small green triangle on a black background"
    first = toy.generate(prompt, seed=3, steps=4, output_type="latent").images
    again = toy.generate(prompt, seed=3, steps=4, output_type="latent").images
    other = toy.generate(prompt, seed=4, steps=4, output_type="latent").images
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_shipped_weights_draw_held_out_captions(toy):
    rng = np.random.default_rng(123)
    scenes = [sample_split_scene(rng, held_out=True) for _ in range(8)]
    images = toy.generate([caption(s) for s in scenes], seed=0, same_noise=False).images
    verdict = summarise([judge(np.asarray(image), s) for image, s in zip(images, scenes)])
    assert verdict["colour"] >= MIN_COLOUR and verdict["shape"] >= MIN_SHAPE
    assert verdict["background"] >= MIN_BACKGROUND


def test_a_training_run_keeps_its_settings(tmp_path):
    import json

    from mmdit_probe.toy.train import RUN_DEFAULTS, run_settings

    assert run_settings(tmp_path / "shipped-like") == RUN_DEFAULTS
    one = run_settings(tmp_path / "one", text_layers=1, unplaced=0.5)
    assert one == {**RUN_DEFAULTS, "text_layers": 1, "unplaced": 0.5}
    assert run_settings(tmp_path / "one") == one  # resuming rebuilds the same model on the same data
    with pytest.raises(ValueError, match="--text-layers 1"):
        run_settings(tmp_path / "one", text_layers=2)
    with pytest.raises(ValueError, match="unknown run settings"):
        run_settings(tmp_path / "one", layers=2)
    # A run started before `unplaced` existed was trained with its default.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "run.json").write_text(json.dumps({"text_layers": 1}))
    assert run_settings(tmp_path / "old")["unplaced"] == RUN_DEFAULTS["unplaced"]


def test_a_resumed_training_run_continues_exactly(tmp_path):
    from mmdit_probe.toy.train import train

    run = dict(seed=0, n_scenes=16, vae_steps=0, batch_size=2, unplaced=0.5, shipped_vae=True)
    train(tmp_path / "straight", 5.0, 4, **run)
    train(tmp_path / "resumed", 5.0, 2, **run)
    train(tmp_path / "resumed", 5.0, 4, **run)  # the same command again continues from step 2
    straight, resumed = (torch.load(tmp_path / name / "diffusion.pt", weights_only=False)
                         for name in ("straight", "resumed"))
    assert straight["step"] == resumed["step"] == 4
    for name in ("model", "ema"):
        assert all(torch.equal(straight[name][k], resumed[name][k]) for k in straight[name])


def test_the_evaluation_report_is_consistent(toy):
    from mmdit_probe.toy.evaluate import STEP_RANGES, evaluate

    report = evaluate(toy, n=2, batch=2)
    assert report["judge"]["objects"] >= 2 and report["blocks"] == list(range(6))
    t2i = report["per_block"]["t2i/raw/all/iou"]
    assert report["headline"]["t2i_best_block_miou"] == max(t2i)
    assert report["top_blocks_t2i_iou"][0] == int(np.argmax(t2i)) and len(report["top_blocks_t2i_iou"]) == 5
    shape = report["per_word_type"]["t2i/shape"]
    assert set(shape["best_block_iou_by_steps"]) == set(STEP_RANGES)
    assert shape["best_block_iou_by_steps"]["all"] == shape["best_block_iou"]
    assert all(0 <= v <= 1 for values in report["per_block"].values() for v in values)
    assert report["headline"]["t2i_best_block_token_miou"] == max(report["per_block"]["t2i/raw/all/token_iou"])
    assert shape["best_block_token_iou"] == report["headline"]["t2i_best_block_token_miou_shape_words"]
    # A perfect block's map (the masks' token coverage) still misses object edges on the pixels.
    assert set(report["coverage_map"]) == {t.split("/")[1] for t in report["per_word_type"]}
    assert all(0.5 < c["iou"] < 1 and 0.5 < c["token_iou"] <= 1 for c in report["coverage_map"].values())

"""The shipped toy model: loads offline, generates deterministically, draws what it is told."""

import pytest
import torch

import mmdit_probe
from mmdit_probe.presets import preset
from mmdit_probe.toy.model import CLIP_LENGTH, T5_LENGTH
from mmdit_probe.toy.world import IMAGE_SIZE


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
    prompt = "a small green triangle on the left on a black background"
    first = toy.generate(prompt, seed=3, steps=4, output_type="latent").images
    again = toy.generate(prompt, seed=3, steps=4, output_type="latent").images
    other = toy.generate(prompt, seed=4, steps=4, output_type="latent").images
    assert torch.equal(first, again) and not torch.equal(first, other)

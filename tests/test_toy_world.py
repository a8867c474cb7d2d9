"""The Shapes world: captions, masks, the held-out split, the word-level tokenizer and the judge."""

import numpy as np

from mmdit_probe.toy.judge import judge, judge_accuracy, read_objects
from mmdit_probe.toy.tokenizer import build_tokenizer
from mmdit_probe.toy.world import (
    BACKGROUNDS,
    COLOURS,
    VOCABULARY,
    Scene,
    Shape,
    caption,
    is_held_out,
    render,
    sample_scene,
    sample_split_scene,
    with_object,
    word_masks,
)


def two_objects() -> Scene:
    return Scene((Shape("circle", "red", "large", "left"), Shape("square", "blue", "small", "right", dy=4.0)), "white")


def test_caption_and_masks_agree():
    scene = two_objects()
    assert caption(scene) == ("a large red circle on the left and a small blue square on the right "
                              "on a white background")
    image, masks = render(scene)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    left, right = masks
    assert left[:, :16].sum() > 0 and left[:, 17:].sum() == 0  # the circle sits on the left
    assert right[:, :16].sum() == 0 and right[:, 17:].sum() > 0
    assert left.sum() > right.sum()  # large vs small
    # Mask pixels carry the object's colour; the rest is background.
    assert np.abs(image[left].mean(0) - COLOURS["red"]).max() < 20
    assert np.abs(image[~(left | right)].mean(0) - BACKGROUNDS["white"]).max() < 5
    words = word_masks(scene, masks)
    assert [w for w, _ in words] == caption(scene).split()
    by_word = dict(words)
    assert by_word["red"] is left and by_word["square"] is right and by_word["the"] is None
    assert np.array_equal(by_word["background"], ~(left | right))


def test_held_out_split_is_fixed_and_disjoint():
    rng = np.random.default_rng(0)
    held = [sample_split_scene(rng, held_out=True) for _ in range(50)]
    train = [sample_split_scene(rng, held_out=False) for _ in range(50)]
    assert all(is_held_out(s) for s in held) and not any(is_held_out(s) for s in train)
    assert not {caption(s) for s in held} & {caption(s) for s in train}
    fraction = np.mean([is_held_out(sample_scene(rng)) for _ in range(2000)])
    assert 0.05 < fraction < 0.15


def test_tokenizer_has_one_token_per_grammar_word_and_round_trips():
    tokenizer = build_tokenizer(22)
    for word in VOCABULARY:
        assert len(tokenizer(word).input_ids) == 3  # BOS, the word, EOS
    text = caption(two_objects())
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == text
    assert len(tokenizer("a zebra!").input_ids) > 4  # unknown words still tokenize, by characters


def test_judge_reads_rendered_scenes():
    scene = two_objects()
    image, _ = render(scene)
    readings = read_objects(image)
    assert [(r.colour, r.shape, r.size, r.position) for r in readings] == [
        ("red", "circle", "large", "left"), ("blue", "square", "small", "right")]
    verdict = judge(image, scene)
    assert verdict.colour == [True, True] and verdict.shape == [True, True] and verdict.background
    wrong = judge(image, with_object(scene, 1, colour="green", shape="triangle"))
    assert wrong.colour == [True, False] and wrong.shape == [True, False]
    accuracy = judge_accuracy(n=100)
    assert accuracy["colour_and_shape"] == 1.0 and accuracy["background"] == 1.0

"""The Shapes world: captions, masks, the held-out split, the word-level tokenizer and the judge."""

from dataclasses import replace

import numpy as np

from mmdit_probe.toy.judge import judge, judge_accuracy, read_objects, word_masks_from_image
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
    unplaced_caption_is_held_out,
    with_object,
    word_masks,
)


def two_objects() -> Scene:
    return Scene((Shape("circle", "red", "large", "left"), Shape("square", "blue", "small", "right", dy=4.0)), "white")


def test_caption_and_masks_agree():
    scene = two_objects()
    assert caption(scene) == ("on the left a large red circle and on the right a small blue square "
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
    # Pinned: the split every shipped model was trained on (set when captions put the place last).
    rng = np.random.default_rng(7)
    assert [i for i in range(300) if is_held_out(sample_scene(rng))][:10] == [1, 5, 11, 34, 52, 91, 94, 112, 123, 124]


def test_captions_without_positions_never_reveal_a_held_out_scene():
    assert caption(two_objects(), placed=False) == "a large red circle and a small blue square on a white background"
    rng = np.random.default_rng(1)
    held = {caption(s, placed=False) for s in (sample_split_scene(rng, held_out=True) for _ in range(1000))}
    train = [sample_split_scene(rng, held_out=False) for _ in range(3000)]
    safe = {caption(s, placed=False) for s in train if not unplaced_caption_is_held_out(s)}
    assert len(safe) > 1000 and not held & safe
    # Without the check they would: the same objects, placed the other way round, are held out.
    assert held & {caption(s, placed=False) for s in train}


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


def test_without_positions_the_judge_matches_objects_by_what_they_are():
    drawn = two_objects()  # red circle left, blue square right
    image, masks = render(drawn)
    asked = Scene(tuple(reversed(drawn.objects)), "white")  # the caption names the square first
    swapped = Scene(tuple(replace(o, position=p) for o, p in zip(asked.objects, ("left", "right"))), "white")
    # Placed: "on the left a small blue square ..." is wrong for this image; unplaced it is right.
    assert judge(image, swapped).colour == [False, False]
    assert judge(image, swapped, placed=False).colour == [True, True]
    by_word = word_masks_from_image(swapped, image, placed=False)
    words = caption(swapped, placed=False).split()
    assert words[:4] == ["a", "small", "blue", "square"] and "left" not in words
    assert np.array_equal(by_word[words.index("blue")], masks[1])
    assert np.array_equal(by_word[words.index("red")], masks[0])


def test_edit_scores_read_success_and_preservation_from_the_images():
    from mmdit_probe.toy.evaluate_edits import psnr, score

    scene = two_objects()
    edits = {"colour": with_object(scene, 0, colour="green"), "background": replace(scene, background="black")}
    for kind, target in edits.items():
        source_image, edited_image = render(scene)[0], render(target)[0]
        done = score(source_image, edited_image, scene, target, kind, 0)
        assert done["success"] == 1.0 and done["preserved"] == 1.0
        # Outside the edit only anti-aliased rims changed: far closer than the images as a whole.
        assert done["psnr_outside"] > psnr(source_image, edited_image, np.ones((32, 32), bool)) + 5
        missed = score(source_image, source_image, scene, target, kind, 0)
        assert missed["success"] == 0.0 and missed["preserved"] == 1.0 and missed["psnr_outside"] == float("inf")

"""Scores against masks, block ranking, and the figures and widgets built on recorded maps."""

import matplotlib
import numpy as np
import pytest
import torch

from mmdit_probe.maps import AttentionMaps
from mmdit_probe.metrics import METRICS, coverage, score_blocks, score_map, score_maps, token_mask
from mmdit_probe.tokens import Token, TokenTable
from mmdit_probe.viz import Explorer, block_scores, heatmap, t2i_vs_i2t, word_grid

matplotlib.use("Agg")


def synthetic_maps() -> AttentionMaps:
    """Three blocks on a 4x4 grid; the word "cat" (text position 1) sits in the top-left 2x2 corner,
    sharply in block 2, blurred in block 1, nowhere in block 0."""
    cat = torch.zeros(4, 4)
    cat[:2, :2] = 1
    blocks = [torch.full((4, 4), 1 / 16), 0.5 * cat / 4 + 0.5 / 16, cat / 4]
    t2i = torch.zeros(2, 3, 1, 16, 2)
    for b, m in enumerate(blocks):
        t2i[:, b, 0, :, 1] = m.flatten()
        t2i[:, b, 0, :, 0] = 1 / 16
    table = TokenTable("a cat", [Token(0, "clip", "a</w>", "a", 0), Token(1, "clip", "cat</w>", "cat", 1)], 2)
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    return AttentionMaps(t2i=t2i, i2t=t2i.clone(), steps=[0, 1], blocks=[0, 1, 2], positions=[0, 1], tables=[table],
                         grid=(4, 4), top_layers=(2, 1), images=[image])


def cat_mask() -> np.ndarray:
    mask = np.zeros((16, 16), dtype=bool)
    mask[:8, :8] = True
    return mask


def test_score_map_on_perfect_and_empty_predictions():
    mask = cat_mask()
    perfect = score_map(torch.from_numpy(mask).float(), mask)
    assert perfect["soft_iou"] == 1.0 and perfect["iou"] == 1.0 and perfect["mse"] == 0.0
    assert score_map(torch.zeros(16, 16), mask)["soft_iou"] == 0.0
    with pytest.raises(ValueError, match="2-D"):
        score_map(torch.zeros(4, 4), np.zeros((2, 2, 2)))


def reference_scores(m: np.ndarray, mask: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The four scores in float64 numpy, with bilinear upsampling written out (align_corners=False)."""
    def axis(n_in, n_out):  # source index pairs and weights along one axis
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    (r0, r1, wr), (c0, c1, wc) = axis(m.shape[0], mask.shape[0]), axis(m.shape[1], mask.shape[1])
    m = m.astype(np.float64)
    rows = m[r0] * (1 - wr)[:, None] + m[r1] * wr[:, None]
    p = np.clip(rows[:, c0] * (1 - wc) + rows[:, c1] * wc, 0, 1)
    t = mask.astype(np.float64)
    binary = p >= threshold
    bce = -(t * np.log(np.clip(p, 1e-6, 1)) + (1 - t) * np.log(np.clip(1 - p, 1e-6, 1))).mean()
    return {"soft_iou": (p * t).sum() / (p + t - p * t).sum(), "iou": (binary * t).sum() / (binary | (t > 0)).sum(),
            "bce": bce, "mse": ((p - t) ** 2).mean()}


@pytest.mark.parametrize("grid, size", [((8, 8), (32, 32)), ((64, 64), (1024, 1024)), ((5, 7), (40, 21))])
def test_score_maps_is_score_map_of_each_map(grid, size):
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(6, *grid, generator=generator) * 1.2 - 0.1  # a little outside [0, 1]: clamped
    maps[0] = 0
    rows, cols = np.mgrid[:size[0], :size[1]]
    mask = (rows - size[0] / 2) ** 2 + (cols - size[1] / 3) ** 2 < (min(size) / 3) ** 2
    batched = score_maps(maps, mask)
    assert set(batched) == set(METRICS) and all(v.shape == (6,) for v in batched.values())
    for i, m in enumerate(maps):
        single, reference = score_map(m, mask), reference_scores(m.numpy(), mask)
        assert single == {k: float(v[i]) for k, v in batched.items()}  # a map scores the same alone and in a batch
        for metric in METRICS:
            assert single[metric] == pytest.approx(reference[metric], rel=1e-5, abs=1e-6), metric


def test_score_maps_on_large_masks_does_not_depend_on_the_thread_count():
    # torch splits one long sum over threads; score_maps adds each map's pixels in a fixed order instead.
    maps = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = np.random.default_rng(1).random((512, 512)) < 0.3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [score_map(m, mask) for m in maps]
        torch.set_num_threads(2)
        assert [score_map(m, mask) for m in maps] == one
    finally:
        torch.set_num_threads(threads)


def test_score_maps_with_a_soft_mask_and_same_sized_maps():
    generator = torch.Generator().manual_seed(2)
    maps, soft = torch.rand(3, 16, 16, generator=generator), torch.rand(16, 16, generator=generator).numpy()
    batched = score_maps(maps, soft)
    for i, m in enumerate(maps):
        reference = reference_scores(m.numpy(), soft)
        for metric in METRICS:
            assert float(batched[metric][i]) == pytest.approx(reference[metric], rel=1e-5), metric
    assert torch.equal(maps, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2)))  # not clamped in place
    with pytest.raises(ValueError, match=r"\(N, rows, cols\)"):
        score_maps(maps[0], soft)


def test_masks_on_the_token_grid():
    # A disc of radius 5 at (8, 8) on 16x16 pixels, against a 4x4 grid of 4-pixel tokens.
    rows, cols = np.mgrid[:16, :16]
    disc = (rows + 0.5 - 8) ** 2 + (cols + 0.5 - 8) ** 2 <= 25
    share = coverage(disc, (4, 4))
    expected = disc.reshape(4, 4, 4, 4).mean(axis=(1, 3))  # an independent block average
    assert torch.allclose(share, torch.from_numpy(expected).float())
    assert token_mask(disc, (4, 4)).tolist() == (expected >= 0.5).astype(float).tolist()
    # A map equal to the token mask is perfect at token resolution, not on the pixels.
    on_tokens = token_mask(disc, (4, 4))
    assert score_map(on_tokens, on_tokens)["iou"] == 1.0
    assert score_map(on_tokens, disc)["iou"] < 1.0
    with pytest.raises(ValueError, match="token grid"):
        coverage(disc, (3, 3))


def test_blocks_rank_by_how_well_their_maps_fit_the_mask():
    scores = score_blocks(synthetic_maps(), {"cat": cat_mask()})
    assert scores.ranked("soft_iou") == [2, 1, 0]
    assert scores.ranked("mse") == [2, 1, 0]
    assert scores.top(1) == [2]
    assert "block" in scores.table()


def test_figures_render():
    maps = synthetic_maps()
    for fig in (word_grid(maps, ["a", "cat"]), word_grid(maps, ["cat"], by="step"), t2i_vs_i2t(maps, ["cat"]),
                block_scores(score_blocks(maps, {"cat": cat_mask()}))):
        assert len(fig.axes) >= 1
    fig = heatmap(maps, "cat")
    assert [f.name for f in fig.frames] == ["0", "1", "2"]
    assert "block 2" in fig.frames[2].data[0].hovertemplate


def test_explorer_redraws_on_slider_moves():
    explorer = Explorer(synthetic_maps(), masks={"cat": cat_mask()})
    explorer.word.value = "cat"
    explorer.block.value = 0
    flat = explorer.image.value
    explorer.block.value = 2
    assert explorer.image.value != flat
    assert "block 2" in explorer.caption.value
    explorer.top.value = True
    assert "top layers [2, 1]" in explorer.caption.value


def test_explorer_opens_on_a_content_word_and_refuses_unknown_words():
    assert Explorer(synthetic_maps()).word.value == "cat"  # not the article before it
    assert Explorer(synthetic_maps(), word="a").word.value == "a"
    with pytest.raises(ValueError, match="dog"):
        Explorer(synthetic_maps(), word="dog")

"""`activation_patching`: exactness against hand-done patches, self-patching, batching, errors, the result.

Bit-exactness on CPU holds between runs with the same batch layout (the same number of prompts in one
forward pass): matmuls over a different number of rows may round differently in the last bits, so
every bit-for-bit reference here uses the layout of the grid's own forward passes, and grids run with
different `batch_size` are compared to within rounding (the tolerance says how close).
"""

import numpy as np
import pytest
import torch

import mmdit_probe
from mmdit_probe.patching import (
    PatchingResult,
    activation_patching,
    patch,
    replace_rows,
    rows,
    shapes_judge,
    token_dim,
)
from mmdit_probe.testing import TINY_GENERATION_KWARGS
from mmdit_probe.toy.judge import read_objects
from mmdit_probe.validation import InvalidInput

CLEAN, CORRUPT = "a red cat", "a blue cat"
HOOKS = ["q_img", "k_img", "v_img", "q_txt", "k_txt", "v_txt", "out_img", "out_txt"]


def generation(kind):
    kw = TINY_GENERATION_KWARGS[kind]
    return dict(num_steps=kw["num_inference_steps"], guidance=kw["guidance_scale"], height=kw["height"],
                width=kw["width"], max_sequence_length=kw["max_sequence_length"], progress=False)


def inputs_for(probe, kind, prompts, output_type):
    g = generation(kind)
    return probe.inputs(prompts, seed=0, steps=g["num_steps"], guidance=g["guidance"], height=g["height"],
                        width=g["width"], max_sequence_length=g["max_sequence_length"], output_type=output_type)


def hand_patched(probe, kind, prompts, sites, output_type="latent"):
    """The patched runs done by hand: one nnsight trace, `patch` + `replace_rows` at each
    (step, hook name, source prompt, target prompt, positions, half) site, in execution order."""
    inputs = inputs_for(probe, kind, prompts, output_type)
    n, order = len(prompts), {name: i for i, name in enumerate(probe.hook_names)}
    last = max(site[0] for site in sites)
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:last + 1]:
            here = sorted((s for s in sites if s[0] == step), key=lambda s: order[s[1]])
            for _, name, source, target, positions, half in here:
                dim = token_dim(name)
                patch(probe, name, lambda x, s=source, t=target, p=positions, h=half, d=dim:
                      replace_rows(x, rows(n, x, s, h), rows(n, x, t, h), p, d))
        out = probe.model.output.save()
    return out.images


def plain(probe, kind, prompts, output_type="latent"):
    return probe.pipeline(**inputs_for(probe, kind, prompts, output_type)).images


def test_self_patching_changes_nothing(probe, kind):
    """Clean = corrupt: every hook kind in every block (Flux single-stream ones too) at every step gives
    exactly zero change, and every patched image is bit-identical to the unpatched run."""
    cells = len(HOOKS) * probe.family.num_blocks
    result = activation_patching(probe, CLEAN, CLEAN, HOOKS, over=("hook", "block"), metric="distance",
                                 batch_size=cells, **generation(kind))
    assert result.values.shape == (len(HOOKS), probe.family.num_blocks)
    assert torch.count_nonzero(result.values) == 0
    reference = plain(probe, kind, [CLEAN] * (2 + cells), output_type="pt")  # the same batch layout, unpatched
    assert torch.equal(result.clean, reference[0]) and torch.equal(result.corrupt, reference[1])
    for cell in result.outputs.flatten(0, 1):
        assert torch.equal(cell, reference[0])


def test_each_cell_equals_the_hand_done_patch(probe, kind):
    """block x step grid of text values, noising: each cell = one hand-done trace with the same layout
    [clean, corrupt, clean], bit for bit; the metric is the projection computed independently."""
    half = "cond"  # under classifier-free guidance (SD3 here) only the conditional rows
    result = activation_patching(probe, CLEAN, CORRUPT, "v_txt", over=("block", "step"), half=half, batch_size=1,
                                 output="latent", **generation(kind))
    n_steps = generation(kind)["num_steps"]
    assert result.labels == {"block": [str(b) for b in range(probe.family.num_blocks)],
                             "step": [str(s) for s in range(n_steps)]}
    clean, corrupt = (x.double().numpy() for x in (result.clean, result.corrupt))
    for block in range(probe.family.num_blocks):
        for step in range(n_steps):
            name = f"blocks.{block}.attn.hook_v_txt"
            by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT, CLEAN], [(step, name, 1, 2, None, half)])
            cell = result.cell_output(block=block, step=step)
            assert torch.equal(cell, by_hand[2])
            assert torch.equal(result.clean, by_hand[0]) and torch.equal(result.corrupt, by_hand[1])
            d = corrupt - clean
            expected = float(((cell.double().numpy() - clean) * d).sum() / (d * d).sum())
            assert result.value(block=block, step=step) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.values.abs().sum() > 0  # the prompts differ: some patch moves the output


def test_positions_regions_and_denoising_equal_hand_done_patches(probe, kind):
    """Words and text positions on a text hook, and an image region on an image output, patched corrupt <-
    clean (denoising) in a joint block set (Flux: the last, single-stream block) and one step window."""
    last = probe.family.num_blocks - 1
    blocks = [0, last]
    table = probe.tokens(CLEAN, generation(kind)["max_sequence_length"])
    words = activation_patching(probe, CLEAN, CORRUPT, "k_txt", over="position", positions=["red", [0, 1]],
                                blocks=blocks, steps=[1], direction="denoising", batch_size=2, output="latent",
                                **generation(kind))
    assert words.labels == {"position": ["red", "0,1"]}
    assert words.joint["block"] == [[0], [last]] and words.joint["step"] == [[1]]  # a list: entries, all patched
    n = 4  # [clean, corrupt, corrupt patched at "red", corrupt patched at 0, 1]
    names = [f"blocks.{b}.attn.hook_k_txt" for b in blocks]
    sites = [(1, name, 0, 2 + i, positions, "both")
             for i, positions in enumerate([table.positions("red"), [0, 1]]) for name in names]
    by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT, CORRUPT, CORRUPT], sites)
    assert len(by_hand) == n
    assert torch.equal(words.outputs, by_hand[2:])

    mask = torch.zeros(probe.grid(64, 64), dtype=torch.bool)
    mask[1:3, :2] = True
    region = activation_patching(probe, CLEAN, CORRUPT, ["out_img"], over=("position",),
                                 positions={"left middle": mask}, blocks=[last], steps="windows",
                                 direction="denoising", batch_size=1, output="latent", **generation(kind))
    tokens = torch.nonzero(mask.flatten()).flatten().tolist()
    assert region.joint["step"] == [[0], [1]]  # two steps make two windows, early and middle
    name = f"blocks.{last}.attn.hook_out_img"
    by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT, CORRUPT],
                           [(s, name, 0, 2, tokens, "both") for s in (0, 1)])
    assert torch.equal(region.outputs[0], by_hand[2])


def test_uncond_half_is_shared_under_guidance(tiny_dirs):
    """SD3 with classifier-free guidance: at the first step both prompts' unconditional rows are the same empty
    prompt on the same noise, so patching only them changes nothing, bit for bit; the conditional half does
    change the image. (From the second step on the unconditional rows see each prompt's own latents.)"""
    kind = "sd3"
    probe = mmdit_probe.load(tiny_dirs[kind])
    result = activation_patching(probe, CLEAN, CORRUPT, ["v_txt", "k_txt"], over=("half",), steps=[0],
                                 batch_size=3, output="latent", **generation(kind))
    assert result.labels["half"] == ["cond", "uncond", "both"]
    assert result.value(half="uncond") == 0.0
    assert torch.equal(result.cell_output(half="uncond"), result.clean)
    assert result.value(half="cond") != 0.0
    assert torch.equal(result.cell_output(half="cond"), result.cell_output(half="both"))


def test_batched_and_unbatched_grids_agree(probe, kind):
    """batch_size=1 and one batch for the whole grid: equal within rounding (different batch sizes may round
    matmuls differently on CPU). Within one batch each cell is bit-identical to a hand-done trace of the
    same layout that patches only that cell's row: the other cells' patches do not leak into it."""
    options = dict(over=("hook", "block"), blocks=None, direction="noising", output="latent", **generation(kind))
    hooks = ["q_img", "v_txt"]
    one = activation_patching(probe, CLEAN, CORRUPT, hooks, batch_size=1, **options)
    cells = len(hooks) * probe.family.num_blocks
    whole = activation_patching(probe, CLEAN, CORRUPT, hooks, batch_size=cells, **options)
    torch.testing.assert_close(whole.outputs, one.outputs, rtol=0, atol=1e-5)
    torch.testing.assert_close(whole.values, one.values, rtol=0, atol=1e-5)
    assert whole.labels == one.labels
    n_steps = generation(kind)["num_steps"]
    for i, (hook, block) in enumerate([(h, b) for h in hooks for b in range(probe.family.num_blocks)]):
        name = f"blocks.{block}.attn.hook_{hook}"
        by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT] + [CLEAN] * cells,
                               [(s, name, 1, 2 + i, None, "both") for s in range(n_steps)])
        assert torch.equal(whole.cell_output(hook=hook, block=block), by_hand[2 + i])


def test_flux_single_stream_text_hooks(tiny_dirs):
    """Flux single-stream blocks split the joint sequence: their text taps patch like double-stream ones."""
    kind = "flux-dev"
    probe = mmdit_probe.load(tiny_dirs[kind])
    single = list(range(probe.family.num_double, probe.family.num_blocks))
    result = activation_patching(probe, CLEAN, CORRUPT, ["q_txt", "v_txt"], over=("hook", "block"),
                                 blocks=single, positions=["red"], output="latent", **generation(kind))
    assert result.labels["block"] == [str(b) for b in single]
    table = probe.tokens(CLEAN, 16)
    sites = [(s, f"blocks.{single[0]}.attn.hook_v_txt", 1, 2, table.positions("red"), "both") for s in (0, 1)]
    by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT, CLEAN, CLEAN, CLEAN, CLEAN], sites)
    assert torch.equal(result.cell_output(hook="v_txt", block=single[0]), by_hand[2])
    # The last block's text queries reach only text outputs, which Flux drops after it: exactly no change.
    assert result.value(hook="q_txt", block=single[-1]) == 0.0
    assert result.value(hook="v_txt", block=single[-1]) != 0.0 and result.value(hook="q_txt", block=single[0]) != 0.0


def test_refuses_bad_input(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    options = generation("sd3")

    def refused(match, *args, **kwargs):
        with pytest.raises(InvalidInput, match=match):
            activation_patching(probe, *args, **{**options, **kwargs})

    refused("unknown hook kind 'v_text'", CLEAN, CORRUPT, "v_text")
    refused("choose dimensions from", CLEAN, CORRUPT, "v_txt", over=("layer",))
    refused("names a dimension twice", CLEAN, CORRUPT, "v_txt", over=("block", "block"))
    refused("out of range: this run has blocks 0..1", CLEAN, CORRUPT, "v_txt", blocks=[0, 2])
    refused("out of range: this run has steps 0..1", CLEAN, CORRUPT, "v_txt", over="step", steps=[5])
    refused("word 'dog' is in neither prompt; their words are: a, red, cat, blue", CLEAN, CORRUPT, "v_txt",
            positions=["dog"])
    refused("token layouts differ", CLEAN, "a blue big cat", "v_txt", positions=["red"])
    refused("token layouts differ", CLEAN, "a blue big cat", "v_txt", over="position")
    refused("text positions index the txt stream, but hook 'v_img'", CLEAN, CORRUPT, "v_img", positions=["red"])
    refused("must have the token grid's shape", CLEAN, CORRUPT, "v_img", positions=[torch.ones(3, 3, dtype=bool)])
    refused("selects no token", CLEAN, CORRUPT, "v_img", positions=[torch.zeros(4, 4, dtype=bool)])
    refused("has no 'hook_q_img'|block 0 has no 'attn2'", CLEAN, CORRUPT, "attn2.q_img")
    refused("steps='thirds' is not allowed", CLEAN, CORRUPT, "v_txt", over="step", steps="thirds")
    refused("direction='forward' is not allowed", CLEAN, CORRUPT, "v_txt", direction="forward")
    refused("same prompt", CLEAN, CLEAN, "v_txt")
    refused("metric='logit' is not allowed", CLEAN, CORRUPT, "v_txt", metric="logit")
    refused("sets latents itself", CLEAN, CORRUPT, "v_txt", latents=torch.zeros(1))
    refused("holds several halves", CLEAN, CORRUPT, "v_txt", half=["cond", "uncond"])
    refused("returned 1 values for 2 patched outputs", CLEAN, CORRUPT, "v_txt", over="block",
            metric=lambda patched, clean, corrupt: torch.zeros(1))
    refused("reads images: run with output='image'", CLEAN, CORRUPT, "v_txt", metric=shapes_judge(), output="latent")
    refused("give token-grid masks as positions", CLEAN, CORRUPT, "q_img", over="position")
    flux = mmdit_probe.load(tiny_dirs["flux-schnell"])
    with pytest.raises(InvalidInput, match="needs classifier-free guidance"):
        activation_patching(flux, CLEAN, CORRUPT, "v_txt", half="uncond", **generation("flux-schnell"))


def test_result_table_heatmap_and_windows(tiny_dirs):
    kind = "sd3"
    probe = mmdit_probe.load(tiny_dirs[kind])
    result = activation_patching(probe, CLEAN, CORRUPT, {"text values": "v_txt"}, over=("step", "hook", "block"),
                                 steps={"first": 0, "both": range(2)}, **generation(kind))
    assert isinstance(result, PatchingResult) and result.dims == ("step", "hook", "block")
    assert result.members["step"] == [[0], [0, 1]] and result.labels["hook"] == ["text values"]
    table = result.to_pandas()
    assert list(table.columns) == ["step", "hook", "block", "value"] and len(table) == result.values.numel()
    assert table.set_index(["step", "hook", "block"]).loc[("both", "text values", "1"), "value"] == \
        result.value(step="both", hook="text values", block=1)
    fig = result.heatmap(x="block", y="step", hook="text values")
    assert list(fig.data[0].x) == ["0", "1"] and list(fig.data[0].y) == ["first", "both"]
    np.testing.assert_array_equal(fig.data[0].z, result.values[:, 0, :].numpy())
    with pytest.raises(InvalidInput, match="fix \\['hook'\\]"):
        result.heatmap(x="block", y="step")
    assert result.image(step="first", hook="text values", block=0).size == (64, 64)
    assert result.image(run="corrupt").size == (64, 64)
    window = activation_patching(probe, CLEAN, CORRUPT, "v_txt", over="step", steps="windows",
                                 **{**generation(kind), "num_steps": 7})
    assert window.labels["step"] == ["early", "middle", "late"]
    assert window.members["step"] == [[0, 1, 2], [3, 4], [5, 6]]


def test_toy_judge_metric_and_self_patch():
    """The Shapes world: the judge reads the clean image's colour as 0 and the corrupt one's as 1, and a
    run patched with itself is unchanged."""
    probe = mmdit_probe.load("toy")
    clean = "in the center a large red circle on a white background"
    corrupt = "in the center a large blue circle on a white background"
    judge = shapes_judge("colour")
    result = activation_patching(probe, clean, corrupt, "v_txt", over="block", metric=judge, num_steps=8,
                                 progress=False)
    assert judge(torch.stack([result.clean, result.corrupt]), result.clean, result.corrupt).tolist() == [0.0, 1.0]
    for block in range(probe.family.num_blocks):  # the metric agrees with the judge reading the PIL image
        found = read_objects(np.asarray(result.image(block=block)))
        colour = found[0].colour if found else None
        expected = {"red": 0.0, "blue": 1.0}.get(colour, float("nan"))
        np.testing.assert_equal(result.value(block=block), expected)
    same = activation_patching(probe, clean, clean, ["q_img", "v_txt"], over="hook", metric="distance",
                               num_steps=8, progress=False)
    assert torch.count_nonzero(same.values) == 0
    assert all(torch.equal(cell, same.clean) for cell in same.outputs)


def test_sd35_image_only_attention(tiny_dirs):
    """SD3.5-M's image-only `attn2` hooks ("attn2.v_img") patch like the joint ones, after `attn` in execution."""
    kind = "sd3.5"
    probe = mmdit_probe.load(tiny_dirs[kind])
    result = activation_patching(probe, CLEAN, CORRUPT, ["v_txt", "attn2.v_img"], over="hook", blocks=[0],
                                 steps=[1], batch_size=1, output="latent", **generation(kind))
    assert result.labels["hook"] == ["v_txt", "attn2.v_img"]
    by_hand = hand_patched(probe, kind, [CLEAN, CORRUPT, CLEAN], [(1, "blocks.0.attn2.hook_v_img", 1, 2, None, "both")])
    assert torch.equal(result.cell_output(hook="attn2.v_img"), by_hand[2])
    assert result.value(hook="attn2.v_img") != 0.0

"""Parity with the paper's released code (issue #28, editing): region replacement against the explicit N x N
definition on every tiny family, the step windows, the local blend's options, the SD3.5-M block readings."""

import pytest
import torch
from conftest import tiny_inputs
from scipy.ndimage import maximum_filter

import mmdit_probe
from mmdit_probe.constants import EDIT_METHODS, REPLACEMENTS, VARIANTS
from mmdit_probe.editing.base import blend_mask
from mmdit_probe.editing.qk_injection import RegionReplacement, _plan
from mmdit_probe.kernels import region_attention
from mmdit_probe.maps import normalise, smooth
from mmdit_probe.presets import PRESETS, paper
from mmdit_probe.testing import tiny_pipeline
from mmdit_probe.validation import InvalidInput

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"


def explicit(q, k, v, q_source, k_source, rows, cols, mask=None):
    """The definition, in float64 with the whole score matrix: the target's scaled scores with the block
    (rows x cols) taken from the source's, the target's attention mask applied as scaled_dot_product_attention
    applies it (boolean: -inf where False; float: added), softmax over each row, times the target's values."""
    q, k, v, q_source, k_source = (t.double() for t in (q, k, v, q_source, k_source))
    scale = q.shape[-1] ** -0.5
    scores = q @ k.transpose(-1, -2) * scale
    scores[..., rows, cols] = (q_source @ k_source.transpose(-1, -2) * scale)[..., rows, cols]
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1) @ v


def test_region_attention_kernel_is_the_definition():
    torch.manual_seed(0)
    q, k, v, qs, ks = (torch.randn(2, 3, 40, 16) for _ in range(5))
    for rows, cols, rest in [(slice(0, 24), slice(0, 24), slice(24, None)), (slice(24, None), slice(0, 24),
                                                                             slice(24, None))]:
        out, lse = region_attention(q[:, :, rows], k, v, qs[:, :, rows], ks, cols, rest)
        want = explicit(q, k, v, qs, ks, rows, cols)[:, :, rows]
        assert (out.double() - want).abs().max() < 1e-6
        scores = torch.cat([qs[:, :, rows] @ ks[:, :, cols].transpose(-1, -2),
                            q[:, :, rows] @ k[:, :, rest].transpose(-1, -2)], -1).double() * 16 ** -0.5
        assert (lse.double() - scores.logsumexp(-1)).abs().max() < 1e-5


def replaced_calls(probe, inputs, region):
    """One generation with `region` replaced in every block at step 0: per attention call, the processor's q, k, v,
    its output, the stock output, and the mask of the joint sequence built here from what the block hands its
    attention (Chroma's `attention_mask`; Qwen-Image's `encoder_hidden_states_mask`, image keys kept), or None."""
    replacement, seen, masks, handles = RegionReplacement(region, steps=[0]), [], [], []

    def watched(q, k, v, streams, stock, mask=None):
        out, lse = replacement(q, k, v, streams, stock, mask)
        seen.append((q, k, v, out, stock()[0]))
        return out, lse

    def keep_mask(module, args, kwargs):
        text_mask, mask = kwargs.get("encoder_hidden_states_mask"), kwargs.get("attention_mask")
        if text_mask is not None:
            image = torch.ones(kwargs["hidden_states"].shape[:2], dtype=torch.bool)
            mask = torch.cat([text_mask, image], dim=1)[:, None, None, :]
        masks.append(mask)

    attentions = [probe.pipeline.transformer.get_submodule(a.path) for a in probe.family.attentions if a.has_text]
    for attention in attentions:
        attention.processor.region_replacement = watched
        handles.append(attention.register_forward_pre_hook(keep_mask, with_kwargs=True))
    try:
        probe.pipeline(**inputs)
    finally:
        for attention, handle in zip(attentions, handles):
            attention.processor.region_replacement = None
            handle.remove()
    steps = inputs["num_inference_steps"]  # the replacement's step is never advanced here: every call is replaced
    assert len(seen) == len(masks) == steps * len(attentions)
    return [(*call, mask) for call, mask in zip(seen, masks)]


def check_replaced(calls, layout, region, source=0, target=1):
    """Each call's target rows against `explicit` (float64, the target's mask); every other row bit for bit the
    processor's own. `layout`: each stream's tokens in the joint sequence, from the family's facts."""
    rows, cols = layout[REPLACEMENTS[region][0]], layout[REPLACEMENTS[region][1]]
    for q, k, v, out, stock, mask in calls:
        target_mask = None if mask is None else mask[target]
        want = explicit(q[target], k[target], v[target], q[source], k[source], rows, cols, target_mask)
        assert (out[target].double() - want).abs().max() < 1e-5
        others = [r for r in range(q.shape[0]) if r != target]
        assert torch.equal(out[others], stock[others])  # every other row: the processor's own attention, bit for bit
        other_rows = torch.ones(q.shape[2], dtype=torch.bool)
        other_rows[rows] = False
        assert torch.equal(out[target][:, other_rows], stock[target][:, other_rows])


def test_region_attention_kernel_under_a_mask_is_the_masked_definition():
    # Masks as the families hand them: a float bias per (query, key) (Chroma's), a boolean key mask broadcast over
    # the queries (Qwen-Image's), and a boolean mask that leaves some rows no key of one subset (weight 0 there),
    # after one of its shape that keeps every key (the fused kernel, checked on that first call, then runs it).
    torch.manual_seed(1)
    q, k, v, qs, ks = (torch.randn(2, 3, 40, 16) for _ in range(5))
    keys = torch.rand(2, 1, 1, 40) > 0.3
    keys[..., 30:] = True
    empty = torch.ones(2, 1, 40, 40, dtype=torch.bool)
    empty[:, :, 26:, 24:] = False  # queries 26.. see none of the keys 24..
    masks = [torch.rand(2, 1, 40, 40).round(), keys, torch.ones_like(empty), empty]
    rest = torch.cat([torch.arange(0, 8), torch.arange(32, 40)])  # several ranges: an index
    for mask in masks:
        for rows, cols, rest_ in [(slice(24, None), slice(0, 24), slice(24, None)),
                                  (slice(8, 32), slice(8, 32), rest)]:
            row_mask = mask if mask.shape[2] == 1 else mask[:, :, rows]
            out, lse = region_attention(q[:, :, rows], k, v, qs[:, :, rows], ks, cols, rest_, attn_mask=row_mask)
            want = explicit(q, k, v, qs, ks, rows, cols, mask)[:, :, rows]
            assert torch.isfinite(out).all() and (out.double() - want).abs().max() < 1e-6
            full = torch.cat([qs[:, :, rows] @ ks[:, :, cols].transpose(-1, -2),
                              q[:, :, rows] @ k[:, :, rest_].transpose(-1, -2)], -1).double() * 16 ** -0.5
            both = torch.cat([row_mask[..., cols], row_mask[..., rest_]], -1).expand(full.shape)
            full = full.masked_fill(~both, -torch.inf) if both.dtype == torch.bool else full + both
            assert (lse.double() - full.logsumexp(-1)).abs().max() < 1e-5


@pytest.mark.parametrize("region", list(REPLACEMENTS))
def test_region_replacement_in_every_block_is_the_definition(probe, kind, region):
    steps = probe.family.min_steps  # 1, or Qwen-Image's 2
    inputs = tiny_inputs(probe, kind, [SOURCE, TARGET], num_inference_steps=steps)
    calls = replaced_calls(probe, inputs, region)
    n_image = probe.grid(inputs["height"], inputs["width"])
    n_image = n_image[0] * n_image[1]
    q = calls[0][0]
    n_text = q.shape[2] - n_image  # the layout from the family's facts, not from the processor's slices
    image, text = ((slice(0, n_image), slice(n_image, None)) if probe.family.image_first
                   else (slice(n_text, None), slice(0, n_text)))
    if probe.family.masks_attention:
        assert all(call[-1] is not None for call in calls)  # Chroma: its mask is applied, and checked against
    cfg = q.shape[0] == 4  # classifier-free guidance: the conditional half
    check_replaced(calls, {"img": image, "txt": text}, region, *((2, 3) if cfg else (0, 1)))


@pytest.mark.parametrize("region", list(REPLACEMENTS))
@pytest.mark.parametrize("shorter", ["target", "source"])
def test_region_replacement_under_qwen_images_key_mask(tiny_dirs, region, shorter):
    # Prompts of different lengths: the shorter one's text is padded and its padding masked out of the keys.
    probe = mmdit_probe.load(tiny_dirs["qwen-image"])
    prompts = ["a red cat", "a big blue dog on a mat, sitting"]
    prompts = prompts[::-1] if shorter == "target" else prompts
    inputs = tiny_inputs(probe, "qwen-image", prompts, num_inference_steps=2, max_sequence_length=16)
    calls = replaced_calls(probe, inputs, region)
    mask = calls[0][-1]
    assert mask is not None and not mask[1 if shorter == "target" else 0].all()  # the shorter prompt is padded
    n_text = calls[0][0].shape[2] - 16
    check_replaced(calls, {"txt": slice(0, n_text), "img": slice(n_text, None)}, region)


@pytest.mark.parametrize("region", list(REPLACEMENTS))
def test_region_replacement_with_kontexts_context_image(tiny_dirs, region):
    # Three streams, [text | image | reference]: the replaced block is image rows against image or text keys, and
    # every other key (text and reference, or image and reference) keeps the target's scores.
    probe = mmdit_probe.load(tiny_dirs["flux-kontext"])
    image = torch.rand(1, 3, 48, 80, generator=torch.Generator().manual_seed(0))
    inputs = tiny_inputs(probe, "flux-kontext", [SOURCE, TARGET], num_inference_steps=1, image=image,
                         _auto_resize=False)
    calls = replaced_calls(probe, inputs, region)
    n_text, n_image, n_ref = inputs["max_sequence_length"], 16, 15  # 64 x 64 px: 4 x 4; the 48 x 80 image: 3 x 5
    assert calls[0][0].shape[2] == n_text + n_image + n_ref
    check_replaced(calls, {"txt": slice(0, n_text), "img": slice(n_text, n_text + n_image)}, region)


@pytest.mark.parametrize("method", [m for m in EDIT_METHODS if m != "none"])
def test_every_method_leaves_the_source_and_a_same_prompt_edit_is_the_source(tiny_dirs, method):
    probe = mmdit_probe.load(tiny_dirs["sd3.5"])
    kw = tiny_inputs(probe, "sd3.5", [SOURCE, TARGET])
    options = dict(seed=0, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"], height=kw["height"],
                   width=kw["width"], max_sequence_length=kw["max_sequence_length"], output_type="latent",
                   tau=1.0, local_blend=False, variant=method)
    plain = probe.pipeline(**kw).images
    edited = probe.edit(SOURCE, TARGET, **options)
    assert torch.equal(edited.source_image, plain[0]) and not torch.equal(edited.edited_image, plain[1])
    same = probe.edit(SOURCE, SOURCE, **options)
    if method in VARIANTS:  # the source's activations put into rows that hold the same ones: the same bits
        assert torch.equal(same.edited_image, same.source_image)
    else:  # the same scores through two attention calls instead of one: float32 rounding
        assert (same.edited_image - same.source_image).abs().max() < 1e-5


def test_region_replacement_is_off_after_the_edit_and_after_an_error(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    kw = tiny_inputs(probe, "flux-dev", [SOURCE, TARGET])
    probe.edit(SOURCE, TARGET, seed=0, steps=kw["num_inference_steps"], height=kw["height"], width=kw["width"],
               max_sequence_length=kw["max_sequence_length"], output_type="latent", variant="I2I", tau=1.0)
    assert all(probe.pipeline.transformer.get_submodule(a.path).processor.region_replacement is None
               for a in probe.family.attentions)
    assert torch.equal(probe.pipeline(**kw).images, mmdit_probe.load(tiny_dirs["flux-dev"]).pipeline(**kw).images)


def test_step_windows():
    probe = mmdit_probe.load(tiny_pipeline("sd3"))

    def plan(**options):
        return _plan(probe, SOURCE, TARGET, **{"steps": 28, "tau": 0.2, "eta": 0.5, **options})

    assert plan().inject_steps == list(range(6))  # s < 0.2 * 28: this package's default, unchanged
    assert plan(step_rounding="floor").inject_steps == list(range(5))  # s < int(0.2 * 28): the released code
    assert plan(paper="printed").inject_steps == list(range(5))
    assert plan(paper="printed", step_rounding="ceil").inject_steps == list(range(6))  # a given option wins
    assert plan(step_rounding="floor", tau=0.25).inject_steps == list(range(7))
    floor = _plan(probe, SOURCE, TARGET, steps=5, eta=0.5, step_rounding="floor")
    assert floor.blend_steps == [0, 1] and _plan(probe, SOURCE, TARGET, steps=5, eta=0.5).blend_steps == [0, 1, 2]
    assert _plan(probe, SOURCE, TARGET, variant="T2I", steps=10, tau=0.3).inject_steps == [0, 1, 2]


def test_paper_settings_per_family():
    for p in PRESETS.values():
        printed = paper(p)
        assert printed.top_layers == p.top_layers and printed.step_rounding == "floor"
        assert printed.n_prev_steps == "all" and printed.blend_pool == (3 if p.family == "sd3" else 1)
        assert (p.blend_pool, p.n_prev_steps, p.step_rounding) == (1, 1, "ceil")  # the presets' own: unchanged


def test_the_released_code_block_indices_on_sd3_5_medium():
    """Its indices enumerate `transformer.attn_processors`; read them in the installed diffusers' order."""
    from diffusers import SD3Transformer2DModel

    shape = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=24, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                 out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm")
    medium = list(SD3Transformer2DModel(**shape, dual_attention_layers=tuple(range(13))).attn_processors)
    named = [medium[i] for i in PRESETS["sd3.5-medium"].top_layers]
    joint = [int(n.split(".")[1]) for n in named if n.endswith(".attn.processor")]
    assert sorted(joint) == sorted(PRESETS["sd3.5-medium"].run_top_layers) == [4, 5]
    assert all(n.endswith(".attn2.processor") for n in named if not n.endswith(".attn.processor"))
    assert paper(PRESETS["sd3.5-medium"], "run").top_layers == (4, 5)
    plain = list(SD3Transformer2DModel(**shape).attn_processors)  # no attn2: index i is block i (SD3-M, the toy)
    assert plain == [f"transformer_blocks.{i}.attn.processor" for i in range(24)]
    assert all(p.run_top_layers is None for n, p in PRESETS.items() if n != "sd3.5-medium")


def test_max_pool_before_thresholding():
    torch.manual_seed(0)
    maps = torch.rand(3, 64, 5) ** 4  # (block, image token, text)
    grid, theta = (8, 8), 0.5
    mean = smooth(maps[..., [1, 3]].mean(dim=(0, -1)).reshape(grid)).numpy()
    pooled = maximum_filter(mean, size=3, mode="constant", cval=-float("inf"))
    want = torch.from_numpy(pooled / pooled.max() >= theta).float()
    assert torch.equal(blend_mask(maps, [1, 3], grid, theta, 3), want)
    assert torch.equal(blend_mask(maps, [1, 3], grid, theta), (normalise(torch.from_numpy(mean)) >= theta).float())


@pytest.mark.parametrize("n_prev_steps, pool, theta", [(2, 1, 0.97), ("all", 1, 0.97), ("all", 3, 0.99)])
def test_masks_from_the_last_steps(tiny_dirs, n_prev_steps, pool, theta):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    kw = tiny_inputs(probe, "sd3", [SOURCE, TARGET], num_inference_steps=4)
    result = probe.edit(SOURCE, TARGET, seed=0, steps=4, guidance=kw["guidance_scale"], height=128, width=128,
                        max_sequence_length=kw["max_sequence_length"], output_type="latent",
                        eta=1.0, theta=theta, n_prev_steps=n_prev_steps, blend_pool=pool)
    maps = result.maps
    assert result.params["blend_steps"] == [0, 1, 2, 3] and result.params["n_prev_steps"] == n_prev_steps
    words = [result.params["source_words"], result.params["target_words"]]
    for i, step in enumerate(result.params["blend_steps"]):
        first = 0 if n_prev_steps == "all" else max(0, i + 1 - n_prev_steps)
        parts = []
        for row in (0, 1):  # mean over the steps, blocks and word columns, smoothed, pooled, max-normalised
            m = maps.t2i[first:i + 1, :, row][..., maps.columns(words[row], row)].mean(dim=(0, 1, -1))
            m = smooth(m.reshape(maps.grid)).numpy()
            if pool > 1:
                m = maximum_filter(m, size=pool, mode="constant", cval=-float("inf"))
            parts.append(m / m.max() >= theta)
        assert 0 < result.masks[i].sum() < result.masks[i].size  # a mask that tells the cases apart
        assert (result.masks[i] == (parts[0] | parts[1])).all(), step


@pytest.mark.parametrize("bad, message", [
    ({"variant": "t2i"}, "unknown variant 't2i'; choose from qiki, .*I2I, T2I, I2T, T2T"),
    ({"blend_pool": 2}, "blend_pool=2 is not allowed: give an odd side"),
    ({"blend_pool": 0}, "blend_pool"),
    ({"n_prev_steps": 0}, "n_prev_steps"),
    ({"n_prev_steps": "last"}, "n_prev_steps"),
    ({"step_rounding": "round"}, "step_rounding='round' is not allowed: choose one of 'ceil', 'floor'"),
    ({"paper": True}, "paper=True is not allowed: choose one of 'printed', 'run'"),
    ({"local_blend": False, "n_prev_steps": 2}, "n_prev_steps= shapes the local blend's masks, and local_blend=False"),
])
def test_bad_options_are_refused_before_running(bad, message):
    probe = mmdit_probe.load(tiny_pipeline("sd3"))
    with pytest.raises(InvalidInput, match=message):
        probe.edit(SOURCE, TARGET, **bad)


def test_the_cli_runs_a_region_replacement_with_the_papers_settings(tmp_path):
    import json

    from mmdit_probe.cli import main

    main(["edit", "toy", "on the left a large red circle on a white background",
          "on the left a large blue circle on a white background", "--out", str(tmp_path), "--steps", "5",
          "--variant", "T2I", "--paper", "printed"])
    params = json.loads((tmp_path / "params.json").read_text())
    assert (params["variant"], params["paper"], params["step_rounding"]) == ("T2I", "printed", "floor")
    assert params["inject_steps"] == [0] and params["blend_steps"] == [0, 1] and params["blend_pool"] == 3
    assert params["n_prev_steps"] == "all"
    with pytest.raises(SystemExit) as exit_:
        main(["edit", "toy", "a", "b", "--variant", "t2i"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("region", ["T2I", "I2I"])
def test_blend_maps_under_a_region_replacement_are_the_replaced_attention(tiny_dirs, monkeypatch, region):
    # As the released code stores them: the probabilities of the replaced score matrix, here from taps and lse.
    from mmdit_probe.editing import qk_injection

    seen = []

    class Watched(qk_injection.RegionReplacement):
        def __call__(self, q, k, v, streams, stock, mask=None):
            seen.append((self.step, q.clone(), k.clone()))
            return super().__call__(q, k, v, streams, stock, mask)

    monkeypatch.setattr(qk_injection, "RegionReplacement", Watched)
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    kw = tiny_inputs(probe, "sd3", [SOURCE, TARGET])
    result = probe.edit(SOURCE, TARGET, seed=0, steps=2, guidance=kw["guidance_scale"], height=kw["height"],
                        width=kw["width"], max_sequence_length=kw["max_sequence_length"], output_type="latent",
                        variant=region, tau=0.5, eta=1.0, blend_blocks=[0, 1])
    maps = result.maps
    assert result.params["inject_steps"] == [0] and maps.blocks == [0, 1]
    grid = probe.grid(kw["height"], kw["width"])
    n_image = grid[0] * grid[1]
    columns = [n_image + p for p in maps.positions]
    for block, (step, q, k) in enumerate(seen[:2]):  # step 0, blocks 0 and 1 (both injected)
        assert step == 0
        rows, cols = (slice(0, n_image), slice(n_image, None) if region == "T2I" else slice(0, n_image))
        scale = q.shape[-1] ** -0.5
        scores = q[3].double() @ k[3].double().transpose(-1, -2) * scale  # the target's conditional row
        scores[:, rows, cols] = (q[2].double() @ k[2].double().transpose(-1, -2) * scale)[:, rows, cols]
        want = scores.softmax(-1)[:, :n_image][..., columns].mean(0)
        assert (maps.t2i[0, block, 1].double() - want).abs().max() < 1e-6


def test_a_region_replacement_needs_processors_that_attend(monkeypatch):
    # A family whose processor does not run attention through `attend` would ignore the replacement: refused.
    from mmdit_probe.families.sd3 import SD3TapProcessor

    probe = mmdit_probe.load(tiny_pipeline("sd3"))
    monkeypatch.setattr(SD3TapProcessor, "attends", False)
    with pytest.raises(InvalidInput, match=r"variant='I2I' replaces attention scores, but the sd3 processors of "
                                           r"blocks \[0, 1\] do not run attention through TapProcessor.attend"):
        probe.edit(SOURCE, TARGET, variant="I2I")
    probe.edit(SOURCE, TARGET, variant="qiki", steps=1, output_type="latent", height=64, width=64)

"""T2T and I2I maps (with T2I and I2T: every region of joint attention) equal softmax(QK^T / sqrt(d)) computed
independently from the tapped q and k, on every tiny family, every block and head, on a non-square grid."""

from collections import defaultdict

import matplotlib
import pytest
import torch
from conftest import tiny_inputs
from safetensors import safe_open

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.maps import AttentionMaps
from mmdit_probe.validation import InvalidInput
from mmdit_probe.viz import Explorer, i2i_maps, t2t_matrix
from mmdit_probe.viz.render import colourise, outline, overlay, png

matplotlib.use("Agg")

PROMPTS = ["a red cat on a mat", "a blue dog, sitting"]
REGIONS = ("t2i", "i2t", "t2t", "i2i")
WIDE = {"height": 64, "width": 96}  # a 4 x 6 token grid


def record(probe, kind, recorder_options=None, **overrides):
    """One traced generation recording maps, while plain torch hooks keep every q and k of the joint attention."""
    inputs = tiny_inputs(probe, kind, PROMPTS, **overrides)
    seen, handles = defaultdict(list), []
    for block in range(probe.family.num_blocks):
        for name in ("q_img", "k_img", "q_txt", "k_txt"):
            handles.append(probe.module(f"blocks.{block}.attn.hook_{name}").register_forward_hook(
                lambda m, i, out, key=(block, name): seen[key].append(out.detach().clone())))
        if probe.family.masks_attention:  # Chroma: the mask each attention call hands its kernel
            attention = probe.pipeline.transformer.get_submodule(probe.family.attention(block).path)
            handles.append(attention.register_forward_pre_hook(
                lambda m, a, kw, key=(block, "mask"): seen[key].append(kw.get("attention_mask")), with_kwargs=True))
    recorder = AttentionRecorder(probe, inputs, dtype=torch.float32, **(recorder_options or {}))
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record(step)
        output = probe.model.output.save()
    for h in handles:
        h.remove()
    return recorder, recorder.maps(), seen, inputs, output


def explicit(seen, block, step):
    """The four regions of the explicit joint softmax, (batch, heads, query, key), image tokens then text."""
    q_img, k_img, q_txt, k_txt = (seen[(block, n)][step] for n in ("q_img", "k_img", "q_txt", "k_txt"))
    q, k = torch.cat([q_img, q_txt], dim=2), torch.cat([k_img, k_txt], dim=2)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if seen.get((block, "mask")):  # a mask over the joint [text | image] order, applied as the kernel applies it
        mask = seen[(block, "mask")][step]
        order = torch.cat([torch.arange(q_txt.shape[2], q.shape[2]), torch.arange(q_txt.shape[2])])  # to [img | txt]
        mask = mask[:, :, order][..., order]
        logits = logits.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else logits + mask
    p = torch.softmax(logits, dim=-1)
    n = q_img.shape[2]
    return {"t2i": p[:, :, :n, n:], "i2t": p[:, :, n:, :n], "t2t": p[:, :, n:, n:], "i2i": p[:, :, :n, :n]}


def stored(p, kind, positions, queries):
    """A region of the explicit softmax laid out as the maps store it (`constants.REGIONS`)."""
    return {"t2i": lambda: p[..., positions],
            "i2t": lambda: p[:, :, positions].transpose(-1, -2),
            "t2t": lambda: p[:, :, positions][..., positions],
            "i2i": lambda: p[:, :, queries].transpose(-1, -2)}[kind]()


def cfg_rows(kind):
    return "both" if kind.startswith("sd3") else "cond"


def test_every_region_equals_the_explicit_softmax_and_changes_no_image_bit(probe, kind):
    options = dict(kinds=REGIONS, queries="all", heads="all", rows=cfg_rows(kind), positions="all",
                   attn2=kind == "sd3.5")
    _, maps, seen, inputs, output = record(probe, kind, options, **WIDE)
    assert maps.grid == (4, 6) and maps.region_kinds == REGIONS and maps.queries == list(range(24))
    assert maps.blocks == list(range(probe.family.num_blocks))  # Flux single-stream blocks included
    assert (kind == "sd3.5") == bool(maps.attn2_blocks)
    heads = seen[(0, "q_img")][0].shape[1]
    for step in range(inputs["num_inference_steps"]):
        for block in maps.blocks:
            reference = explicit(seen, block, step)
            for region in REGIONS:
                expected = stored(reference[region], region, maps.positions, maps.queries)
                torch.testing.assert_close(getattr(maps, region)[step, block], expected, rtol=0, atol=2e-6)
    # Every query row sums to one over the joint keys: its four regions together (all positions recorded).
    rows = maps.i2i.sum(-2) + maps.t2i.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    rows = maps.t2t.sum(-1) + maps.i2t.sum(-2)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
    assert maps.dims("t2t") == ("step", "block", "row", "head", "text", "text")
    assert maps.dims("i2i") == ("step", "block", "row", "head", "image", "query")
    assert maps.i2i.shape[3] == heads
    assert torch.equal(output.images, probe.pipeline(**inputs).images)


def test_chosen_query_patches_head_mean_and_chunks(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-schnell"])
    _, every, seen, _, _ = record(probe, "flux-schnell", dict(kinds=["i2i", "t2t"], queries="all"), **WIDE)
    forms = {"patch": ((2, 5), [17]), "box": ((slice(1, 3), slice(4, 6)), [10, 11, 16, 17]),
             "list": ([(3, 0), (0, 1), (3, 0)], [1, 18])}
    for form, (queries, raster) in forms.items():
        recorder, maps, _, _, _ = record(probe, "flux-schnell", dict(kinds=["i2i"], queries=queries), **WIDE)
        assert maps.queries == raster, form
        # The same probabilities (a matmul over fewer queries may round the last bit differently).
        torch.testing.assert_close(maps.i2i, every.i2i[..., raster], rtol=0, atol=2e-6)
        assert recorder.estimated_bytes(heads=2) == maps.i2i.nbytes
    assert maps.query_patches == [(0, 1), (3, 0)]
    # The mean over heads and the rows; a patch's map on the grid; T2T as a matrix over the recorded positions.
    reference = explicit(seen, 3, 1)
    expected = reference["i2i"][0].mean(0)[17].reshape(4, 6)
    torch.testing.assert_close(every.patch((2, 5), blocks=[3], steps=[1]), expected, rtol=0, atol=2e-6)
    both = reference["i2i"][0].mean(0)[[17, 1]].mean(0).reshape(4, 6)
    torch.testing.assert_close(every.patch([(2, 5), (0, 1)], blocks=[3], steps=[1]), both, rtol=0, atol=2e-6)
    expected = reference["t2t"][0].mean(0)[every.positions][:, every.positions]
    torch.testing.assert_close(every.text_matrix(blocks=[3], steps=[1]), expected, rtol=0, atol=2e-6)
    assert every.position_labels()[:2] == [t.piece for t in every.tables[0].tokens[:2]]
    # Queries computed in chunks (a small logits budget) give the same maps.
    chunked = AttentionRecorder.CHUNK_BYTES
    try:
        AttentionRecorder.CHUNK_BYTES = 1  # one query per chunk
        _, small, _, _, _ = record(probe, "flux-schnell", dict(kinds=["i2i", "t2t"], queries="all"), **WIDE)
    finally:
        AttentionRecorder.CHUNK_BYTES = chunked
    torch.testing.assert_close(small.i2i, every.i2i, rtol=0, atol=2e-6)
    torch.testing.assert_close(small.t2t, every.t2t, rtol=0, atol=2e-6)


def test_public_api_save_load_and_memory_estimate(tiny_dirs, tmp_path):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    plain = probe.generate(PROMPTS[0], steps=2, output_type="latent", max_sequence_length=16, **WIDE)
    record_options = {"kinds": ["t2i", "t2t", "i2i"], "queries": (slice(0, 2), slice(0, 2)), "heads": "all",
                      "rows": "both", "dtype": torch.float32}
    out = probe.generate(PROMPTS[0], steps=2, output_type="latent", max_sequence_length=16, record=record_options,
                         **WIDE)
    assert torch.equal(out.images, plain.images)
    maps = out.maps
    assert maps.region_kinds == ("t2i", "t2t", "i2i") and maps.kinds == ("t2i",) and maps.i2t is None
    heads = maps.i2i.shape[3]
    recorder = AttentionRecorder(probe, out.inputs, **record_options)
    assert recorder.estimated_bytes(heads) == sum(m.nbytes for m in maps.tensors.values())
    loaded = AttentionMaps.load(maps.save(tmp_path / "maps.safetensors"))
    assert loaded.queries == maps.queries == [0, 1, 6, 7]
    for region in ("t2i", "t2t", "i2i"):
        assert torch.equal(getattr(loaded, region), getattr(maps, region)), region
        assert loaded.dims(region) == maps.dims(region)
    assert torch.equal(loaded.patch((1, 1), half="uncond", head=1), maps.patch((1, 1), half="uncond", head=1))
    # Maps without I2I keep the file as it was: no "queries" entry in the metadata.
    default = probe.generate(PROMPTS[0], steps=2, output_type="latent", max_sequence_length=16, record=True,
                             **WIDE).maps
    assert AttentionMaps.load(default.save(tmp_path / "plain.safetensors")).queries == []
    with safe_open(str(tmp_path / "plain.safetensors"), "pt") as f:
        assert "queries" not in f.metadata()["mmdit_probe"]


def test_bad_requests_are_refused(tiny_dirs, tmp_path):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    inputs = tiny_inputs(probe, "flux-dev", PROMPTS, **WIDE)
    blocks, heads = probe.family.num_blocks, probe.pipeline.transformer.config.num_attention_heads
    refused = {
        "I2I maps need their query patches": dict(kinds=["i2i"]),
        "pass kinds with 'i2i' and queries": dict(queries=(0, 0)),
        r"kinds must be a non-empty subset of \('t2i', 'i2t', 't2t', 'i2i'\)": dict(kinds=["i2x"]),
        r"query patch \(4, 0\) is outside the 4 x 6 token grid": dict(kinds=["i2i"], queries=[(4, 0)]),
        r"queries box rows slice\(2, 2, None\)": dict(kinds=["i2i"], queries=(slice(2, 2), slice(0, 6))),
        r"queries box cols slice\(0, 7, None\)": dict(kinds=["i2i"], queries=(slice(0, 1), slice(0, 7))),
        "queries must be 'all', a patch": dict(kinds=["i2i"], queries=[]),
        "got the patch True": dict(kinds=["i2i"], queries=[True, (1, 2, 3)]),
        # 2 steps x blocks x 2 prompts x heads x 24 x 24 float16 values
        rf"queries='all' maps every image query's attention on every image key: 24 x 24 values per step, block, "
        rf"row and head, about {2 * blocks * 2 * heads * 24 * 24 * 2 / 2**30:.3g} GB for 2 step\(s\) and "
        rf"{blocks} block\(s\) \(limit max_gb=1e-08\)": dict(kinds=["i2i"], queries="all", heads="all", max_gb=1e-8),
    }
    for message, options in refused.items():
        with pytest.raises(InvalidInput, match=message):
            AttentionRecorder(probe, inputs, **options)
    with pytest.raises(MemoryError, match="fewer I2I queries"):  # chosen patches: the general limit
        AttentionRecorder(probe, inputs, kinds=["i2i"], queries=[(0, 0)], max_gb=1e-8)
    _, maps, _, _, _ = record(probe, "flux-dev", dict(kinds=["t2i", "i2i"], queries=[(1, 1)]), **WIDE)
    with pytest.raises(ValueError, match=r"i2i maps are indexed by query patch: read maps.patch"):
        maps.word("cat", kind="i2i")
    with pytest.raises(KeyError, match=r"patch \(0, 0\) was not recorded as an I2I query; recorded patches: "
                                       r"\[\(1, 1\)\]"):
        maps.patch((0, 0))
    with pytest.raises(ValueError, match=r"no 't2t' maps here.*record with kinds=\[..., 't2t'\]"):
        maps.text_matrix()
    # A file whose I2I maps lost their query patches is refused on loading.
    damaged = AttentionMaps.from_tensors({"t2i": maps.t2i, "i2i": maps.i2i}, steps=maps.steps, blocks=maps.blocks,
                                         positions=maps.positions, tables=maps.tables, grid=maps.grid)
    with pytest.raises(InvalidInput, match="I2I maps and its metadata's query patches"):
        AttentionMaps.load(damaged.save(tmp_path / "damaged.safetensors"))


def test_figures_and_the_explorer_show_a_clicked_patch(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-schnell"])
    out = probe.generate(PROMPTS[0], steps=2, record={"kinds": ["t2i", "i2t", "t2t", "i2i"], "queries": "all",
                                                      "dtype": torch.float32}, **WIDE)
    maps = out.maps
    fig = i2i_maps(maps, [(0, 0), (3, 5)], blocks=[2])
    assert [ax.get_title() for ax in fig.axes] == ["I2I of patch (0, 0)", "I2I of patch (3, 5)"]
    fig = t2t_matrix(maps, blocks=[2])
    real = maps.tables[0].real_positions
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [maps.position_labels()[maps.positions.index(p)]
                                                                   for p in real]
    explorer = Explorer(maps)
    assert explorer.kind.options == ("T2I", "I2T", "I2I") and len(explorer.buttons) == 24
    explorer.top.value = False
    explorer.block.value = 2
    explorer.buttons[(3, 5)].click()  # what a click on the patch does
    assert explorer.kind.value == "I2I" and explorer.query == (3, 5)
    assert explorer.buttons[(3, 5)].button_style == "info" and explorer.buttons[(0, 0)].button_style == ""
    assert "patch (3, 5)" in explorer.caption.value and "block 2" in explorer.caption.value
    expected = outline(overlay(maps.images[0], maps.patch((3, 5), blocks=[2]), 0.6), (3, 5), maps.grid)
    assert explorer.image.value == png(expected, scale=max(1, 256 // expected.shape[0]))
    explorer.buttons[(0, 0)].click()
    assert explorer.query == (0, 0) and explorer.image.value != png(expected, scale=max(1, 256 // expected.shape[0]))
    # Only recorded patches can be picked; the outline marks the query's cell.
    few = probe.generate(PROMPTS[0], steps=2, record={"kinds": ["i2i"], "queries": [(1, 2)]}, **WIDE).maps
    assert list(Explorer(few).buttons) == [(1, 2)]
    marked = outline(colourise(torch.zeros(4, 6)), (1, 2), (4, 6))
    assert (marked[1, 2] == (0, 1, 1)).all() and (marked[0, 0] != (0, 1, 1)).any()

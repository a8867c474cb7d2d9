"""The editor on every tiny family: exact limits of q/k injection and local blending."""

import pytest
import torch
from conftest import tiny_inputs

from mmdit_probe.editing import VARIANTS, edited_words
from mmdit_probe.patching import blend_rows, replace_rows, set_rows, zero_rows

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"


def edit(probe, kind, source=SOURCE, target=TARGET, **options):
    kw = tiny_inputs(probe, kind, [source, target])
    generation = {"steps": kw["num_inference_steps"], "guidance": kw["guidance_scale"], "height": kw["height"],
                  "width": kw["width"], "max_sequence_length": kw["max_sequence_length"], "output_type": "latent"}
    return probe.edit(source, target, seed=0, **generation, **options), kw


def test_no_injection_and_no_blending_is_the_plain_generation(probe, kind):
    result, inputs = edit(probe, kind, tau=0.0, local_blend=False)
    plain = probe.pipeline(**inputs).images
    assert torch.equal(result.source_image, plain[0]) and torch.equal(result.edited_image, plain[1])
    assert result.masks == [] and result.params["inject_steps"] == []


def test_blending_for_no_steps_is_no_blending(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    result, inputs = edit(probe, "sd3", tau=0.0, eta=0.0)
    plain = probe.pipeline(**inputs).images
    assert torch.equal(result.edited_image, plain[1])
    assert result.masks == [] and result.maps is None and result.params["blend_steps"] == []


def test_the_source_is_untouched_and_the_target_edited(probe, kind):
    result, inputs = edit(probe, kind, tau=1.0, eta=1.0, theta=0.3)
    plain = probe.pipeline(**inputs).images
    assert torch.equal(result.source_image, plain[0])
    assert not torch.equal(result.edited_image, plain[1])
    assert len(result.masks) == inputs["num_inference_steps"]
    assert result.masks[0].shape == probe.grid(inputs["height"], inputs["width"])
    assert result.params["source_words"] == ["red", "cat"] and result.params["target_words"] == ["blue", "dog"]


def test_same_prompt_with_injection_everywhere_reproduces_the_source(probe, kind):
    result, _ = edit(probe, kind, source=SOURCE, target=SOURCE, tau=1.0, variant="qk")
    assert torch.equal(result.edited_image, result.source_image)


def test_an_all_zero_blend_mask_gives_the_source(probe, kind, monkeypatch):
    # theta > 1 (no map value reaches it) is refused now; an all-zero mask comes from the mask function.
    from mmdit_probe.editing import qk_injection

    monkeypatch.setattr(qk_injection, "blend_mask", lambda maps, columns, grid, theta, pool=1: torch.zeros(grid))
    result, _ = edit(probe, kind, tau=0.0, eta=1.0, theta=1.0)
    assert result.masks and all(m.sum() == 0 for m in result.masks)
    assert torch.equal(result.edited_image, result.source_image)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_runs(tiny_dirs, variant):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    result, inputs = edit(probe, "sd3", variant=variant, tau=1.0, local_blend=False)
    plain = probe.pipeline(**inputs).images
    assert torch.equal(result.source_image, plain[0])
    assert torch.equal(result.edited_image, plain[1]) == (variant == "none")


def test_bad_variant_and_edited_words():
    assert edited_words("a red cat, sitting", "a blue cat sitting") == (["red"], ["blue"])
    assert edited_words("a cat", "a cat on a mat") == ([], ["on", "a", "mat"])
    import mmdit_probe
    from mmdit_probe.testing import tiny_pipeline

    probe = mmdit_probe.load(tiny_pipeline("sd3"))
    with pytest.raises(ValueError, match="unknown variant 'qv'; choose from qiki, qk"):
        probe.edit(SOURCE, TARGET, variant="qv")
    with pytest.raises(IndexError, match="block index 9 out of range: sd3 has blocks 0..1"):
        probe.edit(SOURCE, TARGET, inject_blocks=[9])


def test_row_primitives():
    x = torch.arange(4 * 2 * 5 * 3.0).view(4, 2, 5, 3)
    y = replace_rows(x, [2], [3], positions=[1, 4])
    assert torch.equal(y[3][:, [1, 4]], x[2][:, [1, 4]]) and torch.equal(y[3][:, [0, 2, 3]], x[3][:, [0, 2, 3]])
    assert torch.equal(y[:3], x[:3])
    assert torch.allclose(blend_rows(x, [0], [1], 0.25)[1], 0.75 * x[1] + 0.25 * x[0])
    z = zero_rows(x, [0, 1], positions=[0])
    assert z[:2, :, 0].abs().sum() == 0 and torch.equal(z[:, :, 1:], x[:, :, 1:])
    assert (set_rows(x, torch.ones(3), [1], positions=[2])[1, :, 2] == 1).all()


def test_every_region_replacement_edits_the_target_only(probe, kind):
    from mmdit_probe.constants import REPLACEMENTS

    plain = None
    for region in REPLACEMENTS:
        result, inputs = edit(probe, kind, variant=region, tau=1.0, local_blend=False)
        plain = probe.pipeline(**inputs).images if plain is None else plain
        assert torch.equal(result.source_image, plain[0])
        assert not torch.equal(result.edited_image, plain[1])
        assert result.params["variant"] == region and result.params["inject_steps"] == [0, 1]


def test_qikt_is_the_released_codes_and_qikikt_the_former_qikt(tiny_dirs):
    # The released code's qikt replaces q_img and k_txt; the three-tap one, this package's former qikt, is qikikt.
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    runs = {v: edit(probe, "sd3", variant=v, tau=1.0, local_blend=False)[0].edited_image
            for v in ("qikt", "qikikt", "qiki")}
    assert VARIANTS["qikt"] == ("q_img", "k_txt") and VARIANTS["qikikt"] == ("q_img", "k_img", "k_txt")
    assert not torch.equal(runs["qikt"], runs["qikikt"]) and not torch.equal(runs["qikikt"], runs["qiki"])

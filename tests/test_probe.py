"""Loading, presets, token tables, inputs and the errors a user meets."""

import json

import pytest
import torch
from conftest import tiny_inputs

import mmdit_probe
from mmdit_probe.presets import FAMILY_DEFAULTS, find_preset, preset
from mmdit_probe.testing import tiny_pipeline


def test_load_accepts_a_built_pipeline_and_a_directory(tiny_dirs):
    from_object = mmdit_probe.load(tiny_pipeline("sd3"))
    from_dir = mmdit_probe.load(tiny_dirs["sd3"])
    assert from_object.family.name == from_dir.family.name == "sd3"
    assert from_dir.preset == FAMILY_DEFAULTS["sd3"]
    assert from_dir.model.pipeline is from_dir.pipeline


def test_info_describes_layout(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    text = probe.info()
    assert "[text | image]" in text and "blocks        4" in text and "t5 0..511" in text


def test_presets_hold_the_paper_defaults():
    assert preset("sd3-medium").top_layers == (7, 8, 5, 4, 9)
    assert preset("stabilityai/stable-diffusion-3.5-large").theta == 0.5
    assert preset("flux.1-schnell").tau == 0.25
    assert find_preset("some/finetune", "flux") == FAMILY_DEFAULTS["flux"]
    # A local copy of a known checkpoint is recognised by its transformer's shape.
    flux = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24}
    assert find_preset("/models/x", "flux", {**flux, "guidance_embeds": True}).name == "flux.1-dev"
    assert find_preset("/models/x", "flux", {**flux, "guidance_embeds": False}).name == "flux.1-schnell"
    large = {"num_layers": 38, "num_attention_heads": 38}
    assert find_preset("/models/sd35-large-turbo", "sd3", large).name == "sd3.5-large-turbo"
    medium = {"num_layers": 24, "num_attention_heads": 24, "dual_attention_layers": list(range(13))}
    assert find_preset("/models/x", "sd3", medium).name == "sd3.5-medium"
    toy_run = {"num_layers": 6, "num_attention_heads": 6, "sample_size": 32}
    assert find_preset("runs/toy/export", "sd3", toy_run).name == "toy"
    with pytest.raises(KeyError, match="unknown preset 'sd4'; known presets: sd3-medium"):
        preset("sd4")


def test_unsupported_pipelines_are_refused_with_the_supported_list(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(TypeError, match="unsupported pipeline class 'StableDiffusionPipeline'.*FluxPipeline"):
        mmdit_probe.load(str(tmp_path))


def test_missing_checkpoint_says_how_to_load_locally():
    with pytest.raises(OSError, match=r"mmdit_probe.load\('DIR'\)"):
        mmdit_probe.load("nobody/no-such-model")


def test_remote_code_is_refused(tiny_dirs):
    with pytest.raises(ValueError, match="never loads remote code"):
        mmdit_probe.load(tiny_dirs["sd3"], trust_remote_code=True)


def test_clip_positions_skip_bos_and_t5_follows_clip(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    table = probe.tokens("a photo of a pig, sitting.", max_sequence_length=16)
    clip = [t for t in table.tokens if t.encoder == "clip"]
    t5 = [t for t in table.tokens if t.encoder == "t5"]
    assert clip[0].word is None and clip[1].word == "a"  # BOS first
    assert clip[5].word == "pig" and clip[6].word is None  # the comma is its own token, no word
    assert t5[0].position == 77 and t5[0].word == "a"
    assert table.positions("pig") == [5] + [t.position for t in t5 if t.word == "pig"]
    assert table.positions("Pig.") == table.positions("pig,") == table.positions("pig")
    assert table.positions("pig", encoders=("t5",)) == [t.position for t in t5 if t.word == "pig"]
    assert table.positions(4) == table.positions("pig")  # by word index


def test_flux_text_is_t5_only(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["flux-schnell"])
    table = probe.tokens("a red cat", max_sequence_length=16)
    assert {t.encoder for t in table.tokens} == {"t5"}
    assert table.text_length == 16
    assert table.positions("cat") == [2]


def test_a_word_not_in_the_prompt_is_an_error(tiny_dirs):
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    table = probe.tokens("a red cat", max_sequence_length=16)
    with pytest.raises(KeyError, match="word 'dog' is not in the prompt 'a red cat'; its words are: a, red, cat"):
        table.positions("dog")
    with pytest.raises(IndexError, match="word index 3 out of range"):
        table.positions(3)


def test_inputs_share_one_initial_noise(probe, kind):
    inputs = tiny_inputs(probe, kind, ["a cat", "a dog", "a pig"])
    latents = inputs["latents"]
    assert torch.equal(latents[0], latents[1]) and torch.equal(latents[0], latents[2])
    # The noise is what the pipeline itself draws for the seed.
    alone = probe.pipeline(**{**inputs, "prompt": ["a cat"], "latents": None,
                              "generator": torch.Generator("cpu").manual_seed(0)}).images
    torch.testing.assert_close(probe.pipeline(**inputs).images[0], alone[0], rtol=0, atol=1e-5)


def test_grid_matches_latent_size(probe, kind):
    inputs = tiny_inputs(probe, kind, "a cat")
    rows, cols = probe.grid(inputs["height"], inputs["width"])
    with probe.model.generate(**inputs):
        q = probe.hook("blocks.0.attn.hook_q_img").output.save()
    assert q.shape[2] == rows * cols


@pytest.mark.parametrize("family_kind", ["sd3", "flux-dev"])
def test_a_directory_saved_in_half_precision_loads_in_one_dtype(tiny_dirs, tmp_path, family_kind):
    # diffusers loads its models in float32 but transformers keeps the saved float16 of the text
    # encoders; mixed, the pipeline fails. Without `dtype=`, every component is float32.
    half = tmp_path / "half"
    mmdit_probe.load(tiny_dirs[family_kind]).pipeline.to(torch.float16).save_pretrained(half)
    probe = mmdit_probe.load(half)
    dtypes = {p.dtype for name in ("transformer", "vae", "text_encoder")
              for p in getattr(probe.pipeline, name).parameters()}
    assert dtypes == {torch.float32}
    latents = probe.pipeline(**tiny_inputs(probe, family_kind, "a red cat")).images
    assert torch.isfinite(latents).all()
    assert mmdit_probe.load(half, dtype=torch.float16).pipeline.transformer.dtype == torch.float16


def test_top_layers_override_the_preset(tiny_dirs, tmp_path):
    probe = mmdit_probe.load(tiny_dirs["sd3"], top_layers=[1, 0])
    assert probe.preset.top_layers == (1, 0)
    (tmp_path / "top_layers.json").write_text(json.dumps({"model": "x", "top_layers": [1]}))
    assert mmdit_probe.load(tiny_dirs["sd3"], top_layers=tmp_path / "top_layers.json").preset.top_layers == (1,)
    with pytest.raises(IndexError, match="out of range"):
        mmdit_probe.load(tiny_dirs["sd3"], top_layers=[7])
    with pytest.raises(FileNotFoundError, match="top_layers.json"):
        mmdit_probe.load(tiny_dirs["sd3"], top_layers="nowhere.json")


@pytest.mark.parametrize("text, says", [("{", "is not valid JSON"), ('{"model": "x"}', 'holds no "top_layers" list'),
                                        ("[1]", 'holds no "top_layers" list')])
def test_a_top_layers_file_that_is_no_sweep_report_is_bad_input(tiny_dirs, tmp_path, text, says):
    path = tmp_path / "top_layers.json"
    path.write_text(text)
    with pytest.raises(mmdit_probe.validation.InvalidInput, match=says):
        mmdit_probe.load(tiny_dirs["sd3"], top_layers=path)

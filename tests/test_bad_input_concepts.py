"""Bad concept input (issue 25): refused with `InvalidInput` (or warned about) before the model runs, never a silent
wrong concept map. Concepts enter by recording options (`concepts=`, `record={"concepts": ...}`), real-image maps,
the segmentation harness, map selections (`maps.concept`) and map files (`AttentionMaps.load`)."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_inputs
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import mmdit_probe
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.maps import AttentionMaps
from mmdit_probe.validation import InvalidInput

PROMPT = "on the left a red circle"


@pytest.fixture(scope="module")
def toy():
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    return probe


@pytest.fixture
def sd3(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["sd3"])


def _recorder(probe, concepts, prompts=(PROMPT,), kind="sd3"):
    """Build (and at once close) a recorder with concepts: the checks run before any generation."""
    inputs = tiny_inputs(probe, kind, list(prompts)) if kind else probe.inputs(list(prompts), steps=2)
    recorder = AttentionRecorder(probe, inputs, concepts=concepts)
    recorder.close()


def _no_concept_state(probe) -> bool:
    return all(probe.pipeline.transformer.get_submodule(a.path).processor.concepts is None
               for a in probe.family.attentions)


def _generate(probe, prompt=PROMPT, **options):
    inputs = tiny_inputs(probe, "sd3", [prompt])
    inputs.pop("prompt")
    steps, guidance = inputs.pop("num_inference_steps"), inputs.pop("guidance_scale")
    return probe.generate(prompt, steps=steps, guidance=guidance, height=inputs.pop("height"),
                          width=inputs.pop("width"), **inputs, **options)


# -- fewer than two concepts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("concepts, prompts, message", [
    (["circle"], [PROMPT], r"concepts=\['circle'\] gives one concept: .*give at least two concepts .*'background'"),
    ([["circle", "background"], ["square"]], [PROMPT, PROMPT], r"concepts\[1\]=\['square'\] gives one concept"),
])
def test_fewer_than_two_concepts_are_refused_at_recording(sd3, concepts, prompts, message):
    # A softmax over one concept is 1.0 at every image token: a map that says nothing, refused before running.
    with pytest.raises(InvalidInput, match=message):
        _recorder(sd3, concepts, prompts)
    assert _no_concept_state(sd3)
    with pytest.raises(InvalidInput, match="gives one concept"):
        _generate(sd3, prompt=prompts[0], record=True, concepts=["circle"])


def test_one_concept_is_refused_for_real_image_maps_and_segmentation_before_the_transformer_runs(toy, tmp_path):
    from mmdit_probe.image_maps import image_maps
    from mmdit_probe.segmentation import segment_folder
    from mmdit_probe.toy.world import render, sample_scene

    rng = np.random.default_rng(3)
    scene = next(s for s in iter(lambda: sample_scene(rng), None) if len(s.objects) == 1)
    image, (mask,) = render(scene)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "images" / "scene.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "scene.png")
    calls = []
    handle = toy.pipeline.transformer.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(InvalidInput, match="gives one concept"):
            image_maps(toy, Image.fromarray(image), "", [scene.objects[0].shape])
        with pytest.raises(InvalidInput, match="gives one concept"):  # refused before the inversion runs
            image_maps(toy, Image.fromarray(image), "", [scene.objects[0].shape], method="inversion")
        # The harness's target is concepts[0] without labels; its own default concepts (["background"]) alone
        # would score a constant map.
        with pytest.raises(InvalidInput, match=r"gives one concept: .*add 'background'"):
            segment_folder(toy, tmp_path, concepts=["circle"])
        with pytest.raises(InvalidInput, match=r"\['background'\] gives one concept: .*add the concept to find "
                                                    r"beside 'background'"):
            segment_folder(toy, tmp_path, concepts=["background"], labels={"scene": "background"})
    finally:
        handle.remove()
    assert calls == []


# -- empty selections -------------------------------------------------------------------------------------------
def test_empty_concept_selections_are_refused(sd3):
    maps = _generate(sd3, record=True, concepts=["circle", "background"]).maps
    for read in (lambda: maps.concept([]), lambda: maps.concept([], kind="concept_xattn"),
                 lambda: maps.per_block([], kind="concept"), lambda: maps.per_step((), kind="concept"),
                 lambda: maps.concept_columns([])):
        with pytest.raises(InvalidInput, match=r"concepts=\[\] selects no concept: give at least one concept"):
            read()
    with pytest.raises(InvalidInput, match=r"concepts=\[\] selects no concept: give at least two concepts"):
        _recorder(sd3, [])
    with pytest.raises(InvalidInput, match=r"concepts\[0\]=\[\] selects no concept: give at least two concepts"):
        _recorder(sd3, [[], ["circle", "background"]], [PROMPT, PROMPT])
    with pytest.raises(InvalidInput, match="concepts must hold concepts"):
        maps.concept(["circle", 3])


# -- concepts the tokenizer splits or does not know -------------------------------------------------------------
@pytest.mark.parametrize("concept, pieces, used", [
    ("dog", "'d', 'o', 'g</w>'", "'d'"), ("circles", "'circl', 'e', 's</w>'", "'circl'")])
def test_a_concept_the_tokenizer_splits_warns_naming_the_token_used(toy, concept, pieces, used):
    with pytest.warns(UserWarning, match=rf"the clip tokenizer splits the concept '{concept}' into {pieces}: its "
                                         rf"concept token is the first, {used}"):
        _recorder(toy, [concept, "background"], kind=None)
    assert _no_concept_state(toy)


def test_a_t5_split_concept_warns_and_whole_words_do_not(sd3):
    with pytest.warns(UserWarning, match=r"the t5 tokenizer splits the concept 'zzz' into '▁z', 'z', 'z': its concept "
                                         r"token is the first, '▁z'"):
        _recorder(sd3, ["zzz", "background"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _recorder(sd3, ["Circle", "red", "background"])


@pytest.mark.parametrize("family, concept, encoder, token", [
    ("toy", "é", "clip", r"'<\|endoftext\|>'"), ("sd3", "é", "t5", "'▁'")])
def test_a_concept_whose_token_is_no_piece_of_the_word_is_refused(toy, sd3, family, concept, encoder, token):
    probe = toy if family == "toy" else sd3
    with pytest.raises(InvalidInput, match=rf"the {encoder} tokenizer does not know the concept '{concept}': its "
                                           rf"concept token would be {token}, which is no piece of the word"):
        _recorder(probe, ["circle", concept], kind=None if family == "toy" else "sd3")
    assert _no_concept_state(probe)


# -- map files --------------------------------------------------------------------------------------------------
@pytest.fixture
def concept_file(sd3, tmp_path):
    maps = _generate(sd3, record=True, concepts=["circle", "background"]).maps
    path = maps.save(tmp_path / "good.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["mmdit_probe"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return maps, meta, tensors


def test_concept_metadata_that_contradicts_itself_is_refused_on_load(concept_file, tmp_path):
    maps, meta, tensors = concept_file
    assert AttentionMaps.load(tmp_path / "good.safetensors").concepts == [["circle", "background"]]

    def write(name, concepts=None, **changed):
        path = tmp_path / name
        metadata = {**meta, "concepts": meta["concepts"] if concepts is None else concepts}
        save_file({k: v.contiguous() for k, v in {**tensors, **changed}.items() if v is not None}, str(path),
                  metadata={"mmdit_probe": json.dumps(metadata)})
        return path

    negative = tensors["concept"].clone()
    negative[0, 0, 0, 0] = -0.5
    negative[0, 0, 0, 1] = 1.5  # the row still sums to one
    flat = torch.full_like(tensors["concept"], 0.25)
    cases = [
        (write("twice.safetensors", [["circle", "circle"]]), r"twice.safetensors .*names the concept 'circle' "
                                                             r"twice for prompt 0"),
        (write("lists.safetensors", [["circle", "background"], ["square", "background"]]),
         r"lists.safetensors .*2 concept lists for 1 prompt"),
        (write("one.safetensors", [["circle"]], concept=tensors["concept"][..., :1],
               concept_xattn=tensors["concept_xattn"][..., :1]), r"one.safetensors .*prompt 0 has fewer than two "
                                                                        r"concepts"),
        (write("case.safetensors", [["Circle", "background"]]), r"case.safetensors .*'Circle' of prompt 0 is not a "
                                                               r"concept word as recorded"),
        (write("negative.safetensors", concept=negative), r"negative.safetensors .*concept maps must be "
                                                          r"probabilities .*-0.5"),
        (write("flat.safetensors", concept=flat), r"flat.safetensors .*concept maps must be probabilities .*sum"),
        (write("missing.safetensors", concept=None, concept_xattn=None), r"missing.safetensors .*names concepts "
                                                                         r"but holds no concept maps"),
        (write("unnamed.safetensors", []), r"unnamed.safetensors .*holds concept maps .* but its metadata names no "
                                           r"concepts"),
    ]
    for path, match in cases:
        with pytest.raises(InvalidInput, match=match):
            AttentionMaps.load(path)


# -- record= and concepts= ----------------------------------------------------------------------------------------
def test_concepts_given_twice_are_refused_and_record_options_take_effect(sd3):
    with pytest.raises(InvalidInput, match=r"concepts given twice, as concepts= and as record\['concepts'\]"):
        _generate(sd3, record={"concepts": ["circle", "background"]}, concepts=["square", "background"])
    maps = _generate(sd3, record={"concepts": ["circle", "background"]}).maps
    assert maps.concepts == [["circle", "background"]]
    assert _generate(sd3, record={}).maps is not None  # a dict of no options: the default recording
    with pytest.raises(InvalidInput, match="record=True"):
        _generate(sd3, record=False, concepts=["circle", "background"])
    for record in (None, 1, "t2i"):  # neither a switch nor options: never read as "record" or "do not record"
        with pytest.raises(InvalidInput, match="give True, False or a dict"):
            _generate(sd3, record=record)


def test_duplicate_concepts_are_refused_at_recording(sd3):
    with pytest.raises(InvalidInput, match="'Square!' is given twice"):
        _recorder(sd3, [["circle", "background"], ["square", "Square!"]], [PROMPT, PROMPT])


def test_valid_concept_files_still_load(sd3, tmp_path):
    # Per-prompt lists of different lengths (spare slots zero) and both halves of the guidance batch pass the checks.
    inputs = tiny_inputs(sd3, "sd3", [PROMPT, "on the right a blue square"])
    concepts = [["circle", "red", "background"], ["square", "background"]]
    recorder = AttentionRecorder(sd3, inputs, rows="both", concepts=concepts)
    with sd3.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record(step)
    maps = recorder.maps()
    loaded = AttentionMaps.load(maps.save(tmp_path / "both.safetensors"))
    assert loaded.concepts == concepts
    torch.testing.assert_close(loaded.concept("square", prompt=1, half="uncond"),
                               maps.concept("square", prompt=1, half="uncond"))


def test_a_noise_level_is_refused_where_the_inversion_route_would_ignore_it(toy, tmp_path):
    from mmdit_probe.image_maps import image_maps
    from mmdit_probe.segmentation import segment_folder

    image = Image.new("RGB", (32, 32))
    with pytest.raises(InvalidInput, match="method='inversion' .* takes no sigma"):
        image_maps(toy, image, "", ["circle", "background"], method="inversion", sigma=0.5)
    with pytest.raises(InvalidInput, match="method='inversion' .* takes no sigma"):
        segment_folder(toy, tmp_path, concepts=["circle", "background"], method="inversion", sigma=0.5)

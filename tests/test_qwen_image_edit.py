"""Qwen-Image-Edit (`QwenImageEditPipeline`): the input image's tokens as the reference region of a Qwen-Image model.

The tiny pipeline is built here from the real classes: tiny Qwen-Image's transformer, VAE and scheduler, a Qwen2
tokenizer with the vision tokens and the Edit system prompt's words (so the template's prefix is the 64 tokens the
pipeline drops, as with the real tokenizer), a Qwen2.5-VL text encoder whose config knows those ids, and the real
`Qwen2VLProcessor` over the PIL `Qwen2VLImageProcessorPil` (torchvision is not installed). Without torchvision,
transformers 5.25's `ProcessorMixin` cannot check the processor's (absent) video processor class
(`VIDEO_PROCESSOR_MAPPING` is a placeholder), so that one class check is skipped while the processor is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from unittest import mock

import pytest
import torch
from conftest import record_all_calls, stock_kernel_calls
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.models.transformers import transformer_qwenimage
from PIL import Image
from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

import mmdit_probe
from mmdit_probe import testing, validation
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.cli import main
from mmdit_probe.patching import activation_patching
from mmdit_probe.presets import find_preset, preset
from mmdit_probe.testing import _qwen_text_encoder, qwen2_tokenizer

VISION = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# The Edit system prompt's words and punctuation runs beyond tiny Qwen-Image's (pre-tokenized as Qwen2's regex does).
EDIT_WORDS = ("key features input objects then explain how user 's instruction should alter or modify Generate new "
              "that meets requirements while maintaining consistency original where appropriate ( ),").split()
STEPS, SIDE = 2, 64
PROMPTS = ["a red cat", "a small blue dog on a chair"]  # different lengths: padded text, a key mask


def _processor(tokenizer) -> Qwen2VLProcessor:
    # Four merged vision patches (2x2) whatever the image: the vision tower's cost stays tiny.
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class"):
        return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer)


def _build(pipeline_class):
    base = testing.tiny_pipeline("qwen-image")
    tokenizer = qwen2_tokenizer(EDIT_WORDS, VISION)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        text_encoder = _qwen_text_encoder(tokenizer, base.text_encoder.config.text_config.hidden_size)
    return pipeline_class(scheduler=base.scheduler, vae=base.vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          processor=_processor(tokenizer), transformer=base.transformer)


@pytest.fixture(scope="module")
def pipe() -> QwenImageEditPipeline:
    return _build(QwenImageEditPipeline)


@pytest.fixture(scope="module")
def probe(pipe):
    return mmdit_probe.load(pipe)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    generator = torch.Generator().manual_seed(3)
    pixels = (torch.rand(96, 128, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _inputs(probe, image, prompts=PROMPTS, **kwargs):
    # The processor takes one image per prompt (`QwenImageEditFamily.check_one_call_per_step`).
    return probe.inputs(prompts, steps=STEPS, height=SIDE, width=SIDE, image=[image] * len(prompts),
                        max_sequence_length=32,
                        **kwargs)


def test_template_prefix_is_the_dropped_64_tokens(pipe):
    prefix = pipe.prompt_template_encode.partition("<|vision_start|>")[0]
    assert pipe.prompt_template_encode_start_idx == 64
    assert len(pipe.tokenizer(prefix, add_special_tokens=False)["input_ids"]) == 64


def test_family_and_reference_grid(probe, pipe, image):
    family = probe.family
    assert family.name == "qwen_image_edit" and family.has_reference
    height, width = family.resized(image.size)
    assert (height, width) == (896, 1184)  # calculate_dimensions(1024**2, 4/3), multiples of 32
    grid = family.reference_grid({"image": image})
    assert grid == (height // 16, width // 16)
    assert "blocks.0.attn.hook_q_ref" in family.tap_names()
    with pytest.raises(validation.InvalidInput, match="PIL image"):
        family.reference_grid({"image": torch.zeros(1, 3, 8, 8)})


def test_word_table_follows_the_pipelines_text(probe, pipe, image):
    """The table's positions are the rows of the pipeline's own prompt embeddings: the vision tokens first, then the
    prompt's words, then the template's closing tokens; checked against the processor's input ids after the drop."""
    probe.family.check_one_call_per_step({"image": image})
    n_vision = probe.family.vision_tokens()
    height, width = probe.family.resized(image.size)
    prompt_image = pipe.image_processor.resize(image, height, width)
    ids = pipe.processor(text=[pipe.prompt_template_encode.format(PROMPTS[1])], images=prompt_image,
                         return_tensors="pt")["input_ids"][0, pipe.prompt_template_encode_start_idx:]
    table = probe.tokens(PROMPTS[1], max_sequence_length=64)
    assert [t.position for t in table.tokens] == list(range(len(ids)))
    assert pipe.tokenizer.convert_tokens_to_ids([t.piece for t in table.tokens]) == ids.tolist()
    assert ids.tolist().count(pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == n_vision
    assert table.positions("dog") == [n_vision + 2 + 3]  # vision_start, pads, vision_end, "a small blue dog"
    embeds, mask = pipe.encode_prompt(PROMPTS[1], image=prompt_image, device=torch.device("cpu"))
    assert embeds.shape[1] == len(ids) and mask is None


def test_reference_maps_equal_the_masked_softmax_of_the_stock_q_and_k(probe, image, monkeypatch):
    inputs = _inputs(probe, image, output_type="latent")
    calls, plain = stock_kernel_calls(probe, inputs, monkeypatch, transformer_qwenimage)
    assert torch.equal(probe.pipeline(**inputs).images, plain)  # the taps alone change no output bit
    recorder = AttentionRecorder(probe, inputs, dtype=torch.float32, heads="all",
                                 kinds=["t2i", "i2t", "r2i", "i2r", "t2r"])
    maps, output = record_all_calls(probe, inputs, recorder)
    assert torch.equal(output.images, plain)  # nor does recording
    grid = probe.family.reference_grid(inputs)
    n_blocks, n_image, n_ref = probe.family.num_blocks, 16, math.prod(grid)
    n_text = max(len(t.real_positions) for t in recorder.tables)
    assert maps.reference_grid == grid and maps.reference_kinds == ("r2i", "i2r", "t2r")
    assert maps.positions == list(range(n_text))
    assert len(calls) == n_blocks * STEPS and calls[0][0].shape[2] == n_text + n_image + n_ref
    assert calls[0][2] is not None  # the shorter prompt's padding is masked out of the keys
    text, img, ref = slice(0, n_text), slice(n_text, n_text + n_image), slice(n_text + n_image, None)
    for step in range(STEPS):
        for block in range(n_blocks):
            q, k, mask = calls[step * n_blocks + block]
            logits = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
            p = logits.masked_fill(~mask, -torch.inf).softmax(dim=-1)
            expected = {"t2i": p[:, :, img, text], "i2t": p[:, :, text, img].transpose(-1, -2),
                        "r2i": p[:, :, img, ref], "i2r": p[:, :, ref, img].transpose(-1, -2),
                        "t2r": p[:, :, ref, text]}
            for kind, m in expected.items():
                torch.testing.assert_close(maps.tensor(kind)[step, block], m, rtol=0, atol=2e-6)
            del logits, p


def test_self_patching_changes_nothing(probe, image):
    hooks = ["k_img", "q_ref", "k_ref", "v_ref", "q_txt", "out_img", "out_ref"]
    result = activation_patching(probe, PROMPTS[0], PROMPTS[0], hooks, over=("hook",), metric="distance",
                                 num_steps=STEPS, guidance=1.0, progress=False, batch_size=len(hooks), height=SIDE,
                                 width=SIDE, image=[image, image], max_sequence_length=32)
    assert torch.count_nonzero(result.values) == 0
    for cell in result.outputs.flatten(0, 0):
        assert torch.equal(cell, result.clean)


def test_input_images_are_refused_where_the_pipeline_or_the_probe_would_go_wrong(probe, image):
    family = probe.family
    with pytest.raises(validation.InvalidInput, match=r"image=\[image\] \* 2"):
        family.check_one_call_per_step({"prompt": PROMPTS, "image": image})
    other = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    with pytest.raises(validation.InvalidInput, match="images differ"):
        family.check_one_call_per_step({"prompt": PROMPTS, "image": [image, other]})


def test_edit_source_row_is_the_plain_batched_generation(probe, image):
    target = "a small blue dog"
    plain = probe.pipeline(**_inputs(probe, image, [PROMPTS[0], target], output_type="latent")).images
    options = {"steps": STEPS, "guidance": 1.0, "output_type": "latent", "height": SIDE, "width": SIDE,
               "image": [image, image], "max_sequence_length": 32}
    edited = probe.edit(PROMPTS[0], target, tau=1.0, eta=1.0, theta=0.3, **options)
    assert torch.equal(edited.source_image, plain[0]) and not torch.equal(edited.edited_image, plain[1])
    untouched = probe.edit(PROMPTS[0], target, tau=0.0, local_blend=False, **options)
    assert torch.equal(untouched.source_image, plain[0]) and torch.equal(untouched.edited_image, plain[1])


@pytest.fixture(scope="module")
def plus():
    # Its own models: a probe's taps stay on the transformer it loaded.
    return mmdit_probe.load(_build(QwenImageEditPlusPipeline))


def test_plus_word_table_follows_the_pipelines_text_for_each_image(plus, image):
    """Each input image's `Picture i: ` block, its vision tokens counted at the 384x384-area size the text encoder
    sees, then the prompt: the table's pieces are the processor's ids after the 64 dropped."""
    pipe, family = plus.pipeline, plus.family
    second = image.resize((48, 96))
    for images in ([image], [image, second]):
        family.check_one_call_per_step({"prompt": [PROMPTS[1]], "image": images})
        condition = [pipe.image_processor.resize(i, *family.resized(i.size, 384 * 384)) for i in images]
        pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(len(images)))
        ids = pipe.processor(text=[pipe.prompt_template_encode.format(pictures + PROMPTS[1])], images=condition,
                             return_tensors="pt")["input_ids"][0, pipe.prompt_template_encode_start_idx:]
        table = plus.tokens(PROMPTS[1], max_sequence_length=64)
        assert pipe.tokenizer.convert_tokens_to_ids([t.piece for t in table.tokens]) == ids.tolist()
        assert [pipe.tokenizer.convert_ids_to_tokens(int(ids[p])) for p in table.positions("dog")] == ["Ġdog"]
        embeds, _ = pipe.encode_prompt(PROMPTS[1], image=condition, device=torch.device("cpu"))
        assert embeds.shape[1] == len(ids)


def test_plus_reference_maps_equal_the_softmax_of_the_stock_q_and_k(plus, image, monkeypatch):
    inputs = plus.inputs([PROMPTS[1]], steps=STEPS, height=SIDE, width=SIDE, image=image, output_type="latent")
    calls, plain = stock_kernel_calls(plus, inputs, monkeypatch, transformer_qwenimage)
    recorder = AttentionRecorder(plus, inputs, dtype=torch.float32, heads="all", kinds=["t2i", "r2i", "i2r", "t2r"])
    maps, output = record_all_calls(plus, inputs, recorder)
    assert torch.equal(output.images, plain)  # taps and recording change no output bit
    n_blocks, n_text = plus.family.num_blocks, len(recorder.tables[0].real_positions)
    assert maps.reference_grid == (56, 74) and calls[0][2] is None  # one prompt: no padding, no mask
    text, img, ref = slice(0, n_text), slice(n_text, n_text + 16), slice(n_text + 16, None)
    for step in range(STEPS):
        for block in range(n_blocks):
            q, k, _ = calls[step * n_blocks + block]
            p = (q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
            expected = {"t2i": p[:, :, img, text], "r2i": p[:, :, img, ref],
                        "i2r": p[:, :, ref, img].transpose(-1, -2), "t2r": p[:, :, ref, text]}
            for kind, m in expected.items():
                torch.testing.assert_close(maps.tensor(kind)[step, block], m, rtol=0, atol=2e-6)


def test_plus_refuses_batches_and_reference_maps_of_several_images(plus, image):
    """diffusers 0.42.1's `QwenImageEditPlusPipeline.__call__` raises for a batch of more than one (a prompt list or
    prompt embeddings alike), so editing and patching, which run their rows in one call, point to Qwen-Image-Edit."""
    with pytest.raises(ValueError, match="only supports batch_size=1"):  # the pipeline itself, whatever the images
        plus.pipeline(prompt=PROMPTS, image=[image], num_inference_steps=1, height=SIDE, width=SIDE,
                      output_type="latent")
    instead = (r"one prompt at a time .* need Qwen-Image-Edit instead \(QwenImageEditPipeline\): load "
               r"Qwen/Qwen-Image-Edit ")
    with pytest.raises(validation.InvalidInput, match=instead):
        plus.family.check_one_call_per_step({"prompt": PROMPTS, "image": image})
    with pytest.raises(validation.InvalidInput, match="cover one input image"):
        plus.family.reference_grid({"image": [image, image]})
    with pytest.raises(validation.InvalidInput, match=instead):
        plus.edit(PROMPTS[0], "a blue dog", steps=STEPS, guidance=1.0, height=SIDE, width=SIDE, image=image)
    with pytest.raises(validation.InvalidInput, match=instead):
        activation_patching(plus, PROMPTS[0], PROMPTS[1], ["k_img"], over=("hook",), metric="distance",
                            num_steps=STEPS, guidance=1.0, progress=False, height=SIDE, width=SIDE, image=[image])


def test_presets_by_shape_follow_the_pipeline_class(probe, plus):
    """The Edit and Edit-2509 checkpoints share Qwen-Image's transformer: the pipeline's family picks the preset."""
    qwen_image = {"num_layers": 60, "num_attention_heads": 24}
    edit, edit_plus = (find_preset("/models/local-copy", p.family.name, qwen_image) for p in (probe, plus))
    assert (edit.name, edit.steps, edit.family) == ("qwen-image-edit", 50, "qwen_image_edit")
    assert (edit_plus.name, edit_plus.steps, edit_plus.family) == ("qwen-image-edit-2509", 40, "qwen_image_edit_plus")
    assert preset("Qwen/Qwen-Image-Edit-2509") is edit_plus and preset("qwen/qwen-image-edit") is edit
    # Recording refuses a second transformer call per step: the published true_cfg_scale 4.0 is in the notes.
    assert edit.guidance == edit_plus.guidance == 1.0 and "true_cfg_scale 4.0" in edit_plus.notes
    # The tiny models (3 blocks) are no known checkpoint: their family's defaults, those presets' sampling.
    assert (probe.preset.name, probe.preset.steps) == ("qwen_image_edit (family defaults)", 50)
    assert (plus.preset.name, plus.preset.steps) == ("qwen_image_edit_plus (family defaults)", 40)


@pytest.fixture
def small(monkeypatch):
    """The CLI's model, a probe made small: 2 steps, 64 pixels, 32 text tokens (its preset, for this test only)."""
    def shrink(p):
        monkeypatch.setattr(p, "preset", replace(p.preset, steps=STEPS, resolution=SIDE, max_sequence_length=32))
        monkeypatch.setattr("mmdit_probe.cli._load", lambda model: p)
        return p
    return shrink


def _image_file(image, folder) -> str:
    image.save(folder / "input.png")
    return str(folder / "input.png")


def test_cli_maps_and_edit_pass_the_image_as_the_single_image_call_does(probe, pipe, image, small, tmp_path):
    """`mmdit-probe maps ... --image PATH --edit TARGET`: the map is the model card's single-image call
    (image=img); the edit's two prompts take the image once each, resized first as that call resizes it, so the text
    encoder sees the same pixels in both, and the edit's source row is that list's batched generation."""
    small(probe)
    target, out = "a small blue dog", tmp_path / "out"
    main(["maps", "tiny", PROMPTS[0], "--image", _image_file(image, tmp_path), "--edit", target, "--out", str(out)])
    alone = probe.generate(PROMPTS[0], image=image).images[0]
    assert Image.open(out / "image.png").tobytes() == alone.tobytes()
    resized = pipe.image_processor.resize(image, *probe.family.resized(image.size))
    batched = probe.pipeline(**probe.inputs([PROMPTS[0], target], image=[resized, resized])).images
    assert Image.open(out / "edit/source.png").tobytes() == batched[0].tobytes()


def test_image_inputs_of_several_prompts_are_the_single_image_calls_resized_image(probe, pipe):
    """A list's images reach the text encoder at their own size (diffusers 0.42.1): a 12-megapixel photo would be
    thousands of vision tokens. `image_inputs` resizes it first exactly as the single-image call does (its
    `prompt_image`), and the pipeline then sizes the list's image for the VAE as it sizes the single image."""
    photo = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    family = probe.family
    assert family.image_inputs([photo], 1) == {"image": photo}  # one prompt: the model card's call itself
    images = family.image_inputs([photo], 2)["image"]
    height, width = family.resized(photo.size)
    expected = pipe.image_processor.resize(photo, height, width)  # `QwenImageEditPipeline.__call__`'s prompt_image
    assert len(images) == 2 and all(i.size == (width, height) and i.tobytes() == expected.tobytes() for i in images)
    assert family.reference_grid({"image": images}) == family.reference_grid({"image": photo}) == (56, 74)
    assert family.calls_per_step({"prompt": PROMPTS, "image": images}) == 1  # one image per prompt: taken


def test_no_input_image_is_refused_before_any_model_call(probe, plus, small, tmp_path, capsys, monkeypatch):
    """diffusers 0.42.1's Edit pipelines size the call by the input image and fail without one
    (`'NoneType' object has no attribute 'size'`): refused up front, in Python and on the command line."""
    calls = []
    forward = transformer_qwenimage.QwenImageTransformer2DModel.forward
    monkeypatch.setattr(transformer_qwenimage.QwenImageTransformer2DModel, "forward",
                        lambda *a, f=forward, **k: calls.append(1) or f(*a, **k))
    options = {"steps": STEPS, "height": SIDE, "width": SIDE}
    for p in (probe, plus):
        needs = f"{type(p.pipeline).__name__} ({p.family.name}) edits an input image: give"
        for record in (True, False):  # a plain generation too, not only the paths that count calls
            with pytest.raises(validation.InvalidInput, match=re.escape(f"{needs} image=...")):
                p.generate(PROMPTS[0], record=record, **options)
        small(p)
        for argv in (["maps", "tiny", PROMPTS[0], "--edit", "a blue dog"], ["edit", "tiny", PROMPTS[0], "a blue dog"]):
            with pytest.raises(SystemExit) as exit_:
                main([*argv, "--out", str(tmp_path / "out")])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and len(err.splitlines()) == 1 and f"{needs} --image PATH" in err, err
    with pytest.raises(validation.InvalidInput, match="edits an input image"):
        probe.edit(PROMPTS[0], "a blue dog", guidance=1.0, **options)
    assert not calls and not (tmp_path / "out").exists()


def test_cli_refuses_a_second_image_and_points_plus_to_qwen_image_edit(probe, plus, image, small, tmp_path, capsys):
    path = _image_file(image, tmp_path)
    small(probe)
    with pytest.raises(SystemExit) as exit_:
        main(["maps", "tiny", PROMPTS[0], "--image", path, "--image", path, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "QwenImageEditPipeline takes 1 per call (Qwen-Image-Edit-2509, " \
                                       "QwenImageEditPlusPipeline, takes several); give --image once" in err, err
    with pytest.raises(validation.InvalidInput, match=r"2 input images given \(image=\)"):  # the Python API's words
        probe.family.check_input_images([image, image])
    small(plus)
    for argv in (["maps", "tiny", PROMPTS[0], "--edit", "a blue dog"], ["edit", "tiny", PROMPTS[0], "a blue dog"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--image", path, "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "need Qwen-Image-Edit instead" in err, err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_maps_of_plus_take_every_image(plus, image, small, tmp_path):
    small(plus)
    second = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    second.save(tmp_path / "second.png")
    main(["maps", "tiny", PROMPTS[0], "--image", _image_file(image, tmp_path), "--image", str(tmp_path / "second.png"),
          "--out", str(tmp_path / "out")])
    both = plus.generate(PROMPTS[0], image=[image, second]).images[0]
    assert Image.open(tmp_path / "out/image.png").tobytes() == both.tobytes()
    assert both.tobytes() != plus.generate(PROMPTS[0], image=[image]).images[0].tobytes()

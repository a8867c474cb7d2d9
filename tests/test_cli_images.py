"""`mmdit-probe maps/edit --image`: the context / reference images of Flux.1 Kontext and Flux.2 (dev, Klein) reach the
pipeline exactly as the Python API takes them, on the tiny pipelines saved to a folder and named by a preset (steps,
guidance, size and text length of `testing.TINY_GENERATION_KWARGS`). Qwen-Image-Edit's are in test_qwen_image_edit.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from diffusers.utils import load_image
from PIL import Image

import mmdit_probe
from mmdit_probe import cli, presets, testing, validation
from mmdit_probe.cli import main
from mmdit_probe.families import Family

PROMPT, TARGET = "a red cat on a mat", "a blue cat on a mat"
FAMILIES = {"flux-kontext": "flux-kontext", "flux2-klein": "flux2", "flux2-dev": "flux2"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A preset per tiny kind ("tiny-flux-kontext", ...) whose hub id is the saved pipeline's folder."""
    root = tmp_path_factory.mktemp("models")
    added = {}
    for kind, family in FAMILIES.items():
        options = testing.TINY_GENERATION_KWARGS[kind]
        path = testing.save_tiny_pipeline(kind, root / kind)
        added[kind] = presets.Preset(f"tiny-{kind}", family, str(path), options["num_inference_steps"],
                                     options["guidance_scale"], options["height"], options["max_sequence_length"],
                                     (0, 1))
        presets.PRESETS[added[kind].name] = added[kind]
    yield {kind: p.name for kind, p in added.items()}
    for p in added.values():
        presets.PRESETS.pop(p.name)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Reference images as files (an RGBA one: the CLI reads it as RGB, as the model cards' examples do)."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = [root / "one.png", root / "two.png", root / "small.png"]
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(paths[0])
    Image.fromarray((rng.random((64, 96, 4)) * 255).astype(np.uint8)).save(paths[1])
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(paths[2])  # under Flux.2's 64 pixels
    return [str(p) for p in paths]


def _rgb(path: str) -> Image.Image:
    return Image.open(path).convert("RGB")


def _bytes(path) -> bytes:
    return Image.open(path).tobytes()


@pytest.mark.parametrize("kind, count", [("flux-kontext", 1), ("flux2-dev", 1), ("flux2-klein", 2)])
def test_maps_with_images_is_the_python_apis_generation_with_them(models, pictures, tmp_path, kind, count, capsys):
    images = pictures[:count]
    out = tmp_path / "out"
    main(["maps", models[kind], PROMPT, "--out", str(out), "--edit", TARGET,
          *[a for path in images for a in ("--image", path)]])
    assert "wrote" in capsys.readouterr().out
    probe = mmdit_probe.load(models[kind])
    given = [_rgb(p) for p in images]
    image = given[0] if count == 1 else given
    reference = probe.generate(PROMPT, image=image).images[0]
    plain = probe.generate(PROMPT).images[0]
    assert _bytes(out / "image.png") == reference.tobytes() != plain.tobytes()  # the image reached the pipeline
    # The edit's source row is the plain batched generation of [source, target] with the same images (a batch of
    # two may round differently from one prompt alone on CPU).
    batched = probe.pipeline(**probe.inputs([PROMPT, TARGET], image=image)).images[0]
    assert _bytes(out / "edit/source.png") == batched.tobytes()
    assert (out / "maps.safetensors").is_file() and (out / "edit/edited.png").is_file()
    assert json.loads((out / "edit/params.json").read_text())["images"] == images


def test_maps_without_edit_builds_the_inputs_of_one_prompt_only(models, pictures, tmp_path, monkeypatch):
    rows = []
    image_inputs = Family.image_inputs
    monkeypatch.setattr(Family, "image_inputs", lambda self, images, n: rows.append(n) or image_inputs(self, images, n))
    main(["maps", models["flux-kontext"], PROMPT, "--image", pictures[0], "--out", str(tmp_path / "out")])
    assert rows == [1] and (tmp_path / "out/image.png").is_file()


def test_image_files_are_read_as_diffusers_load_image_reads_them(tmp_path):
    """EXIF orientation applied, then RGB: an image saved sideways with orientation 6 (rotate 90 degrees clockwise)
    is read upright, as `diffusers.utils.load_image` (the model cards' examples) reads it."""
    pixels = (np.random.default_rng(1).random((40, 64, 4)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(pixels).save(tmp_path / "sideways.png", exif=exif)
    read = cli._read_images([str(tmp_path / "sideways.png")])[0]
    card = load_image(str(tmp_path / "sideways.png"))
    assert read.mode == "RGB" and read.size == card.size == (40, 64) and read.tobytes() == card.tobytes()


def test_edit_with_two_reference_images(models, pictures, tmp_path):
    out = tmp_path / "edit"
    main(["edit", models["flux2-klein"], PROMPT, TARGET, "--image", pictures[0], "--image", pictures[1], "--out",
          str(out), "--tau", "1", "--no-blend"])
    probe = mmdit_probe.load(models["flux2-klein"])
    plain = probe.pipeline(**probe.inputs([PROMPT, TARGET], image=[_rgb(p) for p in pictures[:2]])).images
    assert _bytes(out / "source.png") == plain[0].tobytes()
    assert _bytes(out / "edited.png") != plain[1].tobytes()  # tau=1: the target took the source's q/k
    assert json.loads((out / "params.json").read_text())["images"] == pictures[:2]


def test_the_python_api_refuses_the_same_input_images_with_its_own_words(models, pictures):
    family = mmdit_probe.load(models["flux-kontext"]).family
    with pytest.raises(validation.InvalidInput, match=r"2 input images given \(image=\): FluxKontextPipeline takes "
                                                      r"1 per call; give image= once"):
        family.check_input_images([_rgb(pictures[0]), _rgb(pictures[1])])
    family.check_input_images([_rgb(pictures[0])])  # one: taken


@pytest.mark.parametrize("kind, chosen, match", [
    ("flux-kontext", [0, 1], r"2 input images given \(image=\): FluxKontextPipeline takes 1 per call"),
    ("flux2-klein", [2], r"image= number 1: Image too small: 64×48")])
def test_a_python_generation_refuses_them_before_any_model_call(models, pictures, monkeypatch, kind, chosen, match):
    probe = mmdit_probe.load(models[kind])
    monkeypatch.setattr(probe.pipeline.transformer, "forward", lambda *a, **k: pytest.fail("the model ran"))
    images = [_rgb(pictures[i]) for i in chosen]
    with pytest.raises(validation.InvalidInput, match=match):
        probe.generate(PROMPT, image=images if len(images) > 1 else images[0], output_type="latent")


REFUSED = [("flux-kontext", [0, 1], "2 input images given (--image): FluxKontextPipeline takes 1 per call; give "
                                    "--image once"),
           ("flux2-klein", [0, 2], "--image number 2: Image too small: 64×48. Both dimensions must be at least 64px; "
                                   "Flux2KleinPipeline refuses it")]


@pytest.mark.parametrize("command", ["maps", "edit"])
@pytest.mark.parametrize("kind, chosen, match", REFUSED, ids=[row[0] for row in REFUSED])
def test_images_the_pipeline_would_refuse_exit_2_before_any_model_call(models, pictures, tmp_path, capsys,
                                                                       monkeypatch, command, kind, chosen, match):
    calls = []
    for transformer in (FluxTransformer2DModel, Flux2Transformer2DModel):
        forward = transformer.forward
        monkeypatch.setattr(transformer, "forward", lambda *a, f=forward, **k: calls.append(1) or f(*a, **k))
    prompts = [PROMPT] if command == "maps" else [PROMPT, TARGET]
    with pytest.raises(SystemExit) as exit_:
        main([command, models[kind], *prompts, *[a for i in chosen for a in ("--image", pictures[i])], "--out",
              str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"mmdit-probe {command}: error: ") and match in err
    assert not calls and not (tmp_path / "out").exists()


def test_the_klein_kv_pipeline_is_refused_naming_why_and_what_to_load(tmp_path, capsys):
    """`Flux2KleinKVPipeline` runs the reference tokens at step 0 only and reuses their cached keys and values: the
    taps would not see them later. Refused as a built pipeline and as a folder (before any weights load)."""
    from diffusers import Flux2KleinKVPipeline

    klein = testing.tiny_pipeline("flux2-klein")
    kv = Flux2KleinKVPipeline(**klein.components)
    why = r"'Flux2KleinKVPipeline': it runs the reference images' tokens at the first step only .* Flux2KleinPipeline"
    with pytest.raises(TypeError, match=why):
        mmdit_probe.load(kv)
    kv.save_pretrained(tmp_path / "kv")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(tmp_path / "kv")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "caches their keys and values" in err, err
    assert "load the same checkpoint as mmdit_probe.load(Flux2KleinPipeline.from_pretrained(...)) instead" in err

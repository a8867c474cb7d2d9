"""Bad input never gives a silent wrong result: refused before the transformer runs, no state left behind.

Every refusal below is checked to happen before any transformer call (a forward pre-hook counts
them) and to leave no log-sum-exp recording switched on in any processor.
"""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_inputs
from PIL import Image

import mmdit_probe
from mmdit_probe.maps import AttentionMaps
from mmdit_probe.testing import TINY_GENERATION_KWARGS

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"
GEN = {k: v for k, v in TINY_GENERATION_KWARGS["sd3"].items()}
GENERATION = {"steps": GEN["num_inference_steps"], "guidance": GEN["guidance_scale"], "height": GEN["height"],
              "width": GEN["width"], "max_sequence_length": GEN["max_sequence_length"]}


@pytest.fixture(scope="module")
def sd3(tiny_dirs):
    return mmdit_probe.load(tiny_dirs["sd3"])


class Calls:
    """Counts transformer calls; `nothing_ran()` also checks no processor still records log-sum-exps."""

    def __init__(self, probe):
        self.probe, self.count = probe, 0
        self.handle = probe.pipeline.transformer.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.count += 1

    def lse_on(self) -> list[str]:
        return [name for name, p in self.probe.pipeline.transformer.attn_processors.items()
                if getattr(p, "record_lse", False)]

    def nothing_ran(self) -> None:
        assert self.count == 0, f"the transformer ran {self.count} times before the error"
        assert self.lse_on() == [], f"record_lse left on in {self.lse_on()}"


@pytest.fixture
def calls(sd3):
    counter = Calls(sd3)
    yield counter
    counter.handle.remove()
    assert counter.lse_on() == []


def refused(calls, error, match, call, *args, **kwargs):
    with pytest.raises(error, match=match):
        call(*args, **kwargs)
    calls.nothing_ran()


# -- generation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"steps": 0}, r"steps=0 is not allowed: give a whole number >= 1 \(or leave steps out"),
    ({"steps": -3}, "steps=-3 is not allowed"),
    ({"steps": 2.5}, r"steps=2.5 \(float\) is not allowed"),
    ({"steps": True}, r"steps=True \(bool\) is not allowed"),
    ({"height": 0}, "height=0 is not allowed"),
    ({"width": 0}, "width=0 is not allowed"),
    ({"height": 32.0}, r"height=32.0 \(float\) is not allowed"),
    ({"height": 60}, "height=60 is not allowed: image sides must be multiples of 16 pixels .* use 48 or 64"),
    ({"width": 8}, "width=8 is not allowed: .* use 16"),
    ({"guidance": -1.0}, r"guidance=-1.0 is not allowed: give a number >= 0.0"),
    ({"guidance": float("nan")}, "guidance=nan is not allowed"),
    ({"seed": "0"}, "seed='0' .* give a whole number"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"same_noise": "yes"}, "same_noise='yes' is not allowed: give True or False"),
    ({"num_images_per_prompt": 2}, "num_images_per_prompt=2 is not supported: repeat the prompt"),
    ({"num_inference_step": 2}, "unknown keyword 'num_inference_step'; did you mean 'num_inference_steps'"),
    ({"check": True}, "unknown keyword 'check'"),
    ({"num_inference_steps": 3}, r"pass steps= rather than num_inference_steps="),
    ({"guidance_scale": 3.0}, r"pass guidance= rather than guidance_scale="),
    ({"max_sequence_length": 0}, "max_sequence_length=0 is not allowed"),
    ({"max_sequence_length": 1000}, "T5 takes at most 512 tokens"),
    ({"output_type": "png"}, "output_type='png' is not allowed"),
    ({"record": "yes"}, "record='yes' is not allowed"),
    ({"latents": torch.zeros(1, 16, 4, 4)}, r"latents of shape \(1, 16, 4, 4\) do not fit 1 prompt\(s\) at 64x64: give "
                                            r"a tensor of shape \(1, 16, 8, 8\)"),
    ({"latents": torch.full((1, 16, 8, 8), float("nan"))}, "latents hold NaN"),
])
def test_bad_generation_arguments_are_refused_before_running(sd3, calls, bad, match):
    refused(calls, ValueError, match, sd3.generate, SOURCE, **{**GENERATION, "output_type": "latent", **bad})


@pytest.mark.parametrize("prompts", [[], [1], None, b"a cat"])
def test_bad_prompts_are_refused(sd3, calls, prompts):
    refused(calls, ValueError, "prompt", sd3.generate, prompts, **GENERATION)


def test_numpy_integers_are_integers(sd3):
    plain = sd3.inputs(SOURCE, seed=3, **GENERATION)
    numpy = sd3.inputs(SOURCE, seed=np.int64(3), steps=np.int32(GENERATION["steps"]), guidance=np.float64(7.0),
                       height=np.int64(64), width=np.int64(64), max_sequence_length=np.int64(16))
    assert numpy["num_inference_steps"] == plain["num_inference_steps"] and type(numpy["height"]) is int
    assert torch.equal(numpy["latents"], plain["latents"])
    assert type(numpy["max_sequence_length"]) is int


# -- recording ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record, error, match", [
    ({"blocks": []}, ValueError, r"blocks=\[\] selects nothing"),
    ({"blocks": [0, 0]}, ValueError, r"blocks names \[0\] more than once"),
    ({"blocks": [0.0]}, ValueError, "blocks must hold whole numbers"),
    ({"blocks": [7]}, IndexError, "block index 7 out of range"),
    ({"steps": []}, ValueError, r"steps=\[\] selects nothing"),
    ({"steps": [0.5]}, ValueError, r"steps must hold whole numbers .* got 0.5"),
    ({"steps": [1, 1]}, ValueError, "more than once"),
    ({"steps": [2]}, IndexError, "step 2 out of range: this run has steps 0..1"),
    ({"positions": []}, ValueError, r"positions=\[\] selects no word"),
    ({"positions": [""]}, ValueError, "empty word"),
    ({"positions": [None]}, ValueError, "positions must hold words"),
    ({"positions": [500]}, IndexError, "text position 500 out of range"),
    ({"positions": ["zebra"]}, KeyError, "word 'zebra' is in none of the prompts"),
    ({"dtype": torch.int32}, ValueError, "dtype=torch.int32 is not allowed: give a floating-point torch dtype"),
    ({"dtype": "float16"}, ValueError, "dtype='float16' is not allowed"),
    ({"kinds": ["t2i", "t2i"]}, ValueError, "each once"),
    ({"kinds": []}, ValueError, "non-empty subset"),
    ({"kinds": ["t2x"]}, ValueError, "non-empty subset"),
    ({"heads": "max"}, ValueError, "heads='max' is not allowed: choose one of 'mean', 'all'"),
    ({"rows": "cnd"}, ValueError, "rows='cnd' is not allowed"),
    ({"max_gb": -1}, ValueError, "max_gb=-1.0 is not allowed"),
    ({"max_gb": float("nan")}, ValueError, "max_gb=nan"),
    ({"attn2": 1}, ValueError, "attn2=1 is not allowed: give True or False"),
])
def test_bad_recorder_options_are_refused_before_running(sd3, calls, record, error, match):
    refused(calls, error, match, sd3.generate, SOURCE, record=record, output_type="latent", **GENERATION)


def test_uncond_rows_without_guidance_are_refused_before_running(sd3, calls):
    refused(calls, ValueError, "needs classifier-free guidance", sd3.generate, SOURCE, record={"rows": "uncond"},
            output_type="latent", **{**GENERATION, "guidance": 1.0})


def test_recorder_options_accept_numpy_integers_and_one_kind(sd3):
    plain = sd3.generate(SOURCE, record={"blocks": [1], "steps": [0], "kinds": ["t2i"], "positions": [5]},
                         output_type="latent", **GENERATION).maps
    numpy = sd3.generate(SOURCE, record={"blocks": np.array([1]), "steps": [np.int64(0)], "kinds": "t2i",
                                         "positions": [np.int64(5)]}, output_type="latent", **GENERATION).maps
    assert numpy.blocks == [1] and numpy.steps == [0] and numpy.positions == [5] and numpy.kinds == ("t2i",)
    assert torch.equal(plain.t2i, numpy.t2i)


# -- map selection -----------------------------------------------------------------------------------------------
LONG = " ".join(["red"] * 80 + ["zebra"])  # past CLIP's 77 tokens and T5's 16


@pytest.fixture(scope="module")
def maps(sd3):
    return sd3.generate([SOURCE, LONG], record=True, output_type="latent", **GENERATION).maps


@pytest.mark.parametrize("call, error, match", [
    (lambda m: m.word([]), ValueError, r"words=\[\] selects no word"),
    (lambda m: m.word("cat", blocks=[]), ValueError, r"blocks=\[\] selects nothing"),
    (lambda m: m.word("cat", blocks=[1, 1]), ValueError, "more than once"),
    (lambda m: m.word("cat", steps=[]), ValueError, r"steps=\[\] selects nothing"),
    (lambda m: m.word("cat", steps=slice(5, 9)), ValueError, r"selects no step: the recorded steps are \[0, 1\]"),
    (lambda m: m.word("cat", steps=[0.5]), ValueError, "whole numbers"),
    (lambda m: m.word("cat", half="conditional"), ValueError, "half='conditional' is not allowed"),
    (lambda m: m.word("cat", half="uncond"), ValueError, "only the 'cond' rows were recorded"),
    (lambda m: m.word("cat", prompt=2), IndexError, "prompt index 2 out of range"),
    (lambda m: m.word("cat", prompt=-1), ValueError, "prompt=-1 is not allowed"),
    (lambda m: m.word("cat", head=0), ValueError, "per-head maps were not recorded"),
    (lambda m: m.word("cat", blocks="all"), ValueError, "blocks='all'"),
    (lambda m: m.word(78, prompt=1), ValueError, "cut off by the tokenizers' length"),
    (lambda m: m.word("zebra", prompt=1), KeyError, "'zebra' is in the prompt .* but cut off"),
])
def test_empty_or_bad_selections_are_refused(maps, call, error, match):
    with pytest.raises(error, match=match):
        call(maps)


def test_selections_accept_numpy_integers(maps):
    expected = maps.word("cat", blocks=[1], steps=[0], prompt=0)
    assert torch.equal(maps.word("cat", blocks=np.int64(1), steps=np.array([0]), prompt=np.int64(0)), expected)
    assert torch.equal(maps.word(np.int64(2)), maps.word("cat"))  # word index 2 is "cat"
    assert torch.isfinite(maps.word("red", prompt=1)).all()


def test_a_cut_off_word_is_not_called_absent(sd3):
    table = sd3.tokens(LONG, 16)
    with pytest.raises(KeyError, match="'zebra' is in the prompt .* but cut off: .* shorten the prompt or raise "
                                       "max_sequence_length"):
        table.positions("zebra")
    assert table.positions(80) == []  # by index: no positions (a sweep skips such words)


# -- editing -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    ({"tau": 1.5}, ValueError, r"tau=1.5 is not allowed: give a number in \[0.0, 1.0\] \(the share of the steps"),
    ({"tau": float("nan")}, ValueError, "tau=nan is not allowed"),
    ({"tau": -0.1}, ValueError, "tau=-0.1"),
    ({"eta": -0.5}, ValueError, "eta=-0.5 is not allowed"),
    ({"eta": "0.5"}, ValueError, r"eta='0.5' \(str\)"),
    ({"theta": 1.01}, ValueError, "theta=1.01 is not allowed: .* above 1 no token passes"),
    ({"theta": float("nan")}, ValueError, "theta=nan"),
    ({"variant": "qv"}, ValueError, "unknown variant 'qv'"),
    ({"inject_blocks": []}, ValueError, r"inject_blocks=\[\] selects nothing"),
    ({"inject_blocks": [9]}, IndexError, "block index 9 out of range"),
    ({"blend_blocks": [0, 0]}, ValueError, "blend_blocks names"),
    ({"local_blend": "no"}, ValueError, "local_blend='no'"),
    ({"source_words": ["zebra"]}, KeyError, "word 'zebra' is not in the prompt 'a red cat on a mat'"),
    ({"target_words": ["cat"]}, KeyError, "word 'cat' is not in the prompt 'a blue dog on a mat'"),
    ({"source_words": [], "target_words": []}, ValueError, "both empty, so no mask can be made"),
    ({"source_words": [3]}, ValueError, "give a list of words"),
    ({"latents": torch.zeros(1, 16, 4, 4)}, ValueError, r"latents of shape \(1, 16, 4, 4\) do not fit"),
    ({"latents": torch.full((1, 16, 8, 8), float("nan"))}, ValueError, "latents hold NaN"),
    ({"steps": 0}, ValueError, "steps=0 is not allowed"),
    ({"callback_on_step_end": "print"}, ValueError, "is not callable"),
    ({"skip_guidance_layers": [1]}, ValueError, "runs the transformer twice per step"),
])
def test_bad_edit_arguments_are_refused_before_running(sd3, calls, bad, error, match):
    refused(calls, error, match, sd3.edit, SOURCE, TARGET, **{**GENERATION, "output_type": "latent", **bad})


def test_an_error_during_the_edit_leaves_no_recording_on(sd3, calls):
    def broken(pipeline, step, timestep, tensors):
        raise RuntimeError("user callback failed")

    with pytest.raises(RuntimeError, match="user callback failed"):
        sd3.edit(SOURCE, TARGET, callback_on_step_end=broken, output_type="latent", **GENERATION)
    assert calls.count > 0 and calls.lse_on() == []
    # and the next, unrelated trace runs without log-sum-exp taps firing
    fired = []
    handle = sd3.module("blocks.0.attn.hook_lse_img").register_forward_hook(lambda *a: fired.append(1))
    sd3.pipeline(**tiny_inputs(sd3, "sd3", SOURCE))
    handle.remove()
    assert fired == []


def test_a_user_callback_runs_alongside_the_blending(sd3):
    plain = sd3.edit(SOURCE, TARGET, tau=0.5, eta=1.0, output_type="latent", **GENERATION)
    seen = []

    def watch(pipeline, step, timestep, tensors):
        seen.append((step, tensors["latents"].clone(), sorted(tensors)))
        return {}

    watched = sd3.edit(SOURCE, TARGET, tau=0.5, eta=1.0, output_type="latent", callback_on_step_end=watch,
                       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **GENERATION)
    assert torch.equal(watched.edited_image, plain.edited_image) and len(plain.masks) == 2  # blending still on
    assert [s for s, _, _ in seen] == [0, 1] and seen[0][2] == ["latents", "prompt_embeds"]
    # the user callback sees the blended latents: at the last step they are the output
    assert torch.equal(seen[-1][1][1], watched.edited_image)

    def zero_target(pipeline, step, timestep, tensors):  # a callback's returned latents are kept
        latents = tensors["latents"].clone()
        latents[1] = 0
        return {"latents": latents}

    zeroed = sd3.edit(SOURCE, TARGET, output_type="latent", callback_on_step_end=zero_target, **GENERATION)
    assert zeroed.edited_image.abs().sum() == 0


def test_valid_edit_parameters_are_written_as_given(sd3):
    result = sd3.edit(SOURCE, TARGET, tau=np.float64(0.5), eta=1, theta=0.0, seed=np.int64(1), output_type="latent",
                      **GENERATION)
    assert (result.params["tau"], result.params["eta"], result.params["theta"]) == (0.5, 1.0, 0.0)
    json.dumps(result.params)  # plain Python numbers only


# -- inversion ---------------------------------------------------------------------------------------------------
IMAGE = Image.new("RGB", (64, 64), (200, 30, 30))


@pytest.mark.parametrize("bad, match", [
    ({"iterations": -1}, "iterations=-1 is not allowed"),
    ({"iterations": 2.5}, "iterations=2.5"),
    ({"method": "ddim"}, "unknown inversion method 'ddim'"),
    ({"check": "yes"}, "check='yes'"),
    ({"steps": 0}, "steps=0"),
    ({"strength": 0.5}, "unknown keyword 'strength'"),
])
def test_bad_inversion_arguments_are_refused_before_running(sd3, calls, bad, match):
    refused(calls, ValueError, match, sd3.invert, IMAGE, SOURCE, **{**GENERATION, **bad})


@pytest.mark.parametrize("bad, match", [
    ({"check": True}, "unknown keyword 'check'"),
    ({"iterations": -2}, "iterations=-2"),
    ({"tau": 2.0}, "tau=2.0"),
    ({"target_words": ["zebra"]}, "word 'zebra' is not in the prompt"),
    ({"latents": torch.zeros(1, 16, 8, 8)}, "do not pass latents="),
    ({"method": "rf-solver"}, r"rf_solver_edit\(probe, source, target, image=image\)"),
    ({"method": "fireflow"}, r"fireflow_edit\(probe, source, target, image=image\)"),
])
def test_bad_edit_image_arguments_are_refused_before_inverting(sd3, calls, bad, match):
    with pytest.raises((ValueError, KeyError), match=match):
        sd3.edit_image(IMAGE, SOURCE, TARGET, **{**GENERATION, **bad})
    calls.nothing_ran()


def test_iterations_reach_the_inversion_and_edit_image_reports_its_error(sd3):
    from mmdit_probe.editing.inversion import pixel_error

    zero = sd3.invert(IMAGE, SOURCE, iterations=0, check=False, **GENERATION).latents
    euler = sd3.invert(IMAGE, SOURCE, method="euler", check=False, **GENERATION).latents
    assert torch.equal(zero, euler)  # a fixed point with no iterations is the Euler guess
    result = sd3.edit_image(IMAGE, SOURCE, TARGET, iterations=1, **GENERATION)
    assert result.params["inversion_iterations"] == 1
    assert result.params["inversion_error"] == pixel_error(result.source_image, IMAGE)


# -- loading -----------------------------------------------------------------------------------------------------
def test_bad_load_arguments_are_refused(tiny_dirs):
    with pytest.raises(KeyError, match="unknown preset 'sd4'"):
        mmdit_probe.load(tiny_dirs["sd3"], preset="sd4")
    with pytest.raises(ValueError, match="preset 'flux.1-dev' is for the flux family, but this pipeline is sd3"):
        mmdit_probe.load(tiny_dirs["sd3"], preset="flux.1-dev")
    with pytest.raises(ValueError, match="preset 'sd3-medium' is for the sd3 family, but this pipeline is flux"):
        mmdit_probe.load(tiny_dirs["flux-dev"], preset=mmdit_probe.preset("sd3-medium"))
    with pytest.raises(ValueError, match="preset=3 is not allowed"):
        mmdit_probe.load(tiny_dirs["sd3"], preset=3)
    with pytest.raises(ValueError, match="dtype=torch.int8 is not allowed"):
        mmdit_probe.load(tiny_dirs["sd3"], dtype=torch.int8)
    with pytest.raises(ValueError, match=r"model=3 \(int\) is not allowed"):
        mmdit_probe.load(3)
    with pytest.raises(ValueError, match=r"top_layers names \[1\] more than once"):
        mmdit_probe.load(tiny_dirs["sd3"], top_layers=[1, 1])
    with pytest.raises(ValueError, match=r"top_layers=\[\] selects nothing"):
        mmdit_probe.load(tiny_dirs["sd3"], top_layers=[])
    probe = mmdit_probe.load(tiny_dirs["sd3"], preset="sd3-medium", top_layers=np.array([1, 0]))
    assert probe.preset.name == "sd3-medium" and probe.preset.top_layers == (1, 0)


# -- map files ---------------------------------------------------------------------------------------------------
def test_map_files_are_atomic_and_never_overwritten_unasked(maps, tmp_path, monkeypatch):
    path = maps.save(tmp_path / "maps.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="maps.safetensors exists: pass overwrite=True"):
        maps.save(path)
    assert path.read_bytes() == before
    maps.save(path, overwrite=True)
    with pytest.raises(IsADirectoryError, match="it is a folder"):
        maps.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder .*nowhere does not exist"):
        maps.save(tmp_path / "nowhere" / "m.safetensors")

    import mmdit_probe.maps as maps_module

    def fail(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(f"disk full while writing {filename}")

    monkeypatch.setattr(maps_module, "save_file", fail)
    with pytest.raises(OSError, match=r"could not save maps to .*other.safetensors: disk full while writing "
                                      r".*other.safetensors$"):
        maps.save(tmp_path / "other.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.safetensors"]  # no partial or temporary file


def test_map_files_are_checked_on_load(maps, tmp_path):
    from safetensors.torch import save_file

    good = maps.save(tmp_path / "good.safetensors")
    loaded = AttentionMaps.load(good)
    assert torch.equal(loaded.t2i, maps.t2i) and loaded.steps == maps.steps
    meta = json.loads(__import__("safetensors").safe_open(str(good), "pt").metadata()["mmdit_probe"])
    tensors = {"t2i": maps.t2i.contiguous(), "i2t": maps.i2t.contiguous()}

    def write(name, tensors=tensors, meta=meta, raw=None):
        path = tmp_path / name
        save_file(tensors, str(path), metadata={"mmdit_probe": raw if raw is not None else json.dumps(meta)})
        return path

    damaged = tensors["t2i"].clone()
    damaged[0, 0, 0, 0, 0] = float("nan")
    cases = [
        (write("nan.safetensors", tensors={**tensors, "t2i": damaged}), "nan.safetensors .*t2i holds NaN"),
        (write("json.safetensors", raw="{"), "json.safetensors: the maps metadata is not valid JSON"),
        (write("steps.safetensors", meta={**meta, "steps": [0]}), r"steps.safetensors .*t2i has shape .* says"),
        (write("grid.safetensors", meta={**meta, "grid": [3, 3]}), "grid.safetensors .*has shape"),
        (write("schema.safetensors", meta={**meta, "steps": "0,1"}), "schema.safetensors .*'steps' must be a list"),
        (write("rows.safetensors", meta={**meta, "rows": "all"}), "rows.safetensors .*rows='all'"),
        (write("tables.safetensors", meta={k: v for k, v in meta.items() if k != "tables"}), "tables"),
        (write("kinds.safetensors", tensors={"other": maps.t2i.contiguous()}), "neither t2i nor i2t"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            AttentionMaps.load(path)
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, str(plain))
    with pytest.raises(ValueError, match="plain.safetensors holds no attention maps"):
        AttentionMaps.load(plain)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        AttentionMaps.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="no maps file at"):
        AttentionMaps.load(tmp_path / "missing.safetensors")


# -- the toy tokenizer -------------------------------------------------------------------------------------------
def test_characters_a_tokenizer_does_not_know_are_warned_about():
    toy = mmdit_probe.load("toy")
    with pytest.warns(UserWarning, match=r"the clip tokenizer does not know 'é', '€' in the prompt .* reads "
                                         r"'<\|endoftext\|>' there"):
        toy.inputs("a red circle é €", steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        toy.inputs("on the left a red circle, on a white background.", steps=2)


# -- the command line --------------------------------------------------------------------------------------------
def test_help_and_argument_errors_do_not_import_torch():
    code = ("import sys\nfrom mmdit_probe.cli import main\n"
            "for argv in (['--help'], ['edit', 'toy', 'a', 'b', '--tau', 'nan'],\n"
            "             ['maps', 'toy', 'a', '--steps', '0']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
            "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().splitlines()[-4:] == ["exit 0", "exit 2", "exit 2", "False"], run.stdout + run.stderr
    assert "argument --tau: nan is not allowed: give a number in [0, 1]" in run.stderr
    assert "argument --steps: 0 is not allowed" in run.stderr


def _cli(argv, capsys):
    from mmdit_probe.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["maps", "toy", "a red circle", "--words", "zebra"], "word 'zebra' is not in the prompt 'a red circle'"),
    (["maps", "toy", "on the a of"], "has no content words to map"),
    (["maps", "toy", ""], "has no content words to map"),
    (["maps", "toy", "a red circle", "--edit", "a red circle", "--steps", "2"], None),
    (["edit", "toy", "a red circle", "a blue circle", "--steps", "2", "--variant", "qiki", "--no-blend",
      "--theta", "0.5"], None),
    (["info", "nobody/no-such-model"], "could not load 'nobody/no-such-model'"),
])
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    if argv[0] != "info":
        argv = [*argv, "--out", str(out)]
    if match is None:  # these are fine: run them, then the same command again must refuse to overwrite
        from mmdit_probe.cli import main

        main(argv)
        written = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        code, err = _cli(argv, capsys)
        assert code == 2 and "already holds" in err and "--overwrite" in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == written
        main([*argv, "--overwrite"])
        assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(written)
        assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left
        return
    code, err = _cli(argv, capsys)
    assert code == 2 and match in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"mmdit-probe {argv[0]}: error:") and match in err.splitlines()[-1]
    assert not out.exists()


def test_cli_out_that_is_a_file_is_refused_before_loading(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _cli(["edit", "toy", "a red circle", "a blue circle", "--out", str(tmp_path / "file" / "sub")],
                     capsys)
    assert code == 2 and "is a file, not a folder" in err


def test_cli_runtime_errors_exit_1_leave_no_partial_output_and_show_tracebacks_with_debug(tmp_path, capsys,
                                                                                           monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(AttentionMaps, "save", broken)
    argv = ["maps", "toy", "a red circle", "--steps", "2", "--out", str(tmp_path / "out")]
    code, err = _cli(argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 1 and last == ("mmdit-probe maps: error: RuntimeError: disk on fire "
                                  "(run with --debug for the traceback)")
    assert list(tmp_path.iterdir()) == []  # image.png was staged, never moved into place
    from mmdit_probe.cli import main

    with pytest.raises(RuntimeError, match="disk on fire"):
        main([*argv, "--debug"])


def test_zero_never_means_the_default_elsewhere(sd3, calls):
    from mmdit_probe.editing.flowedit import flowedit

    with pytest.raises(ValueError, match="height=0 is not allowed"):
        sd3.grid(0, 64)
    with pytest.raises(ValueError, match="max_sequence_length=0 is not allowed"):
        sd3.tokens(SOURCE, 0)
    assert sd3.grid(64, 32) == (4, 2)
    refused(calls, ValueError, r"skip=1.5 is not allowed: give a number in \[0.0, 1.0\]", flowedit, sd3, IMAGE,
            SOURCE, TARGET, skip=1.5, **GENERATION)
    refused(calls, ValueError, "source_guidance=nan", flowedit, sd3, IMAGE, SOURCE, TARGET,
            source_guidance=float("nan"), **GENERATION)


def test_edited_words_cut_off_by_the_tokenizer_are_refused_only_when_blending(sd3, calls):
    target = LONG.replace("zebra", "horse")
    refused(calls, KeyError, "'zebra' is in the prompt .* but cut off", sd3.edit, LONG, target, output_type="latent",
            **GENERATION)
    result = sd3.edit(LONG, target, local_blend=False, output_type="latent", **GENERATION)
    assert result.masks == [] and result.params["source_words"] == ["zebra"]

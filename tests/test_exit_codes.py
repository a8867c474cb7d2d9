"""One mapping from errors to exit codes, whatever the entry point (issue 25).

Bad input (`validation.InvalidInput`, argparse's own errors included) exits 2, any other failure 1,
each as exactly one line ``<prog>: error: ...`` on stderr, and a refused command writes nothing.
The commands run in-process (`main(argv)`); the `python -m` entry points once each in a subprocess.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mmdit_probe
from mmdit_probe import segmentation
from mmdit_probe.cli import main
from mmdit_probe.sweep import sweep, toy_prompts

CIRCLE = "on the left a large red circle on a white background"
SEGMENTATION = "python -m mmdit_probe.segmentation"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the rows refer to as {name}: prompt files, a broken pipeline folder, a finished sweep, an image set."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "prompts.txt").write_text(f"{CIRCLE}\n")
    (root / "broken.jsonl").write_text(json.dumps({"prompt": CIRCLE}) + "\n\n{oops\n")
    (root / "empty.txt").write_text("# only a comment\n\n")
    (root / "a_file").write_text("not a folder")
    (root / "broken_pipeline").mkdir()
    (root / "broken_pipeline" / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline",')
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    sweep(probe, toy_prompts(1), root / "sweep", num_steps=2, grids=["tokens"], progress=False)
    for name in ("images", "masks"):
        (root / "scenes" / name).mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / "scenes" / "images" / "one.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "scenes" / "masks" / "one.png")
    # Values an RGB conversion would clip: a 16-bit PNG and a float TIFF.
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(root / "sixteen.png")
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(root / "float.tif")
    names = {"prompts": "prompts.txt", "broken": "broken.jsonl", "empty": "empty.txt", "root": "",
             "sixteen": "sixteen.png", "float": "float.tif"}
    return {key: str(root / names.get(key, key))
            for key in ("prompts", "broken", "empty", "a_file", "broken_pipeline", "sweep", "scenes", "root",
                        "sixteen", "float")}


def _in_process(entry, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        entry(argv)
    return exit_.value.code, capsys.readouterr().err


# (argv, exit code, text the one error line holds). {name} is a path from `files`; {out} a fresh folder.
ROWS = [
    # info
    (["info", "nobody/no-such-model"], 2, "could not load 'nobody/no-such-model'"),
    (["info", "{broken_pipeline}"], 2, "broken_pipeline/model_index.json is not valid JSON"),
    (["info", "toy", "--hooks", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["info"], 2, "the following arguments are required: model"),
    # maps
    (["maps", "toy", CIRCLE, "--steps", "0", "--out", "{out}"], 2, "argument --steps: 0 is not allowed"),
    (["maps", "toy", CIRCLE, "--words", "zebra", "--out", "{out}"], 2, "word 'zebra' is not in the prompt"),
    (["maps", "nobody/no-such-model", CIRCLE, "--out", "{out}"], 2, "could not load 'nobody/no-such-model'"),
    (["maps", "toy", CIRCLE, "--out", "{a_file}/sub"], 2, "is a file, not a folder"),
    (["maps", "toy", CIRCLE, "--image", "{root}/missing.png", "--out", "{out}"], 2,
     "missing.png does not exist: give the path of an image file"),
    (["maps", "toy", CIRCLE, "--image", "{scenes}", "--out", "{out}"], 2, "scenes is a folder"),
    (["maps", "toy", CIRCLE, "--image", "{prompts}", "--out", "{out}"], 2, "prompts.txt could not be read as an image"),
    (["maps", "toy", CIRCLE, "--image", "{sixteen}", "--out", "{out}"], 2,
     "sixteen.png has mode 'I;16', whose values a conversion to RGB would clip"),
    (["maps", "toy", CIRCLE, "--image", "{float}", "--out", "{out}"], 2, "float.tif has mode 'F'"),
    (["maps", "toy", CIRCLE, "--image", "{scenes}/images/one.png", "--out", "{out}"], 2,
     "--image: StableDiffusion3Pipeline (sd3) takes no context or reference image; leave --image out"),
    # edit
    (["edit", "toy", CIRCLE, CIRCLE.replace("red", "blue"), "--tau", "nan", "--out", "{out}"], 2,
     "argument --tau: nan is not allowed"),
    (["edit", "toy", CIRCLE, CIRCLE.replace("red", "blue"), "--variant", "best", "--out", "{out}"], 2,
     "argument --variant: invalid choice: 'best'"),
    (["edit", "toy", CIRCLE, "", "--out", "{out}"], 2, "target=''"),
    (["edit", "toy", CIRCLE, CIRCLE.replace("red", "blue"), "--image", "{root}/missing.png", "--out", "{out}"], 2,
     "missing.png does not exist"),
    (["edit", "toy", CIRCLE, CIRCLE.replace("red", "blue"), "--image", "{scenes}/images/one.png", "--out", "{out}"],
     2, "takes no context or reference image"),
    # sweep: options refused before the model loads, or against it, but always before OUT exists
    (["sweep", "nobody/no-such-model", "--prompts", "toy", "--out", "{out}"], 2,
     "could not load 'nobody/no-such-model'"),
    (["sweep", "toy", "--prompts", "{prompts}", "--out", "{out}"], 2, "give --masks DIR"),
    (["sweep", "toy", "--prompts", "{root}/missing.txt", "--masks", "{root}", "--out", "{out}"], 2,
     "missing.txt does not exist"),
    (["sweep", "toy", "--prompts", "{broken}", "--masks", "{root}", "--out", "{out}"], 2,
     "broken.jsonl, line 3: not valid JSON"),
    (["sweep", "toy", "--prompts", "{empty}", "--masks", "{root}", "--out", "{out}"], 2,
     "empty.txt holds no prompts"),
    (["sweep", "toy", "--prompts", "{prompts}", "--masks", "{root}/no-masks", "--out", "{out}"], 2,
     "no-masks does not exist"),
    (["sweep", "toy", "--prompts", "toy", "--num-prompts", "0", "--out", "{out}"], 2, "--num-prompts=0"),
    (["sweep", "toy", "--prompts", "toy", "--num-prompts", "-3", "--out", "{out}"], 2, "--num-prompts=-3"),
    (["sweep", "toy", "--prompts", "toy", "--max-prompts", "-1", "--out", "{out}"], 2, "--max-prompts=-1"),
    (["sweep", "toy", "--prompts", "toy", "--steps", "0", "--out", "{out}"], 2, "argument --steps: 0 is not"),
    (["sweep", "toy", "--prompts", "toy", "--steps", "-1", "--out", "{out}"], 2, "argument --steps: -1 is not"),
    (["sweep", "toy", "--prompts", "toy", "--resolution", "0", "--out", "{out}"], 2, "argument --resolution: 0"),
    (["sweep", "toy", "--prompts", "toy", "--resolution", "30", "--out", "{out}"], 2, "multiples of 4 pixels"),
    (["sweep", "toy", "--prompts", "toy", "--resolution", "64", "--out", "{out}"], 2, "at most 32 pixels"),
    (["sweep", "toy", "--prompts", "toy", "--threshold", "5", "--out", "{out}"], 2, "argument --threshold: 5"),
    (["sweep", "toy", "--prompts", "toy", "--threshold", "nan", "--out", "{out}"], 2, "argument --threshold: nan"),
    (["sweep", "toy", "--prompts", "toy", "--guidance", "nan", "--out", "{out}"], 2, "--guidance=nan"),
    (["sweep", "toy", "--prompts", "toy", "--guidance", "-2", "--out", "{out}"], 2, "--guidance=-2.0"),
    (["sweep", "toy", "--prompts", "toy", "--blocks", "9", "--out", "{out}"], 2, "blocks 0..5"),
    (["sweep", "toy", "--prompts", "toy", "--blocks", "1", "1", "--out", "{out}"], 2, "names [1] more than once"),
    (["sweep", "toy", "--prompts", "toy", "--steps", "2", "--record-steps", "5", "--out", "{out}"], 2,
     "record_steps=[5]"),
    (["sweep", "toy", "--prompts", "toy", "--steps", "2", "--record-steps", "-1", "--out", "{out}"], 2,
     "record_steps=[-1]"),
    (["sweep", "toy", "--prompts", "toy", "--steps", "3", "--record-steps", "0", "--windows", "late", "--out",
      "{out}"], 2, "windows ['late'] hold none of the recorded steps [0]"),
    (["sweep", "toy", "--prompts", "toy", "--out", "{a_file}"], 2, "is a file, not a folder"),
    # sweep-report
    (["sweep-report", "{root}/nowhere"], 2, "nowhere is not a sweep's output folder"),
    (["sweep-report", "{sweep}", "--top-k", "0"], 2, "top_k=0 is not allowed"),
    (["sweep-report", "{sweep}", "--top-k", "-1"], 2, "top_k=-1 is not allowed"),
    (["sweep-report", "{sweep}", "--top-k", "99"], 2, "there are only 6 blocks"),
    (["sweep-report", "{sweep}", "--grid", "pixels"], 2, "grid='pixels' is not allowed"),
    (["sweep-report", "{sweep}", "--metric", "auc"], 2, "argument --metric: invalid choice: 'auc'"),
]


@pytest.mark.parametrize("argv, code, match", ROWS, ids=[f"{row[0][0]}-{i}" for i, row in enumerate(ROWS)])
def test_every_command_answers_bad_input_with_one_line_and_exit_2(files, tmp_path, capsys, argv, code, match):
    argv = [a.format(out=tmp_path / "out", **files) for a in argv]
    found, err = _in_process(main, argv, capsys)
    # argparse names the command, except for arguments no parser knows (the top-level parser reports those)
    prog = "mmdit-probe" if "unrecognized arguments" in match else f"mmdit-probe {argv[0]}"
    assert found == code and len(err.splitlines()) == 1 and err.startswith(f"{prog}: error: "), err
    assert match in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging folder or config.json


SEGMENTATION_ROWS = [
    (["{root}/nowhere"], "needs an images/ and a masks/ folder"),
    (["{scenes}", "--sigma", "0"], "sigma=0.0 is not allowed"),
    (["{scenes}", "--sigma", "nan"], "sigma=nan is not allowed"),
    (["{scenes}", "--concepts", "background", "background"], "concept 'background' is given twice"),
    (["{scenes}", "--concepts", "hot dog"], "concept 'hot dog' is not one word"),
    (["{scenes}", "--kind", "t2i"], "argument --kind: invalid choice: 't2i'"),
    (["{scenes}", "--labels", "{broken}"], "broken.jsonl is not valid JSON"),
    (["{scenes}", "--labels", "{root}/missing.json"], "missing.json does not exist"),
    (["{scenes}", "--concepts", "circle", "background", "--model", "nobody/no-such-model"],
     "could not load 'nobody/no-such-model'"),
    (["{scenes}", "--concepts", "circle"], "gives one concept"),
    (["{scenes}", "--out", "{a_file}/scores.json"], "is a file, not a folder"),
]


@pytest.mark.parametrize("argv, match", SEGMENTATION_ROWS)
def test_segmentation_answers_bad_input_with_one_line_and_exit_2(files, tmp_path, capsys, argv, match):
    argv = [a.format(**files) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "scores.json")]
    code, err = _in_process(segmentation.main, argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith(f"{SEGMENTATION}: error: "), err
    assert match in err
    assert list(tmp_path.iterdir()) == []


def test_python_m_entry_points_use_the_same_runner(files, tmp_path):
    """The real `python -m` commands (torchrun starts `-m mmdit_probe.cli`): one line, exit 2, no traceback."""
    runs = {SEGMENTATION: [sys.executable, "-m", "mmdit_probe.segmentation", files["root"] + "/nowhere"],
            "mmdit-probe sweep": [sys.executable, "-m", "mmdit_probe.cli", "sweep", "toy", "--prompts",
                                  files["prompts"], "--out", str(tmp_path / "out")]}
    for prog, command in runs.items():
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and run.stderr.startswith(f"{prog}: error: "), run.stderr
        assert len(run.stderr.splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists()


def test_help_and_sweep_argument_errors_do_not_import_torch(files, tmp_path):
    code = ("import sys\nfrom mmdit_probe.cli import main\n"
            f"for argv in (['--help'], ['maps', '--help'], ['edit', '--help'], ['sweep', '--help'],\n"
            f"             ['sweep-report', '--help'],\n"
            f"             ['sweep', 'toy', '--prompts', 'toy', '--num-prompts', '0', '--out', {str(tmp_path)!r}],\n"
            f"             ['sweep', 'toy', '--prompts', {files['prompts']!r}, '--out', {str(tmp_path)!r}]):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
            "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    said = [line for line in run.stdout.splitlines() if line.startswith("exit ") or line in ("True", "False")]
    assert said == ["exit 0"] * 5 + ["exit 2", "exit 2", "False"], run.stdout + run.stderr


def test_an_image_too_large_to_decode_safely_is_bad_input(files, tmp_path, capsys, monkeypatch):
    """PIL's DecompressionBombError (not an OSError) for an image of over twice MAX_IMAGE_PIXELS: exit 2."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 32 * 32 // 4)
    code, err = _in_process(main, ["maps", "toy", CIRCLE, "--image", f"{files['scenes']}/images/one.png", "--out",
                                   str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "one.png could not be read as an image" in err, err
    assert "decompression bomb" in err and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback_of_bad_input(files, capsys):
    with pytest.raises(mmdit_probe.validation.InvalidInput, match="is not valid JSON"):
        main(["info", files["broken_pipeline"], "--debug"])
    with pytest.raises(mmdit_probe.validation.InvalidInput, match="given twice"):
        segmentation.main([files["scenes"], "--concepts", "sky", "sky", "--debug"])


def test_a_label_that_differs_from_a_concept_only_by_case_is_that_concept(files, tmp_path, capsys):
    """labels.json may say "Background" where --concepts says background: one concept, not one given twice."""
    (tmp_path / "labels.json").write_text(json.dumps({"one": "Background"}))
    out = tmp_path / "scores.json"
    segmentation.main([files["scenes"], "--labels", str(tmp_path / "labels.json"), "--concepts", "background",
                       "circle", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["images"] == 1 and result["per_image"][0]["target"].lower() == "background"

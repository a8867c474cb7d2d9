"""Sweeps on the toy model (4 steps, a handful of prompts): scores, resume, sharding, mask sources."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import mmdit_probe
from mmdit_probe.maps import AttentionMaps, normalise
from mmdit_probe.metrics import METRICS, score_map, token_mask
from mmdit_probe.sweep import (
    ConfigMismatch,
    FolderMasks,
    PromptItem,
    ToyMasks,
    read_record,
    record_masks,
    sweep,
    sweep_report,
    toy_prompts,
)
from mmdit_probe.toy.judge import word_masks_from_image
from mmdit_probe.toy.world import caption, sample_split_scene
from mmdit_probe.validation import InvalidInput

STEPS = 4
KEY = ["prompt_id", "word_index", "kind", "block", "step", "metric", "grid"]


def toy_scenes(n: int, seed: int = 0) -> list:
    """The held-out scenes toy.evaluate draws (its own code, repeated)."""
    rng = np.random.default_rng(seed)
    return [sample_split_scene(rng, held_out=True) for _ in range(n)]


@pytest.fixture(scope="module")
def toy():
    probe = mmdit_probe.load("toy")
    probe.pipeline.set_progress_bar_config(disable=True)
    return probe


@pytest.fixture(scope="module")
def full_run(toy, tmp_path_factory):
    """One uninterrupted single-process sweep of 4 toy prompts: the reference table."""
    out = tmp_path_factory.mktemp("full")
    result = sweep(toy, toy_prompts(4), out, num_steps=STEPS, progress=False)
    return result, pq.read_table(result.table)


def test_rows_are_score_map_of_the_recorded_maps_and_masks(full_run):
    result, table = full_run
    assert result.complete and result.done == 4
    config = result.config
    # One row per prompt x word x kind x block x step x metric x grid, none doubled.
    assert table.group_by(KEY).aggregate([("value", "count")]).num_rows == table.num_rows
    words = table.group_by(["prompt_id", "word_index"]).aggregate([]).num_rows
    assert table.num_rows == words * 2 * 6 * STEPS * len(METRICS) * 2
    item = toy_prompts(4)[2]
    meta, tensors = read_record(result.out / "records" / f"{item.id}.safetensors")
    maps, masks = AttentionMaps.load(result.out / "records" / f"{item.id}.safetensors"), record_masks(meta, tensors)
    assert str(maps.t2i.dtype) == "torch.float16"
    # The stored masks are the judge's masks of the stored (generated) image.
    judge = word_masks_from_image(item.scene, tensors["image"].numpy())
    assert set(masks) == {i for i, _, _ in meta["words"]} and masks
    for index, mask in masks.items():
        np.testing.assert_array_equal(mask, judge[index])
    rows = table.filter(pc.equal(table["prompt_id"], item.id)).to_pylist()
    checked = 0
    for row in rows[:: len(rows) // 40]:  # a spread of words, kinds, blocks, steps and grids
        m = normalise(maps.select(row["word_index"], kind=row["kind"], blocks=[row["block"]], steps=[row["step"]])
                      [0, 0].reshape(maps.grid))
        mask = masks[row["word_index"]]
        target = mask if row["grid"] == "pixels" else token_mask(mask, maps.grid)
        assert row["value"] == score_map(m, target, config.threshold)[row["metric"]]
        checked += 1
    assert checked >= 40


def test_windows_score_maps_averaged_over_their_steps(toy, full_run, tmp_path):
    _, reference = full_run
    result = sweep(toy, toy_prompts(2), tmp_path, num_steps=STEPS, windows=["all", "early"], grids=["pixels"],
                   progress=False)
    table = pq.read_table(result.table)
    steps = table.filter(pc.equal(table["window"], "step"))
    windows = table.filter(pc.not_equal(table["window"], "step"))
    # The per-step rows are those of a sweep without windows.
    same = reference.filter(pc.and_(pc.is_in(reference["prompt_id"], pa.array(["toy00000", "toy00001"])),
                                    pc.equal(reference["grid"], "pixels")))
    assert steps.equals(same)
    assert set(windows.column("step").to_pylist()) == {-1}
    assert windows.num_rows == steps.num_rows // STEPS * 2
    # A window's row scores the map `AttentionMaps.per_block` averages over its steps (as toy.evaluate does):
    # early = the first third of the steps.
    assert result.config.window_steps() == {"all": [0, 1, 2, 3], "early": [0, 1]}
    maps = AttentionMaps.load(result.out / "records" / "toy00001.safetensors")
    meta, tensors = read_record(result.out / "records" / "toy00001.safetensors")
    masks = record_masks(meta, tensors)
    rows = windows.filter(pc.equal(windows["prompt_id"], "toy00001")).to_pylist()
    for row in rows[:: max(1, len(rows) // 30)]:
        chosen = {"all": None, "early": [0, 1]}[row["window"]]
        m = maps.per_block(row["word_index"], kind=row["kind"], steps=chosen)[maps.blocks.index(row["block"])]
        assert row["value"] == score_map(normalise(m), masks[row["word_index"]])[row["metric"]]
    with pytest.raises(ConfigMismatch, match=r"windows: \['early', 'all'\] -> \['early'\]"):
        sweep(toy, toy_prompts(2), tmp_path, num_steps=STEPS, windows=["early"], grids=["pixels"], progress=False)
    with pytest.raises(ValueError, match="windows must be among"):
        sweep(toy, toy_prompts(2), tmp_path / "x", num_steps=STEPS, windows=["first"], progress=False)
    with pytest.raises(ValueError, match=r"windows \['late'\] hold none of the recorded steps \[0\]"):
        sweep(toy, toy_prompts(2), tmp_path / "y", num_steps=STEPS, record_steps=[0], windows=["late"],
              progress=False)


def test_sweep_noise_is_evaluate_noise(toy):
    """toy.evaluate draws prompt j's noise from its own generator seeded seed + j (batches of 10,
    same_noise=False); the sweep gives prompt j seed j, one prompt at a time: the same initial latents."""
    items = toy_prompts(12)
    assert [it.seed for it in items] == list(range(12))
    assert [it.prompt for it in items] == [caption(s) for s in toy_scenes(12)]
    batch = toy.inputs([it.prompt for it in items[10:12]], seed=10, same_noise=False)
    pipe = toy.pipeline
    channels = pipe.transformer.config.in_channels // toy.family.latent_channels_divisor
    drawn = pipe.prepare_latents(2, channels, 32, 32, torch.float32, torch.device("cpu"), batch["generator"])
    for j, item in enumerate(items[10:12]):
        alone = toy.inputs(item.prompt, seed=item.seed)["latents"]  # what sweep's generate(seed=...) starts from
        assert torch.equal(alone[0], drawn[j])


def test_stopped_run_resumes_to_the_same_table(toy, full_run, tmp_path):
    _, reference = full_run
    first = sweep(toy, toy_prompts(4), tmp_path, num_steps=STEPS, max_prompts=2, progress=False)
    assert (first.done, first.total, first.complete) == (2, 4, False)
    assert pq.read_table(first.table).column("prompt_id").unique().to_pylist() == ["toy00000", "toy00001"]
    finished = sorted(p.name for p in (tmp_path / "records").iterdir())
    assert finished == ["toy00000.safetensors", "toy00001.safetensors"]
    stamps = {name: (tmp_path / "records" / name).stat().st_mtime_ns for name in finished}
    second = sweep(toy, toy_prompts(4), tmp_path, num_steps=STEPS, progress=False)
    assert second.complete
    assert pq.read_table(second.table).equals(reference)
    # Finished prompts were skipped, not redone.
    assert all((tmp_path / "records" / n).stat().st_mtime_ns == t for n, t in stamps.items())


def test_truncated_and_corrupt_records_are_redone(toy, full_run, tmp_path):
    _, reference = full_run
    sweep(toy, toy_prompts(4), tmp_path, num_steps=STEPS, progress=False)
    records = tmp_path / "records"
    truncated, garbled = records / "toy00001.safetensors", records / "toy00003.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-500])
    data = bytearray(garbled.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the tensors: only the checksum sees it
    garbled.write_bytes(bytes(data))
    with pytest.raises(Exception, match="corrupt"):
        read_record(garbled)
    untouched = (records / "toy00000.safetensors").stat().st_mtime_ns
    again = sweep(toy, toy_prompts(4), tmp_path, num_steps=STEPS, progress=False)
    assert again.complete
    read_record(truncated), read_record(garbled)  # whole again
    assert (records / "toy00000.safetensors").stat().st_mtime_ns == untouched
    assert pq.read_table(again.table).equals(reference)


def test_changed_configuration_is_refused(toy, full_run):
    result, _ = full_run
    with pytest.raises(ConfigMismatch) as error:
        sweep(toy, toy_prompts(4), result.out, num_steps=STEPS + 1, progress=False)
    message = str(error.value)
    assert "num_steps: 4 -> 5" in message and "record_steps" in message and "new --out" in message
    with pytest.raises(ConfigMismatch, match="prompts_sha256"):
        sweep(toy, toy_prompts(5), result.out, num_steps=STEPS, progress=False)


def test_the_cli_refuses_a_changed_configuration_as_a_usage_error(full_run, capsys):
    from mmdit_probe.cli import main

    result, _ = full_run
    before = sorted(p.stat().st_mtime_ns for p in (result.out / "records").iterdir())
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "toy", "--prompts", "toy", "--num-prompts", "4", "--steps", str(STEPS + 1),
              "--out", str(result.out)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "num_steps: 4 -> 5" in error and "Traceback" not in error
    assert sorted(p.stat().st_mtime_ns for p in (result.out / "records").iterdir()) == before


def test_two_processes_give_the_same_table(full_run, tmp_path):
    """torchrun starts two real CPU processes; each takes its share through accelerate."""
    _, reference = full_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mmdit_probe.cli", "sweep", "toy", "--prompts", "toy", "--num-prompts", "4",
               "--steps", str(STEPS), "--out", str(tmp_path)]
    # Its own session, so a hang can be killed with its workers rather than leaving them behind.
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise
    assert launcher.returncode == 0, stderr[-3000:]
    assert "4 of 4 prompts done" in stdout
    assert pq.read_table(tmp_path / "scores.parquet").equals(reference)
    makers = {read_record(p)[0]["process"] for p in (tmp_path / "records").glob("*.safetensors")}
    assert makers == {0, 1}


def test_report_ranks_blocks_and_writes_top_layers(full_run):
    result, table = full_run
    report = sweep_report(result.out, top_k=3, figures=False)
    ranking = report["ranking"]
    assert sorted(r["block"] for r in ranking) == list(range(6))
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    # A block's score is the mean of its T2I soft-IoU rows on pixels.
    best = ranking[0]["block"]
    rows = table.filter(pc.and_(pc.and_(pc.equal(table["kind"], "t2i"), pc.equal(table["grid"], "pixels")),
                                pc.and_(pc.equal(table["metric"], "soft_iou"), pc.equal(table["block"], best))))
    assert ranking[0]["score"] == pytest.approx(np.mean(rows.column("value").to_numpy()), rel=1e-12)
    assert report["top_layers"] == [r["block"] for r in ranking[:3]]
    assert json.loads((result.out / "top_layers.json").read_text())["top_layers"] == report["top_layers"]
    heat = np.array(report["heatmaps"]["t2i/pixels/soft_iou/all"])
    assert heat.shape == (6, STEPS) and np.isclose(heat.mean(axis=1)[best], ranking[0]["score"])
    for kind in ("t2i", "i2t"):
        for name in ("top", "all"):
            assert 0 <= report["top_k_vs_all"][kind][name]["pixels"]["soft_iou"] <= 1


# -- mask sources ---------------------------------------------------------------------------


def test_folder_masks_load_and_validate(tmp_path):
    item, image = PromptItem("cat01", "a cat on a sofa", 0), np.zeros((32, 32, 3), np.uint8)
    (tmp_path / "cat01").mkdir()
    cat = np.zeros((32, 32), np.uint8)
    cat[4:20, 8:24] = 255
    Image.fromarray(cat).save(tmp_path / "cat01" / "cat.png")
    masks = FolderMasks(tmp_path)(item, image, [(1, "cat")])
    assert masks[1].dtype == bool and masks[1].sum() == 16 * 16
    with pytest.raises(FileNotFoundError, match=r"no mask for the word 'sofa' of prompt 'cat01'.*sofa\.png"):
        FolderMasks(tmp_path)(item, image, [(1, "cat"), (4, "sofa")])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "cat01" / "sofa.png")
    with pytest.raises(ValueError, match="64x64 pixels but the generated images are 32x32"):
        FolderMasks(tmp_path)(item, image, [(4, "sofa")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderMasks(tmp_path / "nowhere")


def test_folder_masks_in_a_sweep(toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one scene\nin the center a large red circle on a white background\n")
    folder = tmp_path / "masks" / "p00000"
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:32, :32]
    circle = ((yy - 16) ** 2 + (xx - 16) ** 2 <= 36).astype(np.uint8) * 255
    Image.fromarray(circle).save(folder / "circle.png")
    result = sweep(toy, str(prompts), tmp_path / "out", masks=FolderMasks(tmp_path / "masks"), words=["circle"],
                   num_steps=STEPS, kinds=["t2i"], progress=False)
    table = pq.read_table(result.table)
    assert set(table.column("word").to_pylist()) == {"circle"} and set(table.column("kind").to_pylist()) == {"t2i"}
    meta, tensors = read_record(result.out / "records" / "p00000.safetensors")
    np.testing.assert_array_equal(record_masks(meta, tensors)[6], circle > 127)


@pytest.fixture(scope="module")
def tiny_grounded_sam(tmp_path_factory):
    """Random Grounding-DINO and SAM at toy widths, from transformers' classes, saved and loaded by path."""
    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )

    root = tmp_path_factory.mktemp("grounded_sam")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "red", "circle", "white", "background"]
    (root / "vocab.txt").write_text("\n".join(vocab))
    torch.manual_seed(0)
    processor = GroundingDinoProcessor(GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                                       BertTokenizer(str(root / "vocab.txt")))
    detector = GroundingDinoForObjectDetection(GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=4,
                                   out_indices=[1, 2]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, num_feature_levels=2,
        encoder_n_points=1, decoder_n_points=1, max_text_len=16, fusion_ffn_dim=32))
    for part in (processor, detector):
        part.save_pretrained(root / "detector")
    segmenter_processor = SamProcessor(SamImageProcessor(
        size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}, mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16}))
    segmenter = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=1,
                                      image_size=64, patch_size=16, global_attn_indexes=[0], mlp_dim=16,
                                      num_pos_feats=4, window_size=2),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=8, image_size=64, patch_size=16,
                                                     mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                 mlp_dim=16, iou_head_hidden_dim=8)))
    for part in (segmenter_processor, segmenter):
        part.save_pretrained(root / "segmenter")
    return root / "detector", root / "segmenter"


def test_grounded_sam_masks_run_end_to_end(toy, tiny_grounded_sam, tmp_path):
    from mmdit_probe.sweep import GroundedSam

    # Thresholds 0: random weights must still find boxes, so the SAM half runs too (plumbing, not quality).
    source = GroundedSam(*tiny_grounded_sam, box_threshold=0.0, text_threshold=0.0, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    boxes = source.boxes(Image.fromarray(image), "red")
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
    masks = source(PromptItem("x", "a red circle", 0), image, [(1, "red"), (2, "circle")])
    assert set(masks) == {1, 2}
    for mask in masks.values():
        assert mask.shape == (32, 32) and mask.dtype == bool
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "scene", "prompt": "in the center a large red circle on a white background",
                                   "seed": 3}) + "\n")
    result = sweep(toy, str(prompts), tmp_path / "out", masks=source, words=["red", "circle"], num_steps=STEPS,
                   kinds=["t2i"], progress=False)
    meta, tensors = read_record(result.out / "records" / "scene.safetensors")
    assert [w for _, w, _ in meta["words"]] == ["red", "circle"] and meta["seed"] == 3
    assert {m.shape for m in record_masks(meta, tensors).values()} == {(32, 32)}
    assert pq.read_table(result.table).num_rows == 2 * 6 * STEPS * len(METRICS) * 2
    assert result.config.masks.startswith("grounded-sam:")


# -- bad input and failing prompts (issue 25) ------------------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    ({"num_steps": 0}, "num_steps=0 is not allowed"),
    ({"num_steps": -1}, "num_steps=-1 is not allowed"),
    ({"resolution": 0}, "resolution=0 is not allowed"),
    ({"resolution": 30}, "multiples of 4 pixels"),
    ({"resolution": 64}, "at most 32 pixels"),
    ({"guidance": -2}, "guidance=-2"),
    ({"guidance": float("nan")}, "guidance=nan"),
    ({"threshold": 5}, "threshold=5"),
    ({"threshold": -1}, "threshold=-1"),
    ({"threshold": float("nan")}, "threshold=nan"),
    ({"max_prompts": -1}, "max_prompts=-1"),
    ({"max_prompts": 0}, "max_prompts=0"),
    ({"prompts": "toy", "n": 0}, "n=0"),
    ({"prompts": "toy", "n": -3}, "n=-3"),
    ({"prompts": []}, "prompts=[] is empty"),
    ({"prompts": [PromptItem("a", 5, 0)]}, "prompt 'a': prompt=5"),
    ({"prompts": [PromptItem("a b", "a red circle", 0)]}, "letters, digits"),
    ({"prompts": [PromptItem("a", "a red circle", 1.5)]}, "seed=1.5"),
    ({"prompts": [PromptItem("a", "a red circle", 0)]}, "toy masks need Shapes-world prompts"),
    ({"blocks": [9]}, "blocks=[9] is not allowed: the model has blocks 0..5"),
    ({"blocks": [1, 1]}, "names [1] more than once"),
    ({"record_steps": [5]}, "record_steps=[5] is not allowed: there are 4 steps (0..3)"),
    ({"record_steps": [-1]}, "record_steps=[-1]"),
    ({"kinds": ["t2i", "x2y"]}, "kinds must be"),
    ({"grids": []}, "grids must be"),
    ({"words": "circle"}, "words='circle'"),
    ({"words": [3]}, "words must be"),
    ({"maps_dtype": "int8"}, "maps_dtype='int8'"),
    ({"seed": 0.5}, "seed=0.5"),
])
def test_bad_options_are_refused_before_anything_is_written(toy, tmp_path, options, match):
    """Every option is checked (against the model too) before OUT exists, so the corrected rerun just runs."""
    options = {"prompts": toy_prompts(2), "num_steps": STEPS, **options}
    prompts = options.pop("prompts")
    with pytest.raises(InvalidInput) as error:
        sweep(toy, prompts, tmp_path / "out", progress=False, **options)
    assert match in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_corrected_rerun_is_not_refused_as_other_options(toy, tmp_path):
    with pytest.raises(InvalidInput, match="blocks"):
        sweep(toy, toy_prompts(1), tmp_path, num_steps=2, blocks=[0, 9], progress=False)
    assert list(tmp_path.iterdir()) == []
    assert sweep(toy, toy_prompts(1), tmp_path, num_steps=2, blocks=[0, 5], grids=["tokens"], progress=False).complete


def test_prompt_file_errors_name_the_file_and_line(tmp_path):
    from mmdit_probe.sweep import load_prompts

    files = {
        "empty.txt": ("# nothing here\n\n", "empty.txt holds no prompts"),
        "garbled.jsonl": ('{"prompt": "a red circle"}\n\n{"prompt": "a blue\n',
                          "garbled.jsonl, line 3: not valid JSON"),
        "list.jsonl": ('["a red circle"]\n', "list.jsonl, line 1: give a JSON object"),
        "number.jsonl": ('{"prompt": 5}\n', "number.jsonl, line 1: prompt=5 (int) is not allowed"),
        "no_prompt.jsonl": ('{"text": "a red circle"}\n', 'no_prompt.jsonl, line 1: no "prompt"'),
        "seed.jsonl": ('{"prompt": "a", "seed": "7"}\n', "seed.jsonl, line 1: seed='7' (str) is not allowed"),
        "types.jsonl": ('{"prompt": "a", "word_types": ["cat"]}\n', "types.jsonl, line 1: word_types="),
        "type_all.jsonl": ('{"prompt": "a cat", "word_types": {"cat": "all"}}\n',
                           "type_all.jsonl, line 1: word_types={'cat': 'all'}: the type 'all' names every word"),
        "ids.jsonl": ('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n',
                      "ids.jsonl, line 2: the id 'x' is already used on line 1"),
        "bad_id.jsonl": ('{"prompt": "a", "id": "../x"}\n', "bad_id.jsonl, line 1: the id '../x' names a file"),
    }
    for name, (text, match) in {"missing.txt": (None, "missing.txt does not exist"), **files}.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(InvalidInput) as error:
            load_prompts(tmp_path / name)
        assert match in str(error.value) and str(tmp_path) in str(error.value), str(error.value)
    with pytest.raises(InvalidInput, match="is a folder"):
        load_prompts(tmp_path)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 a red circle")
    with pytest.raises(InvalidInput, match="binary.txt is not a UTF-8 text file"):
        load_prompts(tmp_path / "binary.txt")


class _SomeMasks(ToyMasks):
    """The toy ground truth, but no mask at all for the prompts in `unmasked` and an error for those in `broken`
    (as Grounding-DINO finds nothing for words it cannot see, or a mask folder lacks a file)."""

    def __init__(self, unmasked=(), broken=()):
        self.unmasked, self.broken = set(unmasked), set(broken)

    def __call__(self, item, image, words):
        if item.id in self.broken:
            raise RuntimeError(f"detector crashed on {item.id}")
        return {} if item.id in self.unmasked else super().__call__(item, image, words)


def test_a_prompt_whose_words_all_have_no_mask_is_recorded_unscored(toy, full_run, tmp_path):
    _, reference = full_run
    result = sweep(toy, toy_prompts(2), tmp_path, masks=_SomeMasks(unmasked={"toy00001"}), num_steps=STEPS,
                   progress=False)
    assert result.complete and result.failed == {}
    meta, _ = read_record(tmp_path / "records" / "toy00001.safetensors")
    assert meta["words"] == [] and [w for _, w in meta["unmasked"]][:4] == ["right", "large", "blue", "circle"]
    table = pq.read_table(result.table)
    unscored = table.filter(pc.invert(table["scored"]))
    assert unscored.column("prompt_id").unique().to_pylist() == ["toy00001"]
    assert unscored.num_rows == len(meta["unmasked"]) and unscored.column("value").null_count == unscored.num_rows
    scored = table.filter(table["scored"])
    assert scored.equals(reference.filter(pc.equal(reference["prompt_id"], "toy00000")))
    report = sweep_report(tmp_path, figures=False)  # the unscored rows stay out of every mean
    assert report["prompts"] == 1


def test_a_failing_prompt_is_recorded_the_sweep_goes_on_and_a_rerun_retries_it(toy, full_run, tmp_path):
    _, reference = full_run
    first = sweep(toy, toy_prompts(3), tmp_path, masks=_SomeMasks(broken={"toy00001"}), num_steps=STEPS,
                  progress=False)
    assert (first.done, first.total, first.complete) == (2, 3, False)
    assert first.failed == {"toy00001": "RuntimeError: detector crashed on toy00001"}
    meta, _ = read_record(tmp_path / "records" / "toy00001.safetensors")
    assert meta["failed"] == "RuntimeError: detector crashed on toy00001" and "Traceback" in meta["traceback"]
    assert pq.read_table(first.table).column("prompt_id").unique().to_pylist() == ["toy00000", "toy00002"]
    kept = {n: (tmp_path / "records" / f"{n}.safetensors").stat().st_mtime_ns for n in ("toy00000", "toy00002")}
    second = sweep(toy, toy_prompts(3), tmp_path, masks=_SomeMasks(), num_steps=STEPS, progress=False)
    assert second.complete and second.failed == {}
    assert all((tmp_path / "records" / f"{n}.safetensors").stat().st_mtime_ns == t for n, t in kept.items())
    done = pq.read_table(second.table)
    assert done.equals(reference.filter(pc.is_in(reference["prompt_id"], pa.array(["toy00000", "toy00001",
                                                                                      "toy00002"]))))
    with pytest.raises(RuntimeError, match="detector crashed"):  # keep_going=False: the first failure stops it
        sweep(toy, toy_prompts(3), tmp_path / "strict", masks=_SomeMasks(broken={"toy00000"}), num_steps=STEPS,
              keep_going=False, progress=False)


def test_the_cli_says_how_many_prompts_failed_and_exits_1(tmp_path, capsys, monkeypatch):
    from mmdit_probe.cli import main

    monkeypatch.setattr("mmdit_probe.sweep.masks.mask_source", lambda spec: _SomeMasks(broken={"toy00000"}))
    argv = ["sweep", "toy", "--prompts", "toy", "--num-prompts", "2", "--steps", "2", "--grids", "tokens",
            "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert "1 of 2 prompts done, 1 failed" in out
    assert err.strip().splitlines()[-1].startswith("mmdit-probe sweep: error: PromptsFailed: 1 of 2 prompts failed: "
                                                   "toy00000 (RuntimeError: detector crashed on toy00000)")
    with pytest.raises(RuntimeError, match="detector crashed on toy00000"):  # --debug: the prompt's own traceback
        main([*argv[:-1], str(tmp_path / "debug"), "--debug"])


def test_report_top_k_and_ranking_options_are_checked(full_run):
    result, _ = full_run
    for top_k, match in ((-1, "top_k=-1"), (0, "top_k=0"), (99, "there are only 6 blocks"), (2.5, "top_k=2.5")):
        with pytest.raises(InvalidInput, match=match):
            sweep_report(result.out, top_k=top_k, figures=False)
    for options, match in (({"metric": "auc"}, "metric='auc'"), ({"kind": "concept"}, "kind='concept'"),
                           ({"grid": "voxels"}, "grid='voxels'")):
        with pytest.raises(InvalidInput, match=match):
            sweep_report(result.out, figures=False, **options)
    assert sweep_report(result.out, top_k=6, figures=False)["top_layers"] == [
        r["block"] for r in sweep_report(result.out, top_k=6, figures=False)["ranking"]]

"""The `mmdit-probe` command, as the README's main job runs it (on the toy model, few steps)."""

import json

from PIL import Image

from mmdit_probe.cli import main

SOURCE = "on the left a large red circle and on the right a small blue square on a white background"
TARGET = "on the left a large green circle and on the right a small blue square on a white background"


def test_maps_with_an_edit_writes_every_picture(tmp_path, capsys):
    main(["maps", "toy", SOURCE, "--out", str(tmp_path), "--steps", "4", "--edit", TARGET])
    for name in ("image.png", "t2i_vs_i2t.png", "t2i_by_block.png", "i2t_by_block.png", "t2i_by_step.png",
                 "edit/source.png", "edit/edited.png", "edit/params.json"):
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / "image.png").size == (32, 32)
    # the edit's source row is the plain generation of the same prompt, seed and steps
    assert Image.open(tmp_path / "edit/source.png").tobytes() == Image.open(tmp_path / "image.png").tobytes()
    assert sorted(tmp_path.glob("edit/mask_step*.png")), "local blending wrote no masks"
    assert "images" not in json.loads((tmp_path / "edit/params.json").read_text())  # no --image: as before
    assert "wrote" in capsys.readouterr().out


def test_info_lists_hook_points(capsys):
    main(["info", "toy", "--hooks", "--prompt", "a red circle"])
    out = capsys.readouterr().out
    assert "blocks.0.attn.hook_q_img" in out and "red" in out


def test_help_names_every_supported_family_from_one_list():
    """`FAMILY_TITLES` (torch-free, for --help) has one title per family adapter, and the help names each."""
    from mmdit_probe.cli import parser
    from mmdit_probe.constants import FAMILY_TITLES
    from mmdit_probe.families import FAMILIES

    assert list(FAMILY_TITLES) == list(FAMILIES)
    assert all(title in parser().description for title in FAMILY_TITLES.values())

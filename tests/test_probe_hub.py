"""A hub checkpoint's pipeline class is checked from its model_index.json alone, before any weights download; offline,
the same message as a failed load always gave. The hub is mocked: tests run offline."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
from diffusers import DiffusionPipeline

import mmdit_probe
from mmdit_probe.cli import main


class Loading(Exception):
    """Raised by the stand-in `from_pretrained`: loading had begun."""


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub whose checkpoints' model_index.json names this class; `from_pretrained` records its call and
    raises `Loading`."""
    loads = []

    def from_pretrained(*args, **kwargs):
        loads.append(args)
        raise Loading

    def checkpoint(class_name: str) -> list:
        index = tmp_path / "model_index.json"
        index.write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42.1"}))
        monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: None)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **k: str(tmp_path / name))
        monkeypatch.setattr(DiffusionPipeline, "from_pretrained", from_pretrained)
        return loads
    return checkpoint


@pytest.mark.parametrize("class_name, match", [
    ("Flux2KleinKVPipeline", r"'Flux2KleinKVPipeline': it runs the reference images' tokens at the first step only"),
    ("StableDiffusionXLPipeline", r"unsupported pipeline class 'StableDiffusionXLPipeline'; mmdit_probe supports"),
])
def test_a_hub_checkpoint_of_a_class_not_taken_is_refused_before_any_weights(hub, class_name, match):
    loads = hub(class_name)
    with pytest.raises(TypeError, match=match):
        mmdit_probe.load("someone/some-checkpoint")
    assert loads == []


def test_the_cli_refuses_it_with_exit_2(hub, capsys):
    loads = hub("Flux2KleinKVPipeline")
    with pytest.raises(SystemExit) as exit_:
        main(["info", "someone/some-kv-checkpoint"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "mmdit_probe.load(Flux2KleinPipeline" in err, err
    assert loads == []


def test_a_hub_checkpoint_of_a_supported_class_goes_on_to_load(hub):
    loads = hub("FluxPipeline")
    with pytest.raises(Loading):
        mmdit_probe.load("someone/some-flux")
    assert [a[0] for a in loads] == ["someone/some-flux"]


def test_the_hubs_own_refusal_stays_in_the_message(monkeypatch):
    """A private repo or a wrong id: the hub answers, nothing is cached, and the answer is what the user reads."""
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx  # the hub's HTTP client, whose responses its errors carry

    def refused(*args, **kwargs):
        url = "https://huggingface.co/api/models/someone/private"
        raise HfHubHTTPError(f"401 Client Error: Unauthorized for url: {url}",
                             response=httpx.Response(401, request=httpx.Request("GET", url)))
    monkeypatch.setattr(huggingface_hub, "model_info", refused)
    with pytest.raises(OSError) as error:
        mmdit_probe.load("someone/private")
    assert "the hub refused it (401 Client Error: Unauthorized" in str(error.value)
    assert "no copy is cached" in str(error.value)


def test_offline_a_hub_id_gives_the_message_it_always_gave():
    with pytest.raises(OSError) as error:
        mmdit_probe.load("nobody/no-such-model")
    said = str(error.value)
    assert said.startswith("could not load 'nobody/no-such-model': ")
    assert ("Without network access, download the checkpoint on a machine that has it (e.g. `hf download "
            "nobody/no-such-model --local-dir DIR`) and call mmdit_probe.load('DIR'). Known presets: ") in said

"""Shared fixtures: the tiny pipelines, saved once and loaded through `mmdit_probe.load(path)`."""

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import mmdit_probe
from mmdit_probe.testing import TINY_GENERATION_KWARGS, TINY_KINDS, save_tiny_pipeline

diffusers_logging.disable_progress_bar()
# Tiny matmuls gain nothing from threads, and a thread sharing a busy core stalls every op.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an in-process command before it set (bit-for-bit comparisons of
    batched runs hold only for a fixed thread count)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: str(save_tiny_pipeline(kind, root / kind)) for kind in TINY_KINDS}


@pytest.fixture(params=TINY_KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def probe(kind, tiny_dirs):
    """A fresh probe per test (tests may remove taps or patch)."""
    return mmdit_probe.load(tiny_dirs[kind])


def tiny_inputs(probe, kind, prompts, **overrides):
    """Pipeline arguments for a tiny model: its test sizes, shared noise, latent output."""
    kw = dict(TINY_GENERATION_KWARGS[kind])
    kw.update(overrides)
    return probe.inputs(prompts, seed=0, steps=kw.pop("num_inference_steps"), guidance=kw.pop("guidance_scale"),
                        output_type="latent", **kw)


def stock_kernel_calls(probe, inputs, monkeypatch, module):
    """Run the pipeline with the stock processors (taps removed), keeping each (q, k, mask) they hand
    `module.dispatch_attention_fn` (q and k as (batch, heads, tokens, dim)), in call order; and the stock output."""
    calls, original = [], module.dispatch_attention_fn

    def keep(query, key, value, attn_mask=None, **options):
        calls.append((query.transpose(1, 2).clone(), key.transpose(1, 2).clone(),
                      None if attn_mask is None else attn_mask.clone()))
        return original(query, key, value, attn_mask=attn_mask, **options)

    probe.family.remove_taps()
    monkeypatch.setattr(module, "dispatch_attention_fn", keep)
    try:
        images = probe.pipeline(**inputs).images
    finally:
        monkeypatch.undo()
        probe.family.install_taps()
    return calls, images


def record_all_calls(probe, inputs, recorder):
    """Generate with `recorder` reading every transformer call (`recorder.calls`: the steps, or two calls per step
    where guidance is a second call); returns (maps, the pipeline's saved output)."""
    with probe.model.generate(**inputs) as tracer:
        for call in tracer.iter[0:recorder.calls]:
            recorder.record(call)
        output = probe.model.output.save()
    return recorder.maps(), output


def first_noise_prediction(probe, inputs):
    """The transformer's output in the pipeline's first call on these inputs (the whole run goes on unchanged)."""
    seen = []
    with probe.pipeline.transformer.register_forward_hook(lambda m, a, k, out: seen.append(out[0]), with_kwargs=True):
        probe.pipeline(**inputs)
    return seen[0]

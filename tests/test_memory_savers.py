"""What a 24 GB GPU needs for Flux.1-dev: model CPU offload and quantized transformers, with taps.

Offload moves each model to the accelerator when it runs; on this CPU-only machine it is installed
with the CPU as its "accelerator", which exercises the same accelerate hooks around the same modules.
"""

import pytest
import torch
from conftest import tiny_inputs

import mmdit_probe

PROMPTS = ["a red cat on a mat"]


def _generation(probe, kind):
    inputs = tiny_inputs(probe, kind, PROMPTS)
    return {"steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"], "height": inputs["height"],
            "width": inputs["width"], "output_type": "latent"}


def _record(probe, kind):
    out = probe.generate(PROMPTS, record=True, **_generation(probe, kind))
    return out, out.inputs


def _edit(probe, kind):
    return probe.edit("a red cat on a mat", "a blue cat on a mat", **_generation(probe, kind))


def _stock(probe, inputs):
    probe.family.remove_taps()
    try:
        return probe.pipeline(**inputs).images
    finally:
        probe.family.install_taps()


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_model_cpu_offload_records_and_edits(tiny_dirs, kind):
    probe = mmdit_probe.load(tiny_dirs[kind])
    # Offload moves each model's weights out of the safetensors memory map into fresh, 64-byte-aligned memory, and
    # some CPUs' matmul kernels round differently on differently aligned operands (seen on an AMD EPYC: 2e-6). Both
    # runs use weights in fresh memory, so what is compared is recording with and without offload, not alignment.
    for model in probe.pipeline.components.values():
        if isinstance(model, torch.nn.Module):
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.data = tensor.data.clone()
    before, _ = _record(probe, kind)
    probe.pipeline.enable_model_cpu_offload(device="cpu")
    after, inputs = _record(probe, kind)
    assert torch.equal(after.maps.t2i, before.maps.t2i) and torch.equal(after.maps.i2t, before.maps.i2t)
    # Recording under offload leaves the offloaded pipeline's output untouched, bit for bit.
    assert torch.equal(after.images, _stock(probe, inputs))
    edited = _edit(probe, kind)
    assert torch.isfinite(edited.edited_image).all() and len(edited.masks) == len(edited.params["blend_steps"])


@pytest.mark.parametrize("kind", ["sd3", "flux-dev"])
def test_int8_weight_only_transformer_records_and_edits(tiny_dirs, kind):
    quantization = pytest.importorskip("torchao.quantization")
    probe = mmdit_probe.load(tiny_dirs[kind])
    quantization.quantize_(probe.pipeline.transformer, quantization.Int8WeightOnlyConfig())
    out, inputs = _record(probe, kind)
    assert torch.equal(out.images, _stock(probe, inputs))  # taps and recording change no bit
    assert torch.isfinite(out.maps.t2i).all()
    assert torch.isfinite(_edit(probe, kind).edited_image).all()
    with pytest.raises(ValueError, match="call fuse_qkv_projections\\(\\) first, then quantize"):
        probe.fuse_qkv_projections()
    assert probe.family.taps_installed()


def test_fused_then_quantized_keeps_its_taps(tiny_dirs):
    quantization = pytest.importorskip("torchao.quantization")
    probe = mmdit_probe.load(tiny_dirs["sd3"])
    probe.fuse_qkv_projections()
    quantization.quantize_(probe.pipeline.transformer, quantization.Int8WeightOnlyConfig())
    out, inputs = _record(probe, "sd3")
    assert torch.equal(out.images, _stock(probe, inputs))

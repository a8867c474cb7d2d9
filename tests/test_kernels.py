"""The log-sum-exp comes from the kernel scaled_dot_product_attention runs, checked, with a fallback."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_inputs
from torch.nn.attention import SDPBackend

from mmdit_probe import kernels
from mmdit_probe.attention import AttentionRecorder
from mmdit_probe.maps import _gaussian_on_device, smooth


def _inputs(dtype=torch.float32, tokens=300):
    torch.manual_seed(0)
    # Strided like Flux's taps: (batch, tokens, heads, dim) transposed into (batch, heads, tokens, dim).
    return [torch.randn(2, tokens, 3, 16).to(dtype).transpose(1, 2) for _ in range(3)]


@pytest.fixture(autouse=True)
def fresh_checks():
    kernels._trusted.clear()
    yield
    kernels._trusted.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_takes_the_kernel_that_sdpa_runs(dtype):
    q, k, v = _inputs(dtype)
    assert kernels.fused_backend(q, k, v) == SDPBackend.FLASH_ATTENTION
    out, lse = kernels.attention_with_lse(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert lse.shape == (2, 3, 300) and lse.dtype == torch.float32
    logits = q.double() @ k.double().transpose(-1, -2) / 4
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=0, atol=1e-4)
    assert list(kernels._trusted.values()) == [True]


def test_a_kernel_whose_lse_disagrees_is_dropped_with_a_warning(monkeypatch):
    q, k, v = _inputs()
    wrong = lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), kernels.chunked_logsumexp(q, k) / 2)
    monkeypatch.setitem(kernels._FUSED, ("cpu", SDPBackend.FLASH_ATTENTION), wrong)
    with pytest.warns(UserWarning, match="log-sum-exp is .* nats from the float32 reference"):
        out, lse = kernels.attention_with_lse(q, k, v)
    assert torch.equal(lse, kernels.chunked_logsumexp(q, k))
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    kernels.attention_with_lse(q, k, v)  # decided once: no second warning (pytest would fail on an error here)
    assert list(kernels._trusted.values()) == [False]


def test_a_kernel_whose_output_differs_is_dropped(monkeypatch):
    q, k, v = _inputs()
    off = lambda q, k, v: (F.scaled_dot_product_attention(q, k, v) + 1e-7, kernels.chunked_logsumexp(q, k))
    monkeypatch.setitem(kernels._FUSED, ("cpu", SDPBackend.FLASH_ATTENTION), off)
    with pytest.warns(UserWarning, match="output differs from scaled_dot_product_attention's"):
        out, _ = kernels.attention_with_lse(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_padded_lse_is_cut_to_the_queries(monkeypatch):
    q, k, v = _inputs(tokens=40)
    # The efficient kernel pads its log-sum-exp's query dimension to a multiple of 32.
    padded = lambda q, k, v: (F.scaled_dot_product_attention(q, k, v),
                              F.pad(kernels.chunked_logsumexp(q, k), (0, 24), value=float("nan")))
    monkeypatch.setitem(kernels._FUSED, ("cpu", SDPBackend.FLASH_ATTENTION), padded)
    _, lse = kernels.attention_with_lse(q, k, v)
    assert lse.shape == (2, 3, 40) and torch.isfinite(lse).all()


def test_math_path_falls_back_to_the_chunked_lse(monkeypatch):
    q, k, v = _inputs()
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **kw: SDPBackend.MATH.value)
    assert kernels.fused_backend(q, k, v) is None
    out, lse = kernels.attention_with_lse(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(lse, kernels.chunked_logsumexp(q, k))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 5), (8, 8), (64, 48)])
def test_device_smoothing_is_scipys_filter(shape):
    torch.manual_seed(0)
    m = torch.rand(shape)
    torch.testing.assert_close(_gaussian_on_device(m, 3, 1.0), smooth(m), rtol=0, atol=3e-7)


def test_step_maps_are_the_running_steps_only(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    inputs = tiny_inputs(probe, "sd3", ["a red cat on a mat", "a blue dog on a mat"])
    recorder = AttentionRecorder(probe, inputs, blocks=[0, 1], kinds=["t2i"], dtype=torch.float32)
    seen = {}
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record(step)
            seen[step] = recorder.step_maps(step).clone().save()
    maps = recorder.maps()
    for step, stacked in seen.items():
        assert torch.equal(stacked, maps.t2i[step])
    with pytest.raises(KeyError, match="reads the step being recorded"):
        recorder.step_maps(0)


def test_a_step_with_missing_blocks_is_refused(tiny_dirs):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    inputs = tiny_inputs(probe, "sd3", ["a red cat on a mat"])
    recorder = AttentionRecorder(probe, inputs, blocks=[0, 1], kinds=["t2i"])
    with probe.model.generate(**inputs) as tracer:
        for step in tracer.iter[0:inputs["num_inference_steps"]]:
            recorder.record_block(step, 0)
    with pytest.raises(RuntimeError, match="recorded for only some blocks of a step"):
        recorder.maps()

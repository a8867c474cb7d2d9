"""RF-Solver and FireFlow: their steps against hand-computed ones, their cost in model calls, their accuracy
against Euler, and the exact limits of their value-sharing edits, on every tiny family."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_inputs

from mmdit_probe.editing.fireflow import FIREFLOW_EDIT, FireFlow, fireflow_edit
from mmdit_probe.editing.inversion import invert_latents, sample_latents, sampler_velocity, solve
from mmdit_probe.editing.rf_solver import RF_SOLVER_EDIT, RFSolver, rf_solver_edit
from mmdit_probe.validation import InvalidInput

SOURCE, TARGET = "a red cat on a mat", "a blue dog on a mat"
EDITS = {"rf-solver": rf_solver_edit, "fireflow": fireflow_edit}


def generation(inputs) -> dict:
    return {"steps": inputs["num_inference_steps"], "guidance": inputs["guidance_scale"], "height": inputs["height"],
            "width": inputs["width"], "max_sequence_length": inputs["max_sequence_length"]}


def test_steps_match_hand_computed_ones(probe, kind):
    inputs = tiny_inputs(probe, kind, SOURCE, num_inference_steps=3)
    velocity, sigmas = sampler_velocity(probe, inputs)
    x = inputs["latents"]
    s0, s1, s2 = (float(s) for s in sigmas[:3])
    with torch.no_grad():
        # RF-Solver: the velocity's derivative from a half-step finite difference, then the Taylor step.
        h = s1 - s0
        v = velocity(x, s0)
        v_half = velocity(x + h / 2 * v, s0 + h / 2)
        by_hand = x + h * v + h**2 / 2 * (v_half - v) / (h / 2)
        assert torch.equal(RFSolver()(velocity, x, s0, s1), by_hand)
        assert torch.allclose(by_hand, x + h * v_half, atol=1e-5)  # the same as the midpoint rule, up to rounding
        # FireFlow, two steps: the second starts from the first one's midpoint velocity (no new call).
        first = x + h * v_half
        h2 = s2 - s1
        second = first + h2 * velocity(first + h2 / 2 * v_half, s1 + h2 / 2)
        step = FireFlow()
        assert torch.equal(step(velocity, step(velocity, x, s0, s1), s1, s2), second)


@pytest.mark.parametrize("method, calls", [("rf-solver", lambda n: 2 * n), ("fireflow", lambda n: n + 1)])
def test_model_calls_per_trajectory(tiny_dirs, method, calls):
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["flux-dev"])
    counted = []
    handle = probe.pipeline.transformer.register_forward_hook(lambda *_: counted.append(1))
    try:
        for n in (2, 5):
            inputs = tiny_inputs(probe, "flux-dev", SOURCE, num_inference_steps=n)
            counted.clear()
            clean = sample_latents(probe, inputs, method)
            assert len(counted) == calls(n)
            counted.clear()
            invert_latents(probe, clean, SOURCE, method=method, **generation(inputs))
            assert len(counted) == calls(n)
    finally:
        handle.remove()


def test_second_order_solvers_beat_euler_on_a_smooth_flow():
    """dx/dσ = -2σ x (exact solution x(σ) = x(1) exp(1 - σ²)), inverted from σ = 0 and sampled back."""
    velocity = lambda x, sigma: -2 * sigma * x  # noqa: E731
    clean = torch.linspace(-1, 1, 11, dtype=torch.float64)
    exact_noise = clean * torch.exp(torch.tensor(-1.0, dtype=torch.float64))

    def euler(x, sigmas):
        for a, b in zip(sigmas[:-1], sigmas[1:]):
            x = x + (float(b) - float(a)) * velocity(x, float(a))
        return x

    def errors(n: int) -> dict[str, float]:
        down = torch.linspace(1, 0, n + 1, dtype=torch.float64)
        found = {"euler": (euler(clean, down.flip(0)) - exact_noise).abs().max().item()}
        for method in ("rf-solver", "fireflow"):
            found[method] = (solve(velocity, clean, down.flip(0), method) - exact_noise).abs().max().item()
            roundtrip = solve(velocity, solve(velocity, clean, down.flip(0), method), down, method)
            found[f"{method} roundtrip"] = (roundtrip - clean).abs().max().item()
        found["euler roundtrip"] = (euler(euler(clean, down.flip(0)), down) - clean).abs().max().item()
        return found

    coarse, fine = errors(8), errors(16)
    for method in ("rf-solver", "fireflow"):
        assert coarse[method] < coarse["euler"] / 5 and coarse[f"{method} roundtrip"] < coarse["euler roundtrip"] / 5
    order = {m: torch.log2(torch.tensor(coarse[m] / fine[m])).item() for m in ("euler", "rf-solver", "fireflow")}
    assert 0.8 < order["euler"] < 1.2 and order["rf-solver"] > 1.8 and order["fireflow"] > 1.8


def test_own_sampler_roundtrip_beats_euler_on_the_tiny_models(probe, kind):
    inputs = tiny_inputs(probe, kind, SOURCE, num_inference_steps=4)
    noise = inputs["latents"]

    def error(x):
        return ((x - noise).abs().mean() / noise.abs().mean()).item()

    clean = probe.pipeline(**inputs).images
    clean = probe.family.pack_latents(clean) if clean.ndim == 4 and kind.startswith("flux") else clean
    clean = probe.family.transformer_output(clean, noise)  # Flux.2 dev's latent output is packed, its noise a grid
    euler = error(invert_latents(probe, clean, SOURCE, method="euler", **generation(inputs)))
    for method in ("rf-solver", "fireflow"):
        mine = error(invert_latents(probe, sample_latents(probe, inputs, method), SOURCE, method=method,
                                    **generation(inputs)))
        assert mine < euler / 4


@pytest.mark.parametrize("method", list(EDITS))
def test_no_sharing_is_the_plain_pair_and_sharing_edits_only_the_target(probe, kind, method):
    inputs = tiny_inputs(probe, kind, [SOURCE, TARGET], num_inference_steps=3)
    plain = sample_latents(probe, inputs, method)
    edit = EDITS[method]
    unshared = edit(probe, SOURCE, TARGET, inject=0, output_type="latent", **generation(inputs))
    assert torch.equal(unshared.source_image, plain[0]) and torch.equal(unshared.edited_image, plain[1])
    assert unshared.params["inject_steps"] == [] and unshared.params["solver"] == method
    every = list(range(probe.family.num_blocks))
    shared = edit(probe, SOURCE, TARGET, inject=3, blocks=every, output_type="latent", **generation(inputs))
    assert torch.equal(shared.source_image, plain[0]) and not torch.equal(shared.edited_image, plain[1])


def test_shared_values_are_the_sources(tiny_dirs):
    """A hook placed after the edit's own reads the target's values: in shared blocks and steps they are the
    source's, elsewhere the target's own."""
    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    inputs = tiny_inputs(probe, "sd3", [SOURCE, TARGET], num_inference_steps=3)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    module = {b: probe.module(f"blocks.{b}.attn.hook_v_img") for b in (0, 1)}
    original = module[1].register_forward_hook

    def register_after(hook, *args, **kwargs):  # the edit's hook, then the reader behind it
        handle = original(hook, *args, **kwargs)
        reader = original(lambda m, a, v: seen[1].append(v.clone()))
        return SimpleNamespace(remove=lambda: (handle.remove(), reader.remove()))

    module[1].register_forward_hook = register_after
    other = module[0].register_forward_hook(lambda m, a, v: seen[0].append(v.clone()))
    try:
        rf_solver_edit(probe, SOURCE, TARGET, inject=1, blocks=[1], output_type="latent", **generation(inputs))
    finally:
        other.remove()
        del module[1].register_forward_hook
    # SD3 under guidance: rows [uncond source, uncond target, cond source, cond target]; 2 calls a step.
    for call, v in enumerate(seen[1]):
        assert torch.equal(v[[1, 3]], v[[0, 2]]) == (call < 2)
    assert not any(torch.equal(v[[1, 3]], v[[0, 2]]) for v in seen[0])


def test_real_image_edit_inverts_with_the_same_solver_at_guidance_one(tiny_dirs):
    import mmdit_probe
    from mmdit_probe.editing.inversion import _encode

    probe = mmdit_probe.load(tiny_dirs["sd3"])
    inputs = tiny_inputs(probe, "sd3", [SOURCE, TARGET], num_inference_steps=3)
    image = probe.generate(SOURCE, **generation(inputs)).images[0]
    inverted = probe.invert(image, SOURCE, method="fireflow", **generation(inputs))
    assert inverted.method == "fireflow" and inverted.error < probe.invert(image, SOURCE, method="euler",
                                                                           **generation(inputs)).error
    result = fireflow_edit(probe, SOURCE, TARGET, image=image, inject=0, output_type="latent", **generation(inputs))
    assert result.params["inversion_guidance"] == 1.0
    # By hand: invert at guidance 1 (published), then sample both prompts at the model's guidance.
    noise = invert_latents(probe, _encode(probe, image, 64, 64), SOURCE, method="fireflow",
                           **{**generation(inputs), "guidance": 1.0})
    plain = sample_latents(probe, {**inputs, "latents": noise.expand_as(inputs["latents"]).clone()}, "fireflow")
    assert torch.equal(result.source_image, plain[0]) and torch.equal(result.edited_image, plain[1])


def test_published_blocks_and_steps():
    flux = SimpleNamespace(name="flux", num_blocks=57, num_double=19)
    sd3_medium = SimpleNamespace(name="sd3", num_blocks=24)
    assert RF_SOLVER_EDIT.blocks(flux) == list(range(39, 57))  # single-stream blocks 20-37
    assert FIREFLOW_EDIT.blocks(flux) == list(range(19, 57))  # all 38 single-stream blocks
    assert RF_SOLVER_EDIT.blocks(sd3_medium) == list(range(16, 24))
    assert FIREFLOW_EDIT.blocks(sd3_medium) == list(range(8, 24))
    assert RF_SOLVER_EDIT.inject_steps(25) == 3 and FIREFLOW_EDIT.inject_steps(8) == 1
    assert RF_SOLVER_EDIT.inject_steps(2) == 1  # at least one step shares


def test_bad_input_is_refused(tiny_dirs):
    from PIL import Image

    import mmdit_probe

    probe = mmdit_probe.load(tiny_dirs["flux-schnell"])
    inputs = tiny_inputs(probe, "flux-schnell", [SOURCE, TARGET])
    g = generation(inputs)
    with pytest.raises(InvalidInput, match="more than the 2 sampling steps"):
        rf_solver_edit(probe, SOURCE, TARGET, inject=3, **g)
    with pytest.raises(InvalidInput, match="inject"):
        fireflow_edit(probe, SOURCE, TARGET, inject=-1, **g)
    with pytest.raises(InvalidInput, match="out of range"):
        rf_solver_edit(probe, SOURCE, TARGET, blocks=[99], **g)
    with pytest.raises(InvalidInput, match="target prompt"):
        fireflow_edit(probe, SOURCE, "", **g)
    with pytest.raises(InvalidInput, match="not both"):
        rf_solver_edit(probe, SOURCE, TARGET, image=Image.new("RGB", (64, 64)), latents=inputs["latents"][:1], **g)
    with pytest.raises(InvalidInput, match="inversion_guidance"):
        fireflow_edit(probe, SOURCE, TARGET, image=Image.new("RGB", (64, 64)), inversion_guidance=-1, **g)
    with pytest.raises(InvalidInput, match="output_type"):
        rf_solver_edit(probe, SOURCE, TARGET, output_type="np", **g)
    with pytest.raises(InvalidInput, match="choose one of rf-solver, fireflow"):
        sample_latents(probe, inputs, "euler")
    with pytest.raises(InvalidInput, match="unknown inversion method"):
        invert_latents(probe, inputs["latents"][:1], SOURCE, method="rf_solver", **g)

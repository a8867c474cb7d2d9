"""Known checkpoints as data: family, sampling defaults, the paper's map layers, editing defaults.

Values follow the paper ("Exploring Multimodal Diffusion Transformers for Enhanced Prompt-based
Image Editing") and its public code; block numbers are global block indices (Flux: double-stream
0-18, then single-stream 19-56). Unknown checkpoints get their family's defaults.

>>> preset("sd3.5-large").top_layers
(18, 21, 20, 24, 16)
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "sd3", "flux", "chroma", "flux-kontext", "qwen_image", "qwen_image_edit(_plus)" or "flux2"
    hub_id: str | None
    steps: int
    guidance: float
    resolution: int
    max_sequence_length: int  # T5 tokens (zeros for SD3 without T5)
    top_layers: tuple[int, ...]  # blocks whose T2I maps are averaged for masks
    tau: float = 0.2  # fraction of steps with image q/k injection
    eta: float = 0.5  # fraction of steps with local blending
    theta: float = 0.3  # local-blend mask threshold
    inject_blocks: tuple[int, ...] | None = None  # None: every block
    notes: str = ""
    # Local blend and step windows (see `mmdit_probe.editing.qk_injection.edit`); these defaults are this package's,
    # `paper(preset)` gives the released code's.
    blend_pool: int = 1  # side of the max-pool of the aggregated map before thresholding (1: none)
    n_prev_steps: int | str = 1  # a mask from the maps of the last n blended steps ("all": every one so far)
    step_rounding: str = "ceil"  # "ceil": steps s < share * n; "floor": s < int(share * n)
    # The blocks the paper's released code really aggregates, where it differs from `top_layers`: its indices count
    # `transformer.attn_processors`, in which SD3.5-M's attn2 processors (blocks 0-12) take indices of their own.
    # There 7, 9, 8, 5, 10 name block 3 attn2, block 4 attn2, block 4 attn, block 2 attn2 and block 5 attn (the
    # order of diffusers 0.42's attn_processors; tests/test_paper_parity.py derives it). Its attn2 processors
    # store nothing, so it averaged blocks 4 and 5 only. None: the same as `top_layers`.
    run_top_layers: tuple[int, ...] | None = None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("sd3-medium", "sd3", "stabilityai/stable-diffusion-3-medium-diffusers", 28, 7.0, 1024, 256,
               (7, 8, 5, 4, 9), theta=0.3, notes="24 joint blocks, no qk-norm"),
        Preset("sd3.5-medium", "sd3", "stabilityai/stable-diffusion-3.5-medium", 28, 7.0, 1024, 256,
               (7, 9, 8, 5, 10), theta=0.2, run_top_layers=(4, 5),
               notes="blocks 0-12 also have attn2 (image-only); the paper's code counted attn2 "
                     "processors: as run, its top-5 averaged blocks 4 and 5 only (run_top_layers)"),
        Preset("sd3.5-large", "sd3", "stabilityai/stable-diffusion-3.5-large", 28, 7.0, 1024, 256,
               (18, 21, 20, 24, 16), theta=0.5, notes="38 joint blocks, qk rms-norm"),
        Preset("sd3.5-large-turbo", "sd3", "stabilityai/stable-diffusion-3.5-large-turbo", 4, 0.0, 1024, 256,
               (18, 21, 20, 24, 16), tau=0.25, theta=0.5, inject_blocks=tuple(range(30)),
               notes="few-step: inject in a subset of blocks or the edit sticks to the source"),
        Preset("flux.1-dev", "flux", "black-forest-labs/FLUX.1-dev", 28, 3.5, 1024, 512,
               (18, 17, 12, 14, 11), theta=0.3, notes="distilled guidance: no batch doubling"),
        Preset("flux.1-schnell", "flux", "black-forest-labs/FLUX.1-schnell", 4, 0.0, 1024, 256,
               (18, 17, 12, 14, 11), tau=0.25, theta=0.3, inject_blocks=tuple(range(38)),
               notes="few-step; T5 length 256"),
        # Qwen-Image's model card: 50 steps, true_cfg_scale=4.0 with negative_prompt=" ", 1328x1328 for 1:1. True
        # CFG is a second transformer call per step, which inversion and the editors other than q/k injection refuse,
        # so the default here is no guidance (one call per step); the pipeline's max_sequence_length default is 512.
        Preset("qwen-image", "qwen_image", "Qwen/Qwen-Image", 50, 1.0, 1328, 512, (30, 35, 40, 25, 45), theta=0.3,
               notes="60 double-stream blocks; published true_cfg_scale 4.0 (negative_prompt ' ') is a second "
                     "transformer call per step: recording, patching and probe.edit take it, inversion and the other "
                     "editors need guidance 1; top layers and theta are a guess until a sweep picks them"),
        # Qwen-Image-Edit (Qwen/Qwen-Image-Edit model card's diffusers example): 50 steps, true_cfg_scale=4.0 with
        # negative_prompt=" ", the output at the input image's aspect ratio, about 1024x1024. Qwen-Image-Edit-2509
        # (its model card's QwenImageEditPlusPipeline example): 40 steps, true_cfg_scale=4.0, guidance_scale=1.0,
        # negative_prompt=" ". (Read in copies of those examples: github.com/SnyderConsulting/qwen-image-training
        # inference_edit.py, github.com/yesidevelop/huggingface-models qwen-image-edit.py; the pipelines' own
        # __call__ defaults are true_cfg_scale=4.0, 50 steps.) As for qwen-image, the default here is no guidance
        # (true CFG is a second transformer call per step, which inversion and most editors refuse). Same transformer
        # as Qwen-Image: its top-layer guess.
        Preset("qwen-image-edit", "qwen_image_edit", "Qwen/Qwen-Image-Edit", 50, 1.0, 1024, 512, (30, 35, 40, 25, 45),
               theta=0.3, notes="60 double-stream blocks; the input image's tokens follow the image tokens; published "
                                "true_cfg_scale 4.0 (negative_prompt ' ') is a second transformer call per step: "
                                "recording, patching and probe.edit take it, inversion and the other editors need "
                                "guidance 1; top layers and theta are a guess until a sweep picks them"),
        Preset("qwen-image-edit-2509", "qwen_image_edit_plus", "Qwen/Qwen-Image-Edit-2509", 40, 1.0, 1024, 512,
               (30, 35, 40, 25, 45), theta=0.3,
               notes="QwenImageEditPlusPipeline: one or more input images, one prompt per call (maps and hooks; no "
                     "editing or patching, which run several prompts together); published true_cfg_scale 4.0 "
                     "(negative_prompt ' ') records as a second transformer call per step; top layers and theta are a "
                     "guess"),
        # Published settings from the model cards' diffusers examples; the top blocks are Flux.1-dev's, a guess (same
        # block layout) until a sweep over prompts picks them (`mmdit-probe sweep` on a GPU).
        Preset("chroma1-hd", "chroma", "lodestones/Chroma1-HD", 40, 3.0, 1024, 512,
               (18, 17, 12, 14, 11), theta=0.3,
               notes="guidance 3.0 runs a second transformer call per step: recording, patching and probe.edit take "
                     "it, inversion and the other editors need guidance 1; top layers are a guess (Flux.1-dev's) "
                     "until a sweep picks them"),
        Preset("flux.1-kontext-dev", "flux-kontext", "black-forest-labs/FLUX.1-Kontext-dev", 28, 2.5, 1024, 512,
               (18, 17, 12, 14, 11), theta=0.3,
               notes="distilled guidance; a context image (image=...) adds reference tokens after the image tokens; "
                     "top layers are a guess (Flux.1-dev's) until a sweep picks them"),
        # Flux.2: steps, guidance and size from the model cards' diffusers examples; FLUX.2-dev's card:
        # num_inference_steps=50 ("28 steps can be a good trade-off"), guidance_scale=4 (read in copies of it, e.g.
        # github.com/knix008/MachineLearning Flux2-Dev/Flux.2-Dev-Example01-CUDA.py; also `Flux2Pipeline.__call__`'s
        # defaults in diffusers 0.42.1, 50 and 4.0; its docstring example's guidance_scale=2.5 is the odd one out).
        # top_layers and Klein's inject_blocks are first guesses (late double-stream and early single-stream blocks),
        # to be replaced by a sweep's top_layers.json (`mmdit-probe sweep` on a GPU).
        Preset("flux.2-dev", "flux2", "black-forest-labs/FLUX.2-dev", 50, 4.0, 1024, 512, (6, 7, 8, 9, 5),
               theta=0.3, notes="8 double + 48 single blocks; Mistral-3 text encoder, chat template; distilled "
                                "guidance: no batch doubling; 28 steps a good trade-off (model card); top_layers a "
                                "guess"),
        Preset("flux.2-klein-4b", "flux2", "black-forest-labs/FLUX.2-klein-4B", 4, 1.0, 1024, 512, (3, 4, 5, 6, 2),
               tau=0.25, theta=0.3, inject_blocks=tuple(range(16)),
               notes="step-distilled (4 steps, no guidance); Qwen3 text encoder, chat template; top_layers and "
                     "inject_blocks a guess"),
        Preset("flux.2-klein-9b", "flux2", "black-forest-labs/FLUX.2-klein-9B", 4, 1.0, 1024, 512, (6, 7, 8, 9, 5),
               tau=0.25, theta=0.3, inject_blocks=tuple(range(20)),
               notes="step-distilled (4 steps, no guidance); Qwen3 text encoder, chat template; top_layers and "
                     "inject_blocks a guess"),
        # The Shapes-world model shipped in the package (mmdit_probe/toy): 32x32 pixels, 8x8 tokens.
        # Top blocks by T2I mIoU against generated-image masks (reports/toy/report.json). A higher θ
        # breaks background edits (README, "Editing on the Shapes world").
        Preset("toy", "sd3", None, 20, 4.0, 32, 4, (1, 3, 5, 0, 4), theta=0.3,
               notes="trained on the Shapes world; CLIP only, T5 zeros of length 4"),
    ]
}

# The paper's released code (SNU-VGILab/exploring-mmdit, utils/dit_utils.py): SD3's local blend max-pools the
# smoothed map 3x3 before thresholding, Flux's does not; masks average every blended step so far; a share of the
# steps keeps s < int(share * n).
PAPER_EDIT: dict[str, dict] = {
    "sd3": {"blend_pool": 3, "n_prev_steps": "all", "step_rounding": "floor"},
    "flux": {"blend_pool": 1, "n_prev_steps": "all", "step_rounding": "floor"},
}
PAPER_READINGS = ("printed", "run")


def paper(p: Preset, reading: str = "printed") -> Preset:
    """The preset with the released code's local blend and step windows. reading: "printed" keeps the top blocks
    as the paper prints them (block numbers); "run" takes the blocks its code really aggregates (`run_top_layers`:
    differs on SD3.5-M only).

    >>> paper(preset("sd3.5-medium"), "run").top_layers
    (4, 5)
    """
    if reading not in PAPER_READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose from {', '.join(PAPER_READINGS)}")
    top = p.run_top_layers if reading == "run" and p.run_top_layers is not None else p.top_layers
    return replace(p, top_layers=top, **{**PAPER_EDIT["flux"], **PAPER_EDIT.get(p.family, {})})


# The preset whose settings a family's unknown checkpoints get.
_FAMILY_PRESETS = {"sd3": "sd3-medium", "flux": "flux.1-dev", "qwen_image": "qwen-image",
                   "qwen_image_edit": "qwen-image-edit", "qwen_image_edit_plus": "qwen-image-edit-2509",
                   "chroma": "chroma1-hd", "flux-kontext": "flux.1-kontext-dev", "flux2": "flux.2-dev"}
FAMILY_DEFAULTS: dict[str, Preset] = {
    family: replace(PRESETS[name], name=f"{family} (family defaults)", hub_id=None)
    for family, name in _FAMILY_PRESETS.items()
}

_HUB_IDS = {p.hub_id.lower(): p for p in PRESETS.values() if p.hub_id}


def preset(name: str) -> Preset:
    """A preset by its short name (``"sd3-medium"``) or hub id; raises with the known names."""
    key = name.lower()
    if key in PRESETS:
        return PRESETS[key]
    if key in _HUB_IDS:
        return _HUB_IDS[key]
    raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} "
                   f"(or pass a hub id / local directory of a supported pipeline)")


def find_preset(source: str | None, family: str, transformer_config=None) -> Preset:
    """The preset for a loaded model: by preset name or hub id, else by the transformer's shape
    (a local copy of a known checkpoint), else the family defaults."""
    key = str(source or "").lower().rstrip("/")
    if key in PRESETS:
        return PRESETS[key]
    if key in _HUB_IDS:
        return _HUB_IDS[key]
    if transformer_config is not None:
        shaped = _by_shape(family, transformer_config, key)
        if shaped is not None:
            return shaped
    return FAMILY_DEFAULTS[family]


# Checkpoints that their family and transformer shape (num_layers, num_single_layers, num_attention_heads) name.
# The pipeline class tells Qwen-Image-Edit from Edit-2509 (QwenImageEditPlusPipeline); the transformer is Qwen-Image's.
# Edit-2511 runs on the Plus pipeline too, and gets 2509's preset: its shape is the same.
_SHAPES = {("qwen_image", (60, None, 24)): "qwen-image", ("qwen_image_edit", (60, None, 24)): "qwen-image-edit",
           ("qwen_image_edit_plus", (60, None, 24)): "qwen-image-edit-2509", ("chroma", (19, 38, 24)): "chroma1-hd",
           ("flux-kontext", (19, 38, 24)): "flux.1-kontext-dev", ("flux2", (8, 48, 48)): "flux.2-dev"}


def _by_shape(family: str, config, source: str) -> Preset | None:
    layers, heads, single = config.get("num_layers"), config.get("num_attention_heads"), config.get("num_single_layers")
    if (family, (layers, single, heads)) in _SHAPES:
        return PRESETS[_SHAPES[family, (layers, single, heads)]]
    if family == "sd3" and (layers, heads) == (24, 24):
        return PRESETS["sd3.5-medium" if config.get("dual_attention_layers") else "sd3-medium"]
    if family == "sd3" and (layers, heads) == (38, 38):
        # Large and Large-Turbo share their shape; only the name tells them apart.
        return PRESETS["sd3.5-large-turbo" if "turbo" in source else "sd3.5-large"]
    if family == "sd3" and (layers, heads, config.get("sample_size")) == (6, 6, 32):
        return PRESETS["toy"]  # a toy model from a training run (python -m mmdit_probe.toy.train --export)
    if family == "flux" and (layers, single, heads) == (19, 38, 24):
        return PRESETS["flux.1-dev" if config.get("guidance_embeds") else "flux.1-schnell"]
    if family == "flux2" and not config.get("guidance_embeds"):
        # Klein (no guidance embedding); only the name tells 9B from 4B.
        return PRESETS["flux.2-klein-9b" if "9b" in source else "flux.2-klein-4b"]
    return None


def register(p: Preset) -> Preset:
    """Add a preset (e.g. for a fine-tuned checkpoint) so `load(name)` finds it."""
    PRESETS[p.name.lower()] = p
    if p.hub_id:
        _HUB_IDS[p.hub_id.lower()] = p
    return p

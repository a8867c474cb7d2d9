"""The package's fixed choices, defined once and torch-free (the CLI builds `--help` from them without torch).

Each module that offers one still binds it under its old name (`maps.KINDS`, `metrics.METRICS`, ...).
"""

from __future__ import annotations

# -- recorded maps ---------------------------------------------------------------------------------
# Every kind of map `AttentionMaps` holds, by its layout (`MAP_AXES`): "text" (the word maps T2I and I2T), "concept"
# (output space, cross-attention), "attn2" (the entropy of SD3.5-M's image-only attention), "text_pair" (text x
# text), "patch" (image x image for chosen query patches), "reference" (image x reference) or "reference_text"
# (reference x text).
MAP_KINDS = {"t2i": "text", "i2t": "text", "concept": "concept", "concept_xattn": "concept", "attn2_entropy": "attn2",
             "t2t": "text_pair", "i2i": "patch", "r2i": "reference", "i2r": "reference", "t2r": "reference_text"}
# The axes after (step, block, row) of each layout ("head" first, for region kinds recorded with heads="all"):
# image tokens (raster order of the token grid), recorded text positions, concepts, recorded I2I query patches,
# reference tokens (raster order of the reference image's token grid).
MAP_AXES = {"text": ("image", "text"), "concept": ("image", "concept"), "attn2": ("image",),
            "text_pair": ("text", "text"), "patch": ("image", "query"), "reference": ("image", "reference"),
            "reference_text": ("reference", "text")}
# The regions of joint attention the recorder maps from the taps: query stream, key stream, and the stored order of
# the two axes, "qk" (query, key) or "kq" (key, query), so that the image axis comes first and a word's or a query
# patch's map is a column. Image tokens are every token on the first axis and the chosen query patches on the last.
# The reference region (a context image's tokens, Flux.1 Kontext): R2I = image queries x reference keys (where each
# reference patch lands on the output), I2R = reference queries x image keys, stored (image token, reference token)
# like I2T; T2R = reference queries x text keys, (reference token, text position): where each word lands on the
# reference image.
REGIONS = {"t2i": ("img", "txt", "qk"), "i2t": ("txt", "img", "kq"), "t2t": ("txt", "txt", "qk"),
           "i2i": ("img", "img", "kq"), "r2i": ("img", "ref", "qk"), "i2r": ("ref", "img", "kq"),
           "t2r": ("ref", "txt", "qk")}
KINDS = tuple(k for k, last in MAP_KINDS.items() if last == "text")  # the word-map kinds, recorded by default
REFERENCE_KINDS = tuple(k for k, last in MAP_KINDS.items() if last.startswith("reference"))
CONCEPT_KINDS = tuple(k for k, last in MAP_KINDS.items() if last == "concept")
ROWS = ("cond", "uncond", "both")  # halves of a classifier-free-guidance batch
IMAGE_MAP_METHODS = ("noise", "inversion")

# -- scoring maps against masks --------------------------------------------------------------------
METRICS = ("soft_iou", "iou", "bce", "mse")
HIGHER_IS_BETTER = {"soft_iou": True, "iou": True, "bce": False, "mse": False}
GRIDS = ("pixels", "tokens")
WINDOWS = ("early", "middle", "late", "all")

# -- generation ------------------------------------------------------------------------------------
T5_MAX_TOKENS = 512
OUTPUT_TYPES = ("pil", "latent", "np", "pt")
GENERATION_KEYS = ("steps", "guidance", "height", "width", "max_sequence_length")

# -- editing and inversion -------------------------------------------------------------------------
# Which activations the target takes from the source, per variant (the paper's ablations). The first eight carry
# the names of the paper's released code (utils/dit_utils.py) and replace what its variants replace; "qikt" is
# q_img and k_txt there and here. "qikikt" (q_img, k_img and k_txt) is what this package called "qikt" before.
VARIANTS: dict[str, tuple[str, ...]] = {
    "qiki": ("q_img", "k_img"),
    "qk": ("q_img", "k_img", "q_txt", "k_txt"),
    "qi": ("q_img",),
    "ki": ("k_img",),
    "qikt": ("q_img", "k_txt"),
    "qtki": ("q_txt", "k_img"),
    "qtkt": ("q_txt", "k_txt"),
    "kivi": ("k_img", "v_img"),
    "qikikt": ("q_img", "k_img", "k_txt"),
    "none": (),
}
# Attention-region replacements (the released code's I2I, T2I, I2T, T2T): (query stream, key stream) of the block
# of pre-softmax scores the target takes from the source; its rows are then softmax-normalised over all keys and
# applied to the target's values. Named as the paper names the blocks of qk^T: "T2I" is image queries x text keys.
REPLACEMENTS: dict[str, tuple[str, str]] = {
    "I2I": ("img", "img"),
    "T2I": ("img", "txt"),
    "I2T": ("txt", "img"),
    "T2T": ("txt", "txt"),
}
EDIT_METHODS = (*VARIANTS, *REPLACEMENTS)  # everything `edit(variant=...)` and `mmdit-probe edit --variant` take
# How a share of the steps becomes steps: "ceil" keeps s < share * n (6 of 28 at 0.2; this package's default),
# "floor" keeps s < int(share * n) (5 of 28; the paper's released code).
STEP_ROUNDINGS = ("ceil", "floor")
INVERSION_METHODS = ("euler", "heun", "fixed-point", "rf-solver", "fireflow")
# Methods with their own sampler: they integrate the ODE with `solve` in both directions.
SOLVERS = ("rf-solver", "fireflow")
MEASURES = ("dino", "pixel", "judge")  # vital layers
PUBLISHED_SHARE = 9 / 57  # Stable Flow's vital layers in FLUX.1-dev

# -- activation patching ---------------------------------------------------------------------------
DIMS = ("hook", "block", "step", "position", "half")
HALVES = ("cond", "uncond", "both")
DIRECTIONS = ("noising", "denoising")
OUTPUTS = {"image": "pt", "latent": "latent"}

# -- families --------------------------------------------------------------------------------------
# Each family (`families.FAMILIES`) as its models are called, torch-free for the CLI's --help: key, then title.
FAMILY_TITLES = {"sd3": "SD3 / SD3.5", "flux": "Flux.1", "chroma": "Chroma", "flux-kontext": "Flux.1 Kontext",
                 "qwen_image": "Qwen-Image", "qwen_image_edit": "Qwen-Image-Edit",
                 "qwen_image_edit_plus": "Qwen-Image-Edit-2509", "flux2": "Flux.2 dev / Klein"}

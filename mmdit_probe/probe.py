"""`load` a model and get a `Probe`: the pipeline with taps, wrapped in an nnsight `DiffusionModel`.

>>> probe = mmdit_probe.load("toy")                      # or "sd3-medium", a hub id, a local dir, a pipeline
>>> with probe.model.generate(**probe.inputs(["a red circle", "a blue circle"], seed=0)) as tracer:
...     q = probe.hook("blocks.2.attn.hook_q_img").output.save()    # first step's image queries
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline
from nnsight.modeling.diffusion import DiffusionModel, _PipelineModule

from . import validation
from ._lazy import lazy
from ._notices import internal_deprecations_hidden
from .attention import AttentionRecorder
from .constants import GENERATION_KEYS, OUTPUT_TYPES, SOLVERS, T5_MAX_TOKENS
from .families import Family, family_for, family_name_for_class
from .maps import AttentionMaps
from .presets import PRESETS, Preset, find_preset
from .presets import preset as find_named_preset
from .tokens import TokenTable, tokenize, warn_unknown_characters

if TYPE_CHECKING:
    from .editing import EditResult, VitalLayers
    from .sampling.inversion import Inversion

# The probe is a facade over the editors and inversion, which load with the method that uses them. These names, once
# imported here, stay importable from mmdit_probe.probe for one release.
_EDITING, _INVERSION = "mmdit_probe.editing", "mmdit_probe.sampling.inversion"
__getattr__, __dir__ = lazy(__name__, {
    "EditResult": _EDITING, "VitalLayers": _EDITING, "edit": _EDITING, "vital_layers": _EDITING,
    "check_edit": f"{_EDITING}.qk_injection", "Inversion": _INVERSION, "invert": _INVERSION})

TOY_WEIGHTS = Path(__file__).parent / "toy" / "weights"


@dataclass
class Generation:
    """What `Probe.generate` returns: the images (PIL, or latents with output_type="latent"),
    the recorded maps if asked for, and the exact pipeline inputs used."""

    images: Any
    maps: AttentionMaps | None
    inputs: dict[str, Any] = field(repr=False)


class _PipelineModel(DiffusionModel):
    """nnsight's `DiffusionModel`, also accepting a pipeline that is already built."""

    def _load(self, repo_id: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if isinstance(repo_id, DiffusionPipeline):
            self.pipeline = repo_id
            return _PipelineModule(repo_id)
        return super()._load(repo_id, *args, **kwargs)


# `from_pretrained` keywords that say where and how to fetch a hub checkpoint's files, its model_index.json too.
_HUB_KEYWORDS = ("cache_dir", "force_download", "token", "local_files_only", "revision")


def _pipeline_index(path: str | Path, label: str) -> dict:
    """A model_index.json that names a pipeline class this package takes: refused before any weights load."""
    fix = "save the pipeline again (save_pretrained) or fix the file"
    config = validation.json_file(path, fix, label)
    if not isinstance(config, dict) or "_class_name" not in config:
        raise validation.InvalidInput(f"{label} names no pipeline class (\"_class_name\"): {fix}")
    family_name_for_class(config["_class_name"])
    return config


def _hub_index(source: str, kwargs: dict[str, Any]) -> str | None:
    """Where a hub checkpoint's model_index.json lies, fetched alone as `from_pretrained` fetches it (the hub asked
    once, else the local cache; an `OSError` where neither has it); None where `source` is no repo id."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import httpx  # the HTTP client the hub's functions use

    hub = {k: kwargs[k] for k in _HUB_KEYWORDS if k in kwargs}
    refused = None  # the hub's answer where it was reached but refused (a private repo, a wrong id or revision)
    if not hub.get("local_files_only"):
        try:
            huggingface_hub.model_info(source, revision=hub.get("revision"), token=hub.get("token"))
        except HFValidationError:
            return None
        except (HfHubHTTPError, OfflineModeIsEnabled, httpx.NetworkError) as error:
            hub["local_files_only"] = True  # as diffusers does; hf_hub_download would retry for half a minute
            refused = error if isinstance(error, HfHubHTTPError) else None
    try:
        return huggingface_hub.hf_hub_download(source, "model_index.json", **hub)
    except LocalEntryNotFoundError:
        if refused is None:
            raise
        raise OSError(f"the hub refused it ({refused}), and no copy is cached") from refused


def _from_pretrained(source: str, **kwargs: Any) -> DiffusionPipeline:
    """Safe loading: safetensors only, never remote code; a clear message when offline. The pipeline class is
    checked before any weights load, a hub checkpoint's from its model_index.json alone."""
    if kwargs.pop("trust_remote_code", False):
        raise ValueError("mmdit_probe never loads remote code (trust_remote_code=True is refused)")
    local = Path(source).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.exists():
            raise FileNotFoundError(f"{local} is not a diffusers pipeline directory (no model_index.json)")
        # A component saved as absent (e.g. SD3 without T5) must be passed as None to load.
        for name, spec in _pipeline_index(index, str(index)).items():
            if spec == [None, None]:
                kwargs.setdefault(name, None)
        with internal_deprecations_hidden():
            return DiffusionPipeline.from_pretrained(local, use_safetensors=True, **kwargs)
    try:
        index = None if "dduf_file" in kwargs else _hub_index(source, kwargs)  # a DDUF archive holds its own
        if index is not None:
            _pipeline_index(index, f"{source}'s model_index.json")
        with internal_deprecations_hidden():
            return DiffusionPipeline.from_pretrained(source, use_safetensors=True, **kwargs)
    except OSError as error:
        raise OSError(f"could not load {source!r}: {error}\n"
                      f"Without network access, download the checkpoint on a machine that has it "
                      f"(e.g. `hf download {source} --local-dir DIR`) and call mmdit_probe.load('DIR'). "
                      f"Known presets: {', '.join(PRESETS)}.") from error


def _dtype_keyword() -> str:
    """diffusers renamed `from_pretrained(torch_dtype=)` to `dtype=`; the old name now warns."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load(model: str | Path | DiffusionPipeline, *, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, preset: str | Preset | None = None,
         top_layers: Sequence[int] | str | Path | None = None, **from_pretrained: Any) -> Probe:
    """Load a supported MM-DiT pipeline and install taps.

    `model` is a preset name (``"sd3-medium"``, ``"flux.1-dev"``, ``"toy"``, ...), a hub id, a local
    pipeline directory, or a built diffusers pipeline. Sampling defaults (steps, guidance, size,
    T5 length) and the map/editing defaults come from the matching preset, or the family's.
    Every component loads in `dtype` (default float32; pass ``torch.bfloat16`` on a GPU).
    `top_layers` overrides the preset's map blocks: block indices, or a sweep's ``top_layers.json``.

    >>> probe = load("toy")
    >>> probe.family.name, probe.family.num_blocks
    ('sd3', 6)
    """
    if not isinstance(model, (str, Path, DiffusionPipeline)):
        raise validation.InvalidInput(f"model={model!r} ({type(model).__name__}) is not allowed: give a preset name, a "
                                      f"hub id, a local pipeline directory or a diffusers pipeline")
    if dtype is not None:
        validation.float_dtype("dtype", dtype)
    if preset is not None and not isinstance(preset, (str, Preset)):
        raise validation.InvalidInput(f"preset={preset!r} is not allowed: give a preset name ({', '.join(PRESETS)}) "
                                      f"or a Preset")
    chosen = find_named_preset(preset) if isinstance(preset, str) else preset  # unknown names fail before loading
    source = None
    if isinstance(model, DiffusionPipeline):
        pipeline = model
        if dtype is not None:
            pipeline.to(dtype=dtype)
    else:
        source = str(model)
        named = PRESETS.get(source.lower())
        # The toy's weights are shipped as fp16 to stay small, and run in float32 like any default.
        location = TOY_WEIGHTS if source.lower() == "toy" else named.hub_id if named and named.hub_id else source
        # One dtype for every component: without it diffusers loads its models in float32 while
        # transformers keeps a text encoder's saved float16, and the mixed pipeline fails.
        if dtype is not None or not {"dtype", "torch_dtype"} & set(from_pretrained):
            from_pretrained[_dtype_keyword()] = torch.float32 if dtype is None else dtype
        pipeline = _from_pretrained(str(location), **from_pretrained)
    if device is not None:
        pipeline.to(device)
    family = family_for(pipeline)
    if chosen is not None and chosen.family != family.name:
        raise validation.InvalidInput(f"preset {chosen.name!r} is for the {chosen.family} family, but this pipeline is "
                                      f"{family.name}: give a {family.name} preset or leave preset out")
    probe = Probe(pipeline, preset=chosen if chosen is not None else source)
    if top_layers is not None:
        probe.preset = replace(probe.preset, top_layers=_top_layers(top_layers, probe.family))
    return probe


def _top_layers(chosen: Sequence[int] | str | Path, family: Family) -> tuple[int, ...]:
    """Block indices, or the ones a sweep report wrote to top_layers.json; checked against the model."""
    if isinstance(chosen, (str, Path)):
        path = Path(chosen)
        if not path.is_file():
            raise FileNotFoundError(f"top_layers={str(chosen)!r}: give block indices or a sweep's top_layers.json")
        fix = "give block indices or the top_layers.json a sweep report wrote"
        stored = validation.json_file(path, fix, label=f"top_layers={str(path)!r}")
        if not isinstance(stored, dict) or "top_layers" not in stored:
            raise validation.InvalidInput(f"top_layers={str(path)!r} holds no \"top_layers\" list: {fix}")
        chosen = stored["top_layers"]
    return tuple(family.check_blocks("top_layers", chosen))


class Probe:
    """A pipeline with taps installed and its nnsight wrapper.

    - `probe.pipeline`: the diffusers pipeline (taps installed; usable directly);
    - `probe.model`: the nnsight `DiffusionModel` over it, for `trace`/`generate` interventions;
    - `probe.hook(name)`: the nnsight envoy of a hook point, by its stable name;
    - `probe.inputs(prompts, seed=...)`: pipeline arguments with the preset's defaults and one
      shared initial noise for every prompt;
    - `probe.tokens(prompt)`: which text positions belong to which word.
    """

    def __init__(self, pipeline: DiffusionPipeline, preset: str | Preset | None = None) -> None:
        self.pipeline = pipeline
        self.family: Family = family_for(pipeline)
        self.preset: Preset = preset if isinstance(preset, Preset) else find_preset(
            preset, self.family.name, pipeline.transformer.config)
        self.family.install_taps()
        self.model = _PipelineModel(pipeline, dispatch=True)

    # -- names --------------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        """Every hook point's stable name, in execution order (nnsight reads must follow it)."""
        return self.family.tap_names()

    def module_path(self, name: str) -> str:
        """The module path (inside the pipeline) of a hook point, e.g. for nnsight or torch hooks."""
        return f"transformer.{self.family.tap_path(name)}"

    def hook(self, name: str):
        """The nnsight envoy of a hook point: read `.output`, or assign to it, inside a trace."""
        return self.model.get(self.module_path(name))

    def module(self, name: str) -> torch.nn.Module:
        """The torch module of a hook point (for plain forward hooks, outside nnsight)."""
        return self.pipeline.transformer.get_submodule(self.family.tap_path(name))

    # -- inputs -------------------------------------------------------------
    def tokens(self, prompt: str, max_sequence_length: int | None = None) -> TokenTable:
        """The token table of a prompt: position, encoder, piece and word of every real token."""
        validation.prompt("prompt", prompt)
        length = (self.preset.max_sequence_length if max_sequence_length is None
                  else validation.positive_int("max_sequence_length", max_sequence_length))
        return tokenize(prompt, self.family.text_segments(length), self.pipeline)

    # Pipeline arguments that `inputs` sets itself, and the keyword to use instead.
    _OWN_ARGUMENTS = {"prompt": "the prompts argument", "num_inference_steps": "steps=",
                      "guidance_scale": "guidance=", "height": "height=", "width": "width="}

    def check_generation(self, prompts: Any, *, seed: Any = 0, same_noise: Any = True, steps: Any = None,
                         guidance: Any = None, height: Any = None, width: Any = None,
                         **kwargs: Any) -> dict[str, Any]:
        """Check generation arguments before any model call; returns them normalised (see `inputs`)."""
        checked: dict[str, Any] = {
            "prompts": validation.prompts(prompts),
            "seed": validation.integer("seed", seed),
            "same_noise": validation.boolean("same_noise", same_noise),
            "steps": validation.optional_positive_int("steps", steps),
            "guidance": None if guidance is None else validation.number("guidance", guidance, low=0.0),
        }
        if checked["steps"] is not None and checked["steps"] < self.family.min_steps:
            raise validation.InvalidInput(f"steps={checked['steps']} is not allowed: {self.family.name} samples "
                                          f"with at least {self.family.min_steps} steps ({self.family.min_steps_why})")
        for name, value in (("height", height), ("width", width)):
            checked[name] = None if value is None else validation.image_side(name, value, self.family.token_pixels,
                                                                              self.family.max_image_side)
        for key, instead in self._OWN_ARGUMENTS.items():
            if key in kwargs:
                raise validation.InvalidInput(f"pass {instead} rather than {key}=")
        if "context_image" in kwargs:
            # The editors and inversion take the image to edit or invert as `image`: a reference model's context
            # image comes as `context_image` there, and everywhere else too.
            if not self.family.has_reference:
                raise validation.InvalidInput(f"context_image= is for models with a context image (Flux.1 Kontext, "
                                              f"Flux.2's reference images); "
                                              f"this is {self.family.name}: leave it out")
            if kwargs.get("image") is not None:
                raise validation.InvalidInput("the context image given twice, as image= and context_image=: give it "
                                              "once")
            kwargs["image"] = kwargs.pop("context_image")
        if self.family.has_reference:  # another family's image= is no input image (FluxImg2ImgPipeline's init image)
            self.family.check_image_argument(kwargs.get("image"), len(checked["prompts"]))
        validation.known_keywords(f"{type(self.pipeline).__name__} (generation)", kwargs,
                                  inspect.signature(self.pipeline.__call__).parameters)
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise validation.InvalidInput(
                f"num_images_per_prompt={kwargs['num_images_per_prompt']!r} is not supported: repeat the prompt "
                f"in the list (with same_noise=False for different images) or call again with another seed")
        if kwargs.get("max_sequence_length") is not None:
            kwargs["max_sequence_length"] = validation.integer("max_sequence_length", kwargs["max_sequence_length"],
                                                               minimum=1)
            if kwargs["max_sequence_length"] > T5_MAX_TOKENS:
                raise validation.InvalidInput(f"max_sequence_length={kwargs['max_sequence_length']} is not allowed: "
                                              f"T5 takes at most {T5_MAX_TOKENS} tokens")
        validation.choice("output_type", kwargs.get("output_type", "pil"), OUTPUT_TYPES)
        length = kwargs.get("max_sequence_length") or self.preset.max_sequence_length
        warn_unknown_characters(checked["prompts"], self.family.text_segments(length), self.pipeline)
        return {**checked, **kwargs}

    def inputs(self, prompts: str | list[str], *, seed: int = 0, same_noise: bool = True,
               steps: int | None = None, guidance: float | None = None, height: int | None = None,
               width: int | None = None, **kwargs: Any) -> dict[str, Any]:
        """Pipeline keyword arguments with this model's defaults.

        With `same_noise` every prompt starts from the same initial latent (drawn as the pipeline
        would for `seed`), as editing and prompt comparisons need. Extra keywords pass through.
        Every argument is checked first (`validation`): 0 never means "the default"; leave it out.
        """
        checked = self.check_generation(prompts, seed=seed, same_noise=same_noise, steps=steps, guidance=guidance,
                                        height=height, width=width, **kwargs)
        prompts, seed, steps, guidance = (checked.pop(key) for key in ("prompts", "seed", "steps", "guidance"))
        height, width = (checked.pop(key) or self.preset.resolution for key in ("height", "width"))
        args: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": steps or self.preset.steps,
            **self.family.guidance_inputs(self.preset.guidance if guidance is None else guidance),
            "height": height,
            "width": width,
            "max_sequence_length": self.preset.max_sequence_length,
            **self.family.pipeline_arguments(height, width),
        }
        if checked.pop("same_noise"):
            args["latents"] = self.family.initial_noise(len(prompts), height, width, seed)
        else:
            args["generator"] = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
        if checked.get("latents") is not None:
            expected = (len(prompts), *self.family.initial_noise(1, height, width, 0).shape[1:])
            validation.latents(checked["latents"], (expected,), f"{len(prompts)} prompt(s) at {height}x{width}",
                               " (one row per prompt), or leave latents out")
        args.update(checked)
        return args

    def generate(self, prompts: str | list[str], *, seed: int = 0, record: bool | dict = False,
                 steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, concepts: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 **kwargs: Any) -> Generation:
        """Generate from one shared initial noise, optionally recording attention maps.

        `record=True` records T2I and I2T maps of every block and step (head mean, conditional half,
        real text positions); a dict (``{}`` too) records with those `AttentionRecorder` options (blocks,
        steps, kinds, heads, rows, positions, queries, dtype, concepts). `concepts` (two or more words, e.g.
        ["circle", "background"], or one list per prompt; given here or in `record`, not both) also
        records concept maps (`mmdit_probe.concepts`; read them with `maps.concept("circle")`); the
        images are bit for bit the ones without concepts. ``record={"kinds": ["t2i", "t2t", "i2i"],
        "queries": (2, 3)}`` adds T2T maps and patch (2, 3)'s I2I map (`maps.patch((2, 3))`).

        >>> out = probe.generate("on the left a large red circle on a white background", record=True)
        >>> out.images[0], out.maps.word("red", blocks="top")
        """
        if not isinstance(record, (bool, dict)):
            raise validation.InvalidInput(f"record={record!r} is not allowed: give True, False or a dict of "
                                          f"AttentionRecorder options")
        inputs = self.inputs(prompts, seed=seed, steps=steps, guidance=guidance, height=height, width=width,
                             **kwargs)
        # A dict, even an empty one, asks for a recording with those options; concepts come in one place only.
        options = dict(record) if isinstance(record, dict) else {}
        if concepts is not None:
            if record is False:
                raise validation.InvalidInput("concepts= records concept maps: pass record=True (or a dict of options)")
            if "concepts" in options:
                raise validation.InvalidInput("concepts given twice, as concepts= and as record['concepts']: give "
                                              "them once (concepts=...)")
            options["concepts"] = concepts
        recorder = None if record is False else AttentionRecorder(self, inputs, **options)
        try:
            with self.model.generate(**inputs) as tracer:
                if recorder is not None:
                    for call in tracer.iter[0:recorder.calls]:  # guidance as a second call: two per step
                        recorder.record(call)
                output = self.model.output.save()
        finally:
            if recorder is not None:
                recorder.close()
        maps = recorder.maps() if recorder is not None else None
        if maps is not None and inputs.get("output_type", "pil") == "pil":
            maps.images = list(output.images)
        return Generation(images=output.images, maps=maps, inputs=inputs)

    def edit(self, source: str, target: str, **options: Any) -> EditResult:
        """Edit by prompt: q/k injection plus local blending (see `mmdit_probe.editing.qk_injection.edit`).

        >>> result = probe.edit("in the center a red circle on a white background",
        ...                     "in the center a blue circle on a white background", seed=0)
        """
        from .editing import edit

        return edit(self, source, target, **options)

    def vital_layers(self, prompts: str | list[str], **options: Any) -> VitalLayers:
        """Rank blocks by how much bypassing each changes the images (Stable Flow's vital layers; see
        `mmdit_probe.editing.vital_layers`). The result's `.ranking`, `.top(k)`, `.figure()`; pass it as
        ``layers=`` to `mmdit_probe.editing.stable_flow`.

        >>> found = probe.vital_layers(["on the left a large red circle on a white background"], measures=["pixel"])
        """
        from .editing import vital_layers

        return vital_layers(self, prompts, **options)

    def fuse_qkv_projections(self) -> None:
        """Fuse the q/k/v projections (faster on GPUs) and keep the taps.

        diffusers' own `transformer.fuse_qkv_projections()` swaps in its fused processors and so
        removes the taps; this puts tapped processors (which handle fused projections) back.
        """
        if not self.family.fuses_qkv:
            raise validation.InvalidInput(f"{type(self.pipeline.transformer).__name__} has no fused q/k/v projections "
                                          f"in diffusers (its fuse_qkv_projections() changes nothing): run unfused")
        quantized = {type(p).__name__ for p in self.pipeline.transformer.parameters()
                     if type(p) not in (torch.Tensor, torch.nn.Parameter)}
        if quantized:
            raise ValueError(f"the transformer's weights are quantized ({', '.join(sorted(quantized))}) and cannot be "
                             f"fused; call fuse_qkv_projections() first, then quantize")
        self.family.remove_taps()
        try:
            self.pipeline.transformer.fuse_qkv_projections()
        finally:
            self.family.install_taps()

    def invert(self, image, prompt: str, **options: Any) -> Inversion:
        """The initial latent that regenerates a real image (see `mmdit_probe.sampling.inversion.invert`).

        >>> inverted = probe.invert(image, "in the center a red circle on a white background")
        >>> inverted.error        # mean absolute pixel error of the regenerated image
        """
        from .sampling.inversion import invert

        return invert(self, image, prompt, **options)

    def image_maps(self, image, prompt: str, concepts, **options: Any) -> AttentionMaps:
        """Concept, T2I and I2T maps of a real image: ``method="noise"`` (ConceptAttention's route: one call at
        noise level `sigma`) or ``"inversion"`` (ours: invert, then record the regeneration); see
        `mmdit_probe.image_maps`.

        >>> maps = probe.image_maps(image, "a red circle on a white background", ["circle", "background"])
        >>> maps.concept("circle")
        """
        from .image_maps import image_maps

        return image_maps(self, image, prompt, concepts, **options)

    def edit_image(self, image, source: str, target: str, *, method: str = "fixed-point", iterations: int = 3,
                   **options: Any) -> EditResult:
        """Edit a real image: invert it with the source prompt, then edit from that latent.

        Every option is checked before the inversion runs. The edit's source row regenerates the image
        from the inverted latent, so ``result.params["inversion_error"]`` (mean absolute pixel error,
        0-255; PIL output only) says how well the image was inverted, at no extra cost.
        """
        if "latents" in options:
            raise validation.InvalidInput("edit_image inverts the image to get the latents: do not pass latents=")
        from .editing.qk_injection import check_edit
        from .sampling.inversion import check_inversion

        check_inversion(method, iterations)
        if method in SOLVERS:  # the editor samples with the pipeline's Euler: their inversion would not match it
            raise validation.InvalidInput(
                f"edit_image inverts for the pipeline's own (Euler) sampler; method={method!r} inverts its own "
                f"sampler: edit with mmdit_probe.editing.{method.replace('-', '_')}_edit(probe, source, target, "
                f"image=image), or choose one of euler, heun, fixed-point here")
        check_edit(self, source, target, **options)  # refuse bad edit options before inverting
        generation = {k: options[k] for k in GENERATION_KEYS if k in options}
        inverted = self.invert(image, source, method=method, iterations=iterations, check=False, **generation)
        result = self.edit(source, target, latents=inverted.latents, **options)
        result.params["inversion"] = method
        result.params["inversion_iterations"] = iterations if method == "fixed-point" else None
        if hasattr(result.source_image, "size") and options.get("output_type", "pil") == "pil":
            from .sampling.images import as_image, pixel_error

            original = as_image(image, result.source_image.size, quiet=True)
            result.params["inversion_error"] = pixel_error(result.source_image, original)
        return result

    def grid(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The image-token grid (rows, columns) for an image size (default: the preset's)."""
        step = self.family.token_pixels
        height = self.preset.resolution if height is None else validation.image_size("height", height, step)
        width = self.preset.resolution if width is None else validation.image_size("width", width, step)
        return self.family.grid(height, width)

    def info(self) -> str:
        """A summary: family, blocks, token layout, tap names."""
        f, p = self.family, self.preset
        rows, cols = self.grid()
        n_text = f.text_length(p.max_sequence_length)
        segments = ", ".join(f"{s.encoder} {s.start}..{s.start + s.length - 1}"
                             for s in f.text_segments(p.max_sequence_length))
        order = "[image | text]" if f.image_first else "[text | image]"
        order = order.replace("]", " | reference]") if f.has_reference else order
        attn2 = [a.block for a in f.attentions if a.name == "attn2"]
        lines = [
            f"pipeline      {type(self.pipeline).__name__} (family {f.name}, preset {p.name})",
            f"blocks        {f.num_blocks}" + (f"; attn2 (image-only) in blocks {attn2}" if attn2 else ""),
            f"joint order   {order}",
            f"image tokens  {rows} x {cols} = {rows * cols} at {p.resolution}px",
            f"text tokens   {n_text}: {segments}",
            f"defaults      {p.steps} steps, guidance {p.guidance}, top layers {list(p.top_layers)}",
            f"hook points   {len(self.hook_names)}, e.g. {', '.join(self.hook_names[:4])}, ...",
        ]
        if f.has_reference:
            lines.insert(4, "reference     a context image (image=...) adds tokens after the image tokens: hooks "
                            "*_ref, maps r2i / i2r / t2r")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Probe({type(self.pipeline).__name__}, family={self.family.name!r}, preset={self.preset.name!r})"

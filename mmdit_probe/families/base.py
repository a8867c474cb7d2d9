"""What a model family adapter knows: its blocks, its token layout, its hook points, and how to install taps."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import validation
from ..names import REFERENCE, STREAMS, TAP_ORDER, TAP_ORDER_REFERENCE, TAPPED, leaf, parse_tap, tap
from ..taps import TapProcessor


@dataclass(frozen=True)
class Attention:
    """One attention module with taps: where it lives and what it sees."""

    block: int  # global block index
    name: str  # "attn" or "attn2"
    path: str  # module path inside the transformer, e.g. "transformer_blocks.3.attn"
    has_text: bool  # joint image+text attention (False: SD3.5-M attn2, image only)


@dataclass(frozen=True)
class TextSegment:
    """One tokenizer's share of the text sequence the transformer sees."""

    encoder: str  # "clip" or "t5"
    tokenizer: str  # attribute of the pipeline, e.g. "tokenizer_3"
    text_encoder: str  # attribute of the pipeline; when it is None the rows are zeros, not tokens
    start: int
    length: int
    # The text the tokenizer reads where the pipeline wraps the prompt (a chat template); None: the prompt itself.
    template: Callable[[str], str] | None = None
    drop: int = 0  # template tokens the pipeline drops from the front (Qwen-Image)


def single_streams(family) -> int:
    """How many of a family's blocks are single-stream (Flux's last ones; none elsewhere). Reads only
    `num_blocks` and `num_double`, so a stand-in with those attributes serves too."""
    return family.num_blocks - getattr(family, "num_double", family.num_blocks)


def step_and_half(call: int, calls_per_step: int) -> tuple[int, str | None]:
    """The denoising step of a transformer call (counted as `tracer.iter` counts them) and, where guidance runs as a
    second call per step (`Family.calls_per_step`), its guidance half: the pipelines call the conditional half first.
    None where one call holds every row.

    >>> step_and_half(5, 2)
    (2, 'uncond')
    """
    if calls_per_step == 1:
        return call, None
    step, second = divmod(call, calls_per_step)
    return step, ("cond", "uncond")[second]


class Family:
    """Base adapter. Subclasses differ only in layout facts and their processor classes."""

    name: str
    pipeline_classes: tuple[str, ...]
    transformer_class: str  # the diffusers transformer that marks a pipeline of this family, whatever its class
    image_first: bool  # joint sequence order: [image | text] (SD3) or [text | image] (Flux)
    # Classifier-free guidance runs as one doubled batch [uncond | cond] when guidance > 1.
    batched_guidance = True
    # Whether guidance_scale > 1 runs classifier-free guidance as a second transformer call per step instead
    # (`calls_per_step`: Chroma, Flux.2 Klein base models).
    two_call_guidance = False
    # diffusers can fuse the q/k/v projections (`fuse_qkv_projections()`) and the stock processors use them.
    fuses_qkv = True
    min_steps, min_steps_why = 1, ""  # the fewest denoising steps whose schedule is defined
    # Whether the image stream may end with reference tokens (a context image): they get their own taps
    # ("q_ref", ...) and maps (`constants.REFERENCE_KINDS`); `reference_length` says how many there are.
    has_reference = False
    # How many input images (context or reference images) one pipeline call takes where `has_reference`; None: any.
    max_input_images: int | None = 1
    # Whether every pipeline call needs an input image (Qwen-Image-Edit edits one; diffusers fails without it).
    needs_input_image = False
    # Said where more input images are given than `max_input_images`: which model of the family takes more.
    more_images_hint = ""
    # Whether the pipeline itself passes an attention mask (Chroma's padded text). Recorded maps apply any mask a call
    # hands the kernel, this one or a user's (`joint_attention_kwargs`), as the kernel does.
    masks_attention = False

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.transformer: nn.Module = pipeline.transformer
        self.attentions: list[Attention] = self._attentions()
        self._stock: dict[str, object] = {}
        # Reinstalling reuses the same tapped processors: nnsight's envoy tree holds these objects.
        self._tapped: dict[str, TapProcessor] = {}
        self._reference_hook = None  # sets the processors' `reference_length` before each transformer call
        self._hooks: list = []  # a subclass's own hooks for its taps, removed with them

    # -- layout ------------------------------------------------------------
    def _attentions(self) -> list[Attention]:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return 1 + max(a.block for a in self.attentions)

    def block_path(self, block: int) -> str:
        return self.attention(block).path.rsplit(".", 1)[0]

    def attention(self, block: int, name: str = "attn") -> Attention:
        self.check_block(block)
        for a in self.attentions:
            if a.block == block and a.name == name:
                return a
        raise ValueError(f"block {block} has no {name!r}; "
                         f"blocks with attn2: {[a.block for a in self.attentions if a.name == 'attn2']}")

    def check_block(self, block: int) -> int:
        """One block index of this model, else `validation.BlockIndexError`."""
        return self.check_blocks("block", block)[0]

    def calls_per_step(self, inputs: dict[str, Any]) -> int:
        """How many times the pipeline calls the transformer per denoising step with these inputs: 1, or 2 where
        guidance runs as a second call, the conditional call first, then the unconditional one (true CFG:
        `true_cfg_scale` > 1 with a negative prompt; Chroma and Flux.2 Klein base models at guidance > 1). Recording,
        patching and the q/k editor lay both calls out; inputs whose calls they cannot lay out are refused.

        >>> probe.family.calls_per_step(probe.inputs("a red cat", guidance=4.0, negative_prompt=" "))  # Qwen-Image
        2
        """
        validation.skip_layer_guidance(inputs)
        inputs = self.with_pipeline_defaults(inputs)
        two_call_cfg = self.two_call_guidance and inputs["guidance_scale"] > 1
        return 2 if two_call_cfg or validation.true_cfg(inputs) else 1

    def with_pipeline_defaults(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """These pipeline inputs with the pipeline's own defaults for the guidance scales they leave out, which a
        call without them runs at (ChromaPipeline's guidance_scale 5.0, QwenImagePipeline's true_cfg_scale 4.0)."""
        parameters = inspect.signature(type(self.pipeline).__call__).parameters
        return {**{key: parameters[key].default for key in ("guidance_scale", "true_cfg_scale") if key in parameters},
                **inputs}

    def check_one_call_per_step(self, inputs: dict[str, Any]) -> None:
        """Refuse inputs with guidance as a second transformer call per step (`calls_per_step`), for the paths that
        take one call as the whole velocity (sampling, inversion, and the editors other than q/k injection)."""
        validation.one_call_per_step(inputs, self.calls_per_step(inputs), self.second_call)

    # What makes guidance a second transformer call in this family, for messages.
    second_call = "true CFG, true_cfg_scale > 1 with a negative_prompt"

    def check_blocks(self, name: str, values: Any, **template: Any) -> list[int]:
        """Distinct block indices of this model (see `validation.blocks`; `template` passes its message)."""
        return validation.blocks(name, values, self.num_blocks, model=self.name, **template)

    def present(self, blocks: Iterable[int] | None) -> list[int]:
        """The blocks of a preset's list that this model has (a preset may be for a deeper model)."""
        return [b for b in (blocks or ()) if b < self.num_blocks]

    def block_labels(self) -> list[str]:
        """A name per block, for figures and tables."""
        return [f"block {b}" for b in range(self.num_blocks)]

    def guidance_inputs(self, guidance: float) -> dict[str, Any]:
        """The pipeline arguments that set this guidance scale; `guidance_scale` is always among them (the editors
        and samplers read it)."""
        return {"guidance_scale": guidance}

    def image_inputs(self, images: list, rows: int) -> dict[str, Any]:
        """The pipeline inputs that give it these input images (PIL, a context or reference image each) in a call of
        `rows` prompts, as the Python API takes them: one image as itself, several as a list.

        >>> probe.generate("a cat on a mat", **probe.family.image_inputs([Image.open("cat.png")], 1))
        """
        return {"image": images[0] if len(images) == 1 else list(images)}

    def check_input_images(self, images: list, *, cli: bool = False) -> None:
        """Refuse input images (PIL, a context or reference image each) this pipeline would not take, before any
        model call: any on a model without them, more than `max_input_images`, none where `needs_input_image`, and
        sizes the pipeline's own image processor refuses (Flux.2's `check_image_input`). Messages name `--image`
        where `cli`, else `image=`.

        >>> probe.family.check_input_images([Image.open("cat.png")])  # Flux.1 Kontext: one context image
        """
        option, give = ("--image", "--image PATH") if cli else ("image=", "image=... (a PIL image)")
        pipeline = type(self.pipeline).__name__
        if images and not self.has_reference:
            raise validation.InvalidInput(f"{option}: {pipeline} ({self.name}) takes no context or reference image; "
                                          f"leave {option} out, or load a model that takes one (Flux.1 Kontext, "
                                          f"Flux.2, Qwen-Image-Edit)")
        if not images and self.needs_input_image:
            raise validation.InvalidInput(f"{pipeline} ({self.name}) edits an input image: give {give}. Inversion, "
                                          f"edit_image, image_maps, the real-image editors and sweeps pass none, so "
                                          f"they do not run on this model")
        most = self.max_input_images
        if most is not None and len(images) > most:
            raise validation.InvalidInput(f"{len(images)} input images given ({option}): {pipeline} takes {most} per "
                                          f"call{self.more_images_hint}; give {option} once")
        check = getattr(getattr(self.pipeline, "image_processor", None), "check_image_input", None)
        if check is None:
            return
        for number, image in enumerate(images, start=1):
            try:
                check(image)
            except ValueError as error:
                raise validation.InvalidInput(f"{option} number {number}: {error}; {pipeline} refuses it: give a "
                                              f"larger image, or one closer to square") from error

    def check_image_argument(self, image: Any, prompts: int) -> list:
        """Refuse a Python call's `image=` (one image or a list) that this pipeline would not take, before any model
        call (`check_input_images`); a family whose pipeline takes one image per prompt checks that too. Returns the
        images as a list."""
        images = [] if image is None else list(image) if isinstance(image, list) else [image]
        self.check_input_images(images)
        return images

    def batch_inputs(self, inputs: dict[str, Any], rows: int) -> dict[str, Any]:
        """Pipeline inputs whose prompt list the probe has resized to `rows` (activation patching's runs): unchanged
        here; a family whose pipeline takes an input per prompt (Qwen-Image-Edit's images) resizes those too."""
        return inputs

    def doubles_batch(self, inputs: dict[str, Any]) -> bool:
        """Whether the pipeline runs these inputs' classifier-free guidance as a doubled batch ([uncond | cond])."""
        return self.batched_guidance and self.with_pipeline_defaults(inputs)["guidance_scale"] > 1

    @staticmethod
    def bypass_output(module, args, kwargs, output):
        """A forward hook replacing a block's output by its inputs, in the order every MM-DiT block of diffusers
        returns them: (encoder_hidden_states, hidden_states) for SD3's JointTransformerBlock (also its last,
        context-pre-only block, whose text output is unused), FluxTransformerBlock and FluxSingleTransformerBlock
        (diffusers 0.42). A block returning one tensor (Chroma's and Flux.2's single-stream blocks: the joint
        [text | image] sequence, which they also take alone) gets its input back."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if isinstance(output, torch.Tensor):
            return hidden
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return text, hidden

    def bypass(self, block: int):
        """Make one block hand on its inputs unchanged; returns the hook's handle (`.remove()` undoes it)."""
        module = self.transformer.get_submodule(self.block_path(self.check_block(block)))
        return module.register_forward_hook(self.bypass_output, with_kwargs=True)

    def concept_call(self, block: int, call: dict[str, Any], state: torch.Tensor, dummy: torch.Tensor):
        """A block's concept call (`mmdit_probe.concepts`): its keyword arguments with the concept stream `state` as
        the text and the one-token `dummy` as the image, and a function taking the block's output to the new state.
        Every MM-DiT block of diffusers 0.42 here takes both streams; joint blocks return (text, image), the text None
        after SD3's last (context_pre_only) block; Flux.2's single-stream blocks return the joint [text | image]."""
        call = {**call, "hidden_states": dummy, "encoder_hidden_states": state}
        return call, lambda output: output[0] if isinstance(output, tuple) else output[:, :state.shape[1]]

    # -- hook points -------------------------------------------------------
    def streams(self, attention: Attention) -> tuple[str, ...]:
        """The streams one attention has taps for: img, txt where it sees text, ref where the family has references."""
        streams = STREAMS if attention.has_text else ("img",)
        return (*streams, REFERENCE) if self.has_reference else streams

    def tap_names(self) -> list[str]:
        """Every hook point's stable name, in execution order (nnsight reads must follow it); lse taps left out."""
        names = []
        order = TAP_ORDER_REFERENCE if self.has_reference else TAP_ORDER
        for a in self.attentions:
            streams = self.streams(a)
            names += [tap(a.block, short, a.name) for short in order if short.rpartition("_")[2] in streams]
        return names

    def reference_length(self, call: dict[str, Any]) -> int:
        """How many tokens at the end of the image stream are reference tokens in this transformer call (its keyword
        arguments); 0 for families without references."""
        return 0

    def reference_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """The token grid (rows, cols) of the reference image these pipeline inputs carry; None without one."""
        return None

    def tap_path(self, name: str) -> str:
        """The module path inside the transformer of a hook point, e.g. for nnsight or torch hooks."""
        parsed = parse_tap(name)
        attention = self.attention(parsed.block, parsed.attention)
        streams = self.streams(attention)
        valid = [leaf(activation, s) for activation in TAPPED for s in streams]
        if parsed.leaf not in valid:
            raise ValueError(f"{parsed.attention} of block {parsed.block} has no {parsed.leaf!r}; it has "
                             f"{', '.join(valid)}")
        return f"{attention.path}.processor.{parsed.leaf}"

    def text_segments(self, max_sequence_length: int) -> list[TextSegment]:
        raise NotImplementedError

    def text_length(self, max_sequence_length: int) -> int:
        segments = self.text_segments(max_sequence_length)
        return segments[-1].start + segments[-1].length if segments else 0

    def embed_text(self, embeds: torch.Tensor) -> torch.Tensor:
        """Text-encoder states as the transformer's text stream enters its first block (concept tokens use this)."""
        return self.transformer.context_embedder(embeds)

    def text_key_mask(self, tables, positions: list[int]) -> torch.Tensor | None:
        """Which of these text positions each prompt's queries may attend to, (prompts, positions) bool, where the
        family's attention masks text keys (its T2I there is 0, as in the kernel); None where every key is seen."""
        return None

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Image tokens per column and row for an image of this size."""
        return height // self.token_pixels, width // self.token_pixels

    @property
    def max_image_side(self) -> int | None:
        """The largest image side in pixels the transformer's positions cover; None: any (Flux's RoPE has no table)."""
        return None

    @property
    def token_pixels(self) -> int:
        """The side in pixels of the square an image token covers. Most families pack 2x2 latent patches into one
        token (Flux, Qwen-Image, Flux.2); SD3 patchifies inside its transformer and says so itself."""
        return self.pipeline.vae_scale_factor * 2

    def mask_to_latents(self, mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """A (rows, cols) token-grid mask, broadcastable to one prompt's latents of this shape: by default packed
        latents, (tokens, channels) with the tokens in the grid's raster order."""
        return mask.flatten()[:, None]

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (batch, channels, height, width) in the layout the pipeline's sampler uses."""
        return latents

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of `pack_latents`, for an image of this size."""
        return latents

    def pipeline_arguments(self, height: int, width: int) -> dict[str, Any]:
        """Pipeline keywords this family needs to generate at this size (Kontext: its `max_area`)."""
        return {}

    def latents_from_vae(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents (the encoder's mode) as the sampler's latents: shifted, scaled and packed."""
        config = self.pipeline.vae.config
        return self.pack_latents((z - (config.shift_factor or 0.0)) * config.scaling_factor)

    def latents_to_vae(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The inverse of `latents_from_vae`, for an image of this size: what the VAE decodes."""
        config = self.pipeline.vae.config
        return self.unpack_latents(latents, height, width) / config.scaling_factor + (config.shift_factor or 0.0)

    def transformer_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents as the transformer takes them (Flux.2 packs its grid into tokens)."""
        return latents

    def transformer_output(self, velocity: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The transformer's output in the layout of the sampler latents `like`."""
        return velocity

    latent_channels_divisor = 1  # Flux packs 2x2 latent patches into one token of 4x the channels

    def initial_noise(self, batch: int, height: int, width: int, seed: int) -> torch.Tensor:
        """One initial latent, drawn exactly as the pipeline draws it for `seed`, repeated `batch` times."""
        pipe = self.pipeline
        channels = self.transformer.config.in_channels // self.latent_channels_divisor
        generator = torch.Generator("cpu").manual_seed(seed)
        # Pipelines conditioned on an image (Kontext, Qwen-Image-Edit) take it first in `prepare_latents`: none here.
        first = next(iter(inspect.signature(pipe.prepare_latents).parameters))
        image = (None,) if first in ("image", "images") else ()
        noise = pipe.prepare_latents(*image, 1, channels, height, width, self.transformer.dtype, torch.device("cpu"),
                                     generator)
        noise = noise[0] if isinstance(noise, tuple) else noise
        return noise.repeat(batch, *([1] * (noise.ndim - 1))).to(pipe.device)

    # -- taps ----------------------------------------------------------------
    def make_processor(self, attention: Attention, stock) -> TapProcessor:
        raise NotImplementedError

    def install_taps(self) -> None:
        """Replace each attention processor by its tapped twin (idempotent)."""
        for a in self.attentions:
            module = self.transformer.get_submodule(a.path)
            if not isinstance(module.processor, TapProcessor):
                self._stock[a.path] = module.processor
                if a.path not in self._tapped:
                    self._tapped[a.path] = self.make_processor(a, module.processor)
                # The attention backend chosen for the stock processor (now or since the last install) stays chosen.
                for setting in ("_attention_backend", "_parallel_config"):
                    setattr(self._tapped[a.path], setting, getattr(module.processor, setting, None))
                module.set_processor(self._tapped[a.path])
        if self.has_reference and self._reference_hook is None:
            self._reference_hook = self.transformer.register_forward_pre_hook(self._set_reference_length,
                                                                              with_kwargs=True)

    def _set_reference_length(self, transformer, args, kwargs) -> None:
        n = self.reference_length(kwargs)
        for processor in self._tapped.values():
            processor.reference_length = n

    def remove_taps(self) -> None:
        """Put the stock processors back."""
        for path, stock in self._stock.items():
            self.transformer.get_submodule(path).set_processor(stock)
        self._stock.clear()
        if self._reference_hook is not None:
            self._reference_hook.remove()
            self._reference_hook = None
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def taps_installed(self) -> bool:
        return all(isinstance(self.transformer.get_submodule(a.path).processor, TapProcessor)
                   for a in self.attentions)


class DoubleAndSingleBlocks(Family):
    """A Flux-style block list: double-stream `transformer_blocks`, then single-stream `single_transformer_blocks`,
    numbered globally (Flux.1, Chroma, Kontext, Flux.2)."""

    @property
    def num_double(self) -> int:
        return len(self.transformer.transformer_blocks)

    def _attentions(self) -> list[Attention]:
        double = self.num_double
        found = [Attention(i, "attn", f"transformer_blocks.{i}.attn", True) for i in range(double)]
        found += [Attention(double + j, "attn", f"single_transformer_blocks.{j}.attn", True)
                  for j in range(len(self.transformer.single_transformer_blocks))]
        return found

    def is_single(self, block: int) -> bool:
        return self.check_block(block) >= self.num_double

    def install_taps(self) -> None:
        """`Family.install_taps`, and hooks telling the single-stream blocks' processors how many rows of their joint
        [text | image] sequence are text: the transformer call's text length (Chroma's and Flux.2's blocks take the
        joint sequence alone), or the text a block is handed itself (Flux.1's blocks; Flux.2's in a concept call)."""
        super().install_taps()
        if not self._hooks:  # Family.remove_taps removes them with the taps
            self._hooks = [module.register_forward_pre_hook(self._set_text_length, with_kwargs=True)
                           for module in (self.transformer, *self.transformer.single_transformer_blocks)]

    def _set_text_length(self, module, args, kwargs) -> None:
        # Bound by the signature: Chroma's single-stream blocks take another argument where Flux.1's take the text.
        arguments = inspect.signature(type(module).forward).bind(module, *args, **kwargs).arguments
        text = arguments.get("encoder_hidden_states")
        if text is not None:
            for processor in self._tapped.values() if module is self.transformer else [module.attn.processor]:
                processor.text_length = text.shape[1]

    def block_labels(self) -> list[str]:
        """A name per block: its global index, and whether it is double- or single-stream."""
        return [f"{b} double" if b < self.num_double else f"{b} single {b - self.num_double}"
                for b in range(self.num_blocks)]

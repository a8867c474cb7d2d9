"""Qwen-Image-Edit (`QwenImageEditPipeline` over `QwenImageTransformer2DModel`): Qwen-Image with an input image.

The pipeline resizes the input image to about 1024x1024 pixels at its own aspect ratio (`calculate_dimensions`) and
feeds its packed latents after the output's in the image stream, each image a frame of its own in `img_shapes`
(diffusers 0.42): each block sees [text | image | reference]. Those tokens are the "reference" region: taps
`hook_q_ref`, ... and the maps R2I, I2R and T2R.

The text encoder sees the image too: the Edit chat template puts ``<|vision_start|><|image_pad|><|vision_end|>``
before the prompt, and the Qwen2.5-VL processor repeats ``<|image_pad|>`` once per merged vision patch of the resized
image. The pipeline drops the template's first 64 tokens (the system message and ``<|im_start|>user\\n``), so the
transformer's text is the vision tokens, the prompt, then ``<|im_end|>\\n<|im_start|>assistant\\n``: a word's text
positions follow the input image's vision tokens, and the word table counts them for the image last given to
recording, patching or editing (`calls_per_step`).

Qwen-Image-Edit-2509 (`QwenImageEditPlusPipeline`, `QwenImageEditPlusFamily`) takes one or more input images and one
prompt per call; its text holds a ``Picture i: `` block per image.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

from .. import validation
from .qwen_image import QwenImageFamily

# What the pipeline resizes the input image to, in pixels (`QwenImageEditPipeline.__call__`, diffusers 0.42).
_TARGET_AREA = 1024 * 1024
_IMAGE_PAD = "<|image_pad|>"


def _images(image: Any) -> list | None:
    """The input images of pipeline inputs as a list (one PIL image or a list of them), or None; refused where the
    pipeline could not size them."""
    if image is None:
        return None
    images = image if isinstance(image, list) else [image]
    if not images or not all(isinstance(getattr(i, "size", None), tuple) for i in images):
        raise validation.InvalidInput(f"the Qwen-Image-Edit pipelines size their input images by their PIL size; got "
                                      f"{type(image).__name__}: pass a PIL image (or a list of them) as image=")
    return images


def _same(image, other) -> bool:
    return other is image or (other.size == image.size and other.mode == image.mode
                              and other.tobytes() == image.tobytes())


class QwenImageEditFamily(QwenImageFamily):
    name = "qwen_image_edit"
    pipeline_classes = ("QwenImageEditPipeline",)
    has_reference = True
    needs_input_image = True  # diffusers 0.42.1 sizes the call by the input image and fails without one
    more_images_hint = " (Qwen-Image-Edit-2509, QwenImageEditPlusPipeline, takes several)"
    _pipeline_module = "pipeline_qwenimage_edit"
    _condition_area = _TARGET_AREA  # the text encoder sees a single input image as resized for the VAE

    def __init__(self, pipeline) -> None:
        super().__init__(pipeline)
        # (height, width) at which the text encoder saw each input image last given; a 1024x1024 one before any.
        self._vision_sizes = [self.resized((1024, 1024), self._condition_area)]

    def resized(self, size: tuple[int, int], area: int = _TARGET_AREA) -> tuple[int, int]:
        """(height, width) in pixels the pipeline resizes an input image of PIL size (width, height) to, for the VAE
        (about `area` pixels at its aspect ratio, sides multiples of 32: the pipeline's `calculate_dimensions`)."""
        module = importlib.import_module(f"diffusers.pipelines.qwenimage.{self._pipeline_module}")
        width, height = module.calculate_dimensions(area, size[0] / size[1])[:2]
        return height, width

    def reference_length(self, call: dict[str, Any]) -> int:
        """The reference tokens of a transformer call: those of every image after the first in `img_shapes`."""
        shapes = call.get("img_shapes")
        return 0 if not shapes else sum(math.prod(shape) for shape in shapes[0][1:])

    def reference_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """The input image's token grid as `QwenImageEditPipeline.__call__` sizes it: about 1024x1024 pixels at the
        image's aspect ratio, whatever height and width say."""
        images = _images(inputs.get("image"))
        if images is None:
            return None
        return self.grid(*self.resized(images[0].size))

    def calls_per_step(self, inputs: dict[str, Any]) -> int:
        """As Qwen-Image's; also checks the input images against the prompts (inputs without one are refused: the
        pipeline needs it) and takes the size the text encoder sees them at, which sets how many vision tokens the
        text holds (`chat_template`).

        The pipeline's processor takes one image per prompt: a batch of prompts needs ``image=[img] * len(prompts)``
        (the editors' source and target rows: two), one image repeated (the rows the probe adds take the first's).
        A single image reaches the text encoder resized as the VAE's, a list at the images' own size (diffusers
        0.42.1 resizes only a single image for it)."""
        calls = super().calls_per_step(inputs)
        prompts = inputs.get("prompt")
        n = 1 if isinstance(prompts, str) else len(prompts or [None])
        images = self.check_image_argument(inputs.get("image"), n)
        size = images[0].size
        self._vision_sizes = [self.resized(size) if not isinstance(inputs["image"], list) else size[::-1]]
        return calls

    def check_image_argument(self, image: Any, prompts: int) -> list:
        """The `image=` of a call of `prompts` prompts: one image, given once per prompt where there are several."""
        images = _images(image)
        self.check_input_images(images[:1] if images else [])  # none is refused; one image, once per prompt (below)
        if len(images) != prompts:
            raise validation.InvalidInput(f"QwenImageEditPipeline's processor takes one input image per prompt: "
                                          f"{prompts} prompts (an edit runs its source and target prompts together) "
                                          f"and {len(images)} images; pass image=[image] * {prompts}")
        if not all(_same(images[0], other) for other in images[1:]):
            raise validation.InvalidInput("the input images differ: the probe edits one image, given once per prompt "
                                          "(image=[img] * len(prompts))")
        return images

    def batch_inputs(self, inputs: dict[str, Any], rows: int) -> dict[str, Any]:
        """One input image per prompt: a list of them is resized to `rows` (its images are one image repeated, as
        `calls_per_step` asks)."""
        image = inputs.get("image")
        return {**inputs, "image": [image[0]] * rows} if isinstance(image, list) else inputs

    def image_inputs(self, images: list, rows: int) -> dict[str, Any]:
        """The input image as the model card's single-image call takes it for one prompt; for several (an edit's
        source and target rows) once per prompt as a list (`calls_per_step`), resized first as that call resizes it
        (the pipeline's `image_processor.resize` to `resized`): diffusers 0.42.1 hands a list's images to the text
        encoder at their own size, where a 12-megapixel photo would become thousands of vision tokens. The VAE then
        sees the image as in the single-image call wherever `resized` of the resized size is that size (every common
        aspect ratio; otherwise the list's reference grid is one 32-pixel step off on a side)."""
        if rows == 1:
            return {"image": images[0]}
        image = self.pipeline.image_processor.resize(images[0], *self.resized(images[0].size))
        return {"image": [image] * rows}

    def vision_tokens(self, size: tuple[int, int] | None = None) -> int:
        """How many ``<|image_pad|>`` tokens the processor writes for an image of this (height, width) in pixels
        (default: the last input image, at the size the text encoder saw it)."""
        counts = self.pipeline.processor._get_num_multimodal_tokens(image_sizes=[size or self._vision_sizes[0]])
        return int(counts["num_image_tokens"][0])

    def chat_template(self) -> str:
        """The Edit template with as many ``<|image_pad|>`` as the processor writes for the input image, its first
        `prompt_template_encode_start_idx` (64) tokens dropped: positions 0.. are the vision tokens, then the
        prompt. The pipeline does not cut the text at `max_sequence_length`; the table covers that many positions."""
        return self.pipeline.prompt_template_encode.replace(_IMAGE_PAD, _IMAGE_PAD * self.vision_tokens())


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-2509 (`QwenImageEditPlusPipeline`): one or more input images, each a frame of the image stream
    after the output's, at about 1024x1024 pixels for the VAE and 384x384 for the text encoder. The text holds
    ``Picture i: <|vision_start|>`` + vision tokens + ``<|vision_end|>`` per image, then the prompt. The pipeline
    runs one prompt at a time: diffusers 0.42.1's ``__call__`` raises for a batch of more than one, given as a prompt
    list or as prompt embeddings, so editing and activation patching, which run several rows in one call, are
    refused (Qwen-Image-Edit's `QwenImageEditPipeline` takes them); reference maps cover one input image."""

    name = "qwen_image_edit_plus"
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    max_input_images = None
    _pipeline_module = "pipeline_qwenimage_edit_plus"
    _condition_area = 384 * 384  # CONDITION_IMAGE_SIZE of the pipeline module

    def reference_grid(self, inputs: dict[str, Any]) -> tuple[int, int] | None:
        """The input image's token grid, where there is one (about 1024x1024 pixels at its aspect ratio)."""
        images = _images(inputs.get("image"))
        if images is not None and len(images) > 1:
            raise validation.InvalidInput(f"reference maps cover one input image; these inputs have {len(images)}: "
                                          f"record t2i / i2t (the taps *_ref hold every image's tokens), or pass one")
        return super().reference_grid(inputs)

    def calls_per_step(self, inputs: dict[str, Any]) -> int:
        """As Qwen-Image's; refuses a batch of prompts (the pipeline does) and inputs without an input image, and
        takes each input image's size as the text encoder sees it (`chat_template`)."""
        calls = QwenImageFamily.calls_per_step(self, inputs)
        prompts = inputs.get("prompt")
        if not isinstance(prompts, str) and len(prompts or [None]) != 1:
            raise validation.InvalidInput("QwenImageEditPlusPipeline runs one prompt at a time (diffusers 0.42.1 "
                                          "raises for a batch of more than one): give one prompt. Editing and "
                                          "activation patching run their rows as one batch, so they need "
                                          "Qwen-Image-Edit instead (QwenImageEditPipeline): load Qwen/Qwen-Image-Edit "
                                          "(preset qwen-image-edit) and give it the same input image")
        images = self.check_image_argument(inputs.get("image"), 1)
        self._vision_sizes = [self.resized(i.size, self._condition_area) for i in images]
        return calls

    def check_image_argument(self, image: Any, prompts: int) -> list:
        """One or several input images, for the one prompt of a call."""
        images = _images(image) or []
        self.check_input_images(images)
        return images

    def image_inputs(self, images: list, rows: int) -> dict[str, Any]:
        """Every input image, as a list: the pipeline gives each its own ``Picture i: `` block and frame."""
        return {"image": list(images)}

    def chat_template(self) -> str:
        """The template with the pipeline's ``Picture i: `` block per input image before the prompt (vision tokens
        counted for the images last given), its first 64 tokens dropped."""
        pictures = "".join(f"Picture {i + 1}: <|vision_start|>{_IMAGE_PAD * self.vision_tokens(size)}<|vision_end|>"
                           for i, size in enumerate(self._vision_sizes))
        return self.pipeline.prompt_template_encode.replace("{}", pictures + "{}")

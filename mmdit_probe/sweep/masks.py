"""Where a sweep's ground-truth masks come from: three small sources with one call signature.

A source is called as ``source(item, image, words)``, where `item` is the `PromptItem`, `image` the
generated (height, width, 3) uint8 image and `words` the (word index, word) pairs to score; it
returns {word index: boolean (height, width) mask}. A word it has no mask for is left out (and
recorded as unmasked). `describe()` names the source in the sweep's configuration.

>>> ToyMasks()(item, image, [(5, "red"), (6, "circle")])        # the Shapes world's own ground truth
>>> FolderMasks("masks/")(item, image, [(3, "cat")])             # masks/<prompt id>/cat.png
>>> GroundedSam("IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-base")(item, image, [(3, "cat")])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._lazy import lazy, resolve

# Mask sources offered by name whose code lives elsewhere: the Shapes world's in mmdit_probe.toy, found at call
# time, so that the sweep never imports the toy.
MASK_SOURCES = {"toy": "mmdit_probe.toy.sweep:ToyMasks"}
__getattr__, __dir__ = lazy(__name__, {"ToyMasks": "mmdit_probe.toy.sweep"})  # moved there; alias stays one release


class FolderMasks:
    """Masks drawn or computed elsewhere: ``ROOT/<prompt id>/<word>.png``, one per prompt and word,
    at the generated image's size; a pixel is inside when its grey value is above 127 (a colour or
    RGBA PNG is converted to grey first). Every word that is scored needs a file."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"mask folder {self.root} does not exist; it should hold <prompt id>/<word>.png")

    def describe(self) -> str:
        return f"folder:{self.root}"

    def __call__(self, item, image: np.ndarray, words: list[tuple[int, str]]) -> dict[int, np.ndarray]:
        masks = {}
        for i, word in words:
            path = self.root / item.id / f"{word}.png"
            if not path.exists():
                raise FileNotFoundError(
                    f"no mask for the word {word!r} of prompt {item.id!r} ({item.prompt!r}): expected {path}. "
                    "Add it, or choose the scored words with --words.")
            with Image.open(path) as picture:
                mask = np.asarray(picture.convert("L")) > 127
            if mask.shape != image.shape[:2]:
                raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but the generated images "
                                 f"are {image.shape[1]}x{image.shape[0]}; save masks at the generation size "
                                 "(--resolution)")
            masks[i] = mask
        return masks


class GroundedSam:
    """Grounding-DINO finds each word's boxes in the image, SAM turns them into one mask per word
    (the union of its boxes' masks). transformers' own classes; weights by hub id or local directory.

    A word that Grounding-DINO does not find above `box_threshold` gets no mask.
    """

    def __init__(self, detector: str = "IDEA-Research/grounding-dino-tiny", segmenter: str = "facebook/sam-vit-base",
                 *, box_threshold: float = 0.3, text_threshold: float = 0.25,
                 device: str | torch.device | None = None) -> None:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        self.names = (str(detector), str(segmenter))
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.detector_processor = GroundingDinoProcessor.from_pretrained(detector)
        self.detector = GroundingDinoForObjectDetection.from_pretrained(detector).to(self.device).eval()
        self.segmenter_processor = SamProcessor.from_pretrained(segmenter)
        self.segmenter = SamModel.from_pretrained(segmenter).to(self.device).eval()

    def describe(self) -> str:
        return (f"grounded-sam:{self.names[0]},{self.names[1]},box_threshold={self.box_threshold},"
                f"text_threshold={self.text_threshold}")

    @torch.no_grad()
    def boxes(self, image: Image.Image, word: str) -> torch.Tensor:
        """(n, 4) xyxy pixel boxes of `word` in the image (Grounding-DINO wants a lowercase phrase ending in '.')."""
        inputs = self.detector_processor(images=image, text=f"{word.lower()}.", return_tensors="pt").to(self.device)
        outputs = self.detector(**inputs)
        found = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs.input_ids, threshold=self.box_threshold, text_threshold=self.text_threshold,
            target_sizes=[image.size[::-1]])[0]
        return found["boxes"].float().cpu()

    @torch.no_grad()
    def segment(self, image: Image.Image, boxes: torch.Tensor) -> np.ndarray:
        """The union of SAM's masks for the boxes, boolean (height, width)."""
        inputs = self.segmenter_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        outputs = self.segmenter(**inputs.to(self.device), multimask_output=False)
        masks = self.segmenter_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())[0]
        return masks.bool().any(dim=(0, 1)).numpy()  # (boxes, 1, h, w) -> (h, w)

    def __call__(self, item, image: np.ndarray, words: list[tuple[int, str]]) -> dict[int, np.ndarray]:
        picture = Image.fromarray(image)
        masks = {}
        for word in dict.fromkeys(w for _, w in words):  # one detection per distinct word
            boxes = self.boxes(picture, word)
            if len(boxes):
                mask = self.segment(picture, boxes)
                masks.update({i: mask for i, w in words if w == word})
        return masks


def mask_source(spec: str, **options):
    """A mask source from its command-line name: "toy", "grounded-sam", or a folder path."""
    if spec in MASK_SOURCES:
        return resolve(MASK_SOURCES[spec])()
    if spec == "grounded-sam":
        return GroundedSam(**options)
    return FolderMasks(spec)

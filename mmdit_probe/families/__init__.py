"""Model family adapters. A family differs from another only in its layout facts and processors."""

from __future__ import annotations

from .base import Attention, Family, TextSegment, single_streams
from .chroma import ChromaFamily
from .flux import FluxFamily
from .flux2 import Flux2Family
from .kontext import FluxKontextFamily
from .qwen_image import QwenImageFamily
from .qwen_image_edit import QwenImageEditFamily, QwenImageEditPlusFamily
from .sd3 import SD3Family

FAMILIES: dict[str, type[Family]] = {"sd3": SD3Family, "flux": FluxFamily, "chroma": ChromaFamily,
                                     "flux-kontext": FluxKontextFamily, "qwen_image": QwenImageFamily,
                                     "qwen_image_edit": QwenImageEditFamily,
                                     "qwen_image_edit_plus": QwenImageEditPlusFamily,
                                     "flux2": Flux2Family}
# A transformer class marks the first family that names it (Kontext shares Flux.1's: its pipeline tells them apart).
_TRANSFORMERS: dict[str, str] = {}
for _name, _family in FAMILIES.items():
    _TRANSFORMERS.setdefault(_family.transformer_class, _name)


# Pipelines over a transformer a family knows whose calls the taps cannot follow: why, and what to load instead.
_REFUSED: dict[str, str] = {
    "Flux2KleinKVPipeline": "it runs the reference images' tokens at the first step only and caches their keys and "
                            "values for the later steps, inside cache-aware processors that the taps would replace, "
                            "so no tap or map would see the references after step 0; load the same checkpoint as "
                            "mmdit_probe.load(Flux2KleinPipeline.from_pretrained(...)) instead (the same "
                            "components), which runs the reference tokens through every step",
}


def supported() -> str:
    return ", ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)


def _refuse(pipeline_class: str) -> None:
    if pipeline_class in _REFUSED:
        raise TypeError(f"unsupported pipeline class {pipeline_class!r}: {_REFUSED[pipeline_class]}. mmdit_probe "
                        f"supports {supported()}")


def family_name_for_class(pipeline_class: str) -> str:
    _refuse(pipeline_class)
    for name, family in FAMILIES.items():
        if pipeline_class in family.pipeline_classes:
            return name
    raise TypeError(f"unsupported pipeline class {pipeline_class!r}; mmdit_probe supports {supported()}")


def family_for(pipeline) -> Family:
    """The adapter for a diffusers pipeline; raises naming the supported pipelines otherwise."""
    transformer = type(getattr(pipeline, "transformer", None)).__name__
    _refuse(type(pipeline).__name__)
    by_pipeline = [name for name, family in FAMILIES.items() if type(pipeline).__name__ in family.pipeline_classes]
    name = by_pipeline[0] if by_pipeline else _TRANSFORMERS.get(transformer) or family_name_for_class(
        type(pipeline).__name__)
    return FAMILIES[name](pipeline)


__all__ = ["Attention", "Family", "TextSegment", "FAMILIES", "family_for", "family_name_for_class", "supported",
           "single_streams"]

"""Editing by prompt: one module per method, real-image inversion beside them.

- `qk_injection`: the paper's editor, image q/k injection plus local blending from T2I masks
  (`edit`, also `Probe.edit`); on real images after `inversion` (`Probe.edit_image`).
- `flowedit`: FlowEdit, inversion-free editing of real images (the baseline).
- `inversion`: the initial noise that regenerates a real image (`invert`, also `Probe.invert`).

Each method is built from the public primitives (hook points, `patching`, the attention recorder),
so a new one is a module of the same kind.

>>> from mmdit_probe.editing import edit, flowedit, invert
"""

from .flowedit import flowedit
from .inversion import METHODS as INVERSION_METHODS
from .inversion import Inversion, invert, invert_latents
from .qk_injection import VARIANTS, EditResult, blend_mask, edit, edited_words

__all__ = ["edit", "EditResult", "VARIANTS", "edited_words", "blend_mask", "flowedit", "invert", "invert_latents",
           "Inversion", "INVERSION_METHODS"]

"""Editing by prompt: one module per method, over what they share (`base`, `value_sharing`).

- `qk_injection`: the paper's editor, image q/k injection plus local blending from T2I masks
  (`edit`, also `Probe.edit`); on real images after `inversion` (`Probe.edit_image`).
- `flowedit`: FlowEdit, inversion-free editing of real images (the baseline).
- `rf_solver`: RF-Solver's second-order sampler and RF-Solver-Edit (source values shared in late blocks).
- `fireflow`: FireFlow's one-call-per-step sampler and its value-sharing edit.
- `stable_flow`: Stable Flow, the source's image keys and values injected in the vital layers;
  `vital_layers` finds those layers (bypass one block at a time; also `Probe.vital_layers`).
- `kv_edit`: KV-Edit, the background's keys and values kept while the masked foreground is regenerated.
- `base`: what the methods share (`EditResult`, `edited_words`, `blend_mask`, ...); `value_sharing`: the edit
  of RF-Solver and FireFlow.
- inversion, the initial noise that regenerates a real image (`invert`, also `Probe.invert`; methods euler, heun,
  fixed-point, rf-solver, fireflow), is `mmdit_probe.sampling`'s (`editing.inversion` is its old name).

Each method is built from the public primitives (hook points, `patching`, the attention recorder,
`sampling`) and `base`, never from another method, so a new one is a module of the same kind.

>>> from mmdit_probe.editing import edit, flowedit, invert
"""

from ..constants import INVERSION_METHODS, VARIANTS
from ..sampling.inversion import Inversion, invert, invert_latents
from .base import EditResult, blend_mask, edited_words
from .fireflow import FIREFLOW_EDIT, fireflow_edit
from .flowedit import flowedit
from .kv_edit import kv_edit
from .qk_injection import edit
from .rf_solver import RF_SOLVER_EDIT, rf_solver_edit
from .stable_flow import PUBLISHED_LAYERS, stable_flow
from .value_sharing import ValueSharing
from .vital_layers import VitalLayers, bypassed, vital_layers

__all__ = ["edit", "EditResult", "VARIANTS", "edited_words", "blend_mask", "flowedit", "invert", "invert_latents",
           "Inversion", "INVERSION_METHODS", "rf_solver_edit", "fireflow_edit", "ValueSharing", "RF_SOLVER_EDIT",
           "FIREFLOW_EDIT", "stable_flow", "PUBLISHED_LAYERS", "vital_layers", "VitalLayers", "bypassed", "kv_edit"]

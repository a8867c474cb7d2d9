"""Patching: the row and position primitives (`primitives`), and activation patching as a whole
experiment over blocks, steps, token positions and guidance halves (`experiment`).

>>> from mmdit_probe.patching import patch, replace_rows, rows          # by hand, inside a trace
>>> from mmdit_probe.patching import activation_patching                 # a whole grid in one call
"""

from .._lazy import lazy
from .experiment import PatchingResult, activation_patching
from .primitives import blend_rows, patch, replace_rows, rows, set_rows, token_dim, zero_rows

# The Shapes world's metric lives in mmdit_probe.toy, found by name so that patching never imports the toy.
__getattr__, __dir__ = lazy(__name__, {"shapes_judge": "mmdit_probe.toy.patching"})

__all__ = ["rows", "replace_rows", "blend_rows", "zero_rows", "set_rows", "patch", "token_dim",
           "activation_patching", "PatchingResult", "shapes_judge"]

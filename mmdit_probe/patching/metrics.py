"""What each patched run of `activation_patching` is measured by: where it lies between the clean and
corrupt outputs (`projection`), or how far it moved from the unpatched base run (`distance`). A metric is
any f(patched (k, ...), clean, corrupt) -> (k,)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def projection(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
    """Where each patched output lies along clean -> corrupt: <p - clean, d> / <d, d>, d = corrupt - clean.

    0 at the clean output, 1 at the corrupt one (the language-model "logit difference" analogue), on
    whatever the outputs are (images or latents); NaN, with a warning, where clean equals corrupt.
    """
    d = corrupt.flatten().double() - clean.flatten().double()
    norm = d @ d
    if norm == 0:
        warnings.warn("the clean and corrupt outputs are identical: the projection metric is undefined (NaN); "
                      "use metric='distance'", UserWarning, stacklevel=3)
    return (patched.flatten(1).double() - clean.flatten().double()) @ d / norm


def distance(base: str) -> Metric:
    """The root-mean-square difference of each patched output from the unpatched base run (0 = unchanged)."""
    def rms(patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> torch.Tensor:
        reference = clean if base == "clean" else corrupt
        return (patched.flatten(1).double() - reference.flatten().double()).pow(2).mean(1).sqrt()

    return rms

"""What the entry points let the libraries print: their own lines, not diffusers' and transformers' chatter.
Torch-free, so a command's options are checked (and `--help` answered) before torch is imported."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# diffusers' own deprecations that its own code triggers, which no caller can act on: ChromaTransformer2DModel builds
# a FluxPosEmbed from the module that deprecates it (diffusers 0.42).
_INTERNAL_DEPRECATIONS = (r"`FluxPosEmbed` is deprecated",)


def quiet(*, future_warnings: bool = False) -> None:
    """Errors only from diffusers and transformers, no progress bars of theirs; `future_warnings=True` also
    silences FutureWarnings (a sweep's one progress bar and nothing else)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    if future_warnings:
        warnings.filterwarnings("ignore", category=FutureWarning)


@contextmanager
def internal_deprecations_hidden() -> Iterator[None]:
    """Hide diffusers' warnings about deprecations inside diffusers itself while building or loading a pipeline."""
    with warnings.catch_warnings():
        for message in _INTERNAL_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield

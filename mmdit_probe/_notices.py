"""What the entry points let the libraries print: their own lines, not diffusers' and transformers' chatter.
Torch-free, so a command's options are checked (and `--help` answered) before torch is imported."""

from __future__ import annotations

import warnings


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

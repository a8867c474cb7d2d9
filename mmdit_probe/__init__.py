"""mmdit_probe: look inside multimodal diffusion transformers (SD3, SD3.5, Flux.1, Kontext, Chroma, Qwen-Image, Flux.2).

>>> import mmdit_probe
>>> probe = mmdit_probe.load("toy")            # the shipped Shapes-world model; or "sd3-medium", a path, ...
>>> print(probe.info())
"""

import logging as _logging

# Import-time notices of optional backends (torchao, torch's pytree registry) say nothing about
# this package's work and drown a command's own output; errors still show. Set before anything
# imports torch or diffusers (they are imported lazily, on first use of `load` or `Probe`).
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


class _NoTorchvisionNotice(_logging.Filter):
    """transformers' notice that an image processor falls back to PIL without torchvision: the
    pipelines import those processors for IP-adapters only, which nothing here uses."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

from ._lazy import lazy  # noqa: E402
from .names import tap_name  # noqa: E402
from .presets import PRESETS, Preset, preset  # noqa: E402  (no torch: `mmdit-probe --help` stays fast)
from .tokens import TokenTable  # noqa: E402

# `load` and `Probe` import torch, diffusers and nnsight: only when first used.
__getattr__, __dir__ = lazy(__name__, {"load": ".probe", "Probe": ".probe"})

__all__ = ["load", "Probe", "Preset", "PRESETS", "preset", "tap_name", "TokenTable"]
__version__ = "0.1.0"

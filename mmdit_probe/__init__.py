"""mmdit_probe: look inside multimodal diffusion transformers (SD3, SD3.5, Flux.1).

>>> import mmdit_probe
>>> probe = mmdit_probe.load("toy")            # the shipped Shapes-world model; or "sd3-medium", a path, ...
>>> print(probe.info())
"""

from .presets import PRESETS, Preset, preset
from .probe import Probe, load
from .taps import tap_name
from .tokens import TokenTable

__all__ = ["load", "Probe", "Preset", "PRESETS", "preset", "tap_name", "TokenTable"]
__version__ = "0.1.0"

"""Sweeps over a prompt set: which blocks and steps give maps that match the objects.

>>> from mmdit_probe.sweep import sweep, sweep_report
>>> sweep("toy", "toy", "out/sweep", n=100, num_steps=8)        # or under torchrun / accelerate launch
>>> sweep_report("out/sweep")["top_layers"]
"""

from .._lazy import lazy

# Each name from its module, imported on first use: `mmdit-probe --help` registers the sweep's
# commands (sweep/commands.py) without importing torch.
_LAZY = {
    **dict.fromkeys(["FolderMasks", "GroundedSam", "ToyMasks", "mask_source"], ".masks"),
    "sweep_report": ".report",
    **dict.fromkeys(["ConfigMismatch", "PreparedSweep", "PromptItem", "SweepConfig", "SweepResult", "load_prompts",
                     "prepare_sweep", "read_record", "record_masks", "sweep", "toy_prompts"], ".run"),
}
__all__ = list(_LAZY)

__getattr__, __dir__ = lazy(__name__, _LAZY)

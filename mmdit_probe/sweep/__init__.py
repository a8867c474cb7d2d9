"""Sweeps over a prompt set: which blocks and steps give maps that match the objects.

>>> from mmdit_probe.sweep import sweep, sweep_report
>>> sweep("toy", "toy", "out/sweep", n=100, num_steps=8)        # or under torchrun / accelerate launch
>>> sweep_report("out/sweep")["top_layers"]
"""

from .masks import FolderMasks, GroundedSam, ToyMasks, mask_source
from .report import sweep_report
from .run import (
    ConfigMismatch,
    PromptItem,
    SweepConfig,
    SweepResult,
    load_prompts,
    read_record,
    record_masks,
    sweep,
    toy_prompts,
)

__all__ = ["sweep", "sweep_report", "toy_prompts", "load_prompts", "PromptItem", "SweepConfig", "SweepResult",
           "ConfigMismatch", "read_record", "record_masks", "ToyMasks", "FolderMasks", "GroundedSam", "mask_source"]

"""plotly heatmaps with hover and a slider; they keep working in exported HTML (no kernel needed)."""

from __future__ import annotations

import numpy as np
import plotly.express as px
import plotly.graph_objects as go

from ..maps import AttentionMaps, smooth
from .render import per


def heatmap(maps: AttentionMaps, word: str, *, by: str = "block", prompt: int = 0, kind: str = "t2i",
            smoothing: bool = False) -> go.Figure:
    """A word's map with a slider over blocks (by="block") or steps (by="step"); hover shows the value."""
    maps_by, labels = per(maps, by)
    values = np.stack([(smooth(m) if smoothing else m).numpy() for m in maps_by(word, prompt=prompt, kind=kind)])
    fig = px.imshow(values, animation_frame=0, color_continuous_scale="Inferno", origin="upper",
                    labels={"animation_frame": by, "color": kind.upper(), "x": "token column", "y": "token row"},
                    title=f"{kind.upper()} of {word!r} by {by}: {maps.prompts[prompt]!r}")
    for frame, label in zip(fig.frames, labels):
        frame.name = str(label)
        for trace in frame.data:
            trace.hovertemplate = f"{by} {label}<br>word {word}<br>row %{{y}}, col %{{x}}<br>value %{{z:.4f}}"
    fig.data[0].hovertemplate = fig.frames[0].data[0].hovertemplate
    for step, label in zip(fig.layout.sliders[0].steps, labels):
        step.label = str(label)
    fig.layout.sliders[0].currentvalue.prefix = f"{by} "
    return fig

"""An ipywidgets explorer of recorded maps: block, step, word (or concept), T2I/I2T/concept, smoothing, opacity.
Reference maps (Flux.1 Kontext) join the map choices where recorded: R2I / I2R of a reference patch (or the whole
reference) on the output, and T2R, a word's map over the reference grid (shown without the output image under it).

Everything is precomputed by the recording; a slider move only re-colours one small map, so it
is instant. With masks, a bar chart ranks the blocks, which is why a few layers are averaged.

>>> explorer(out.maps, masks={"cat": cat_mask})        # in a notebook cell
"""

from __future__ import annotations

import io

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..maps import AttentionMaps, smooth
from ..metrics import score_blocks
from ..tokens import FUNCTION_WORDS
from .figures import block_scores
from .render import colourise, overlay, png


class Explorer:
    """The widget state and its controls; `.widget` is what a notebook displays."""

    def __init__(self, maps: AttentionMaps, masks: dict | None = None, prompt: int = 0, size: int = 256,
                 word: str | None = None) -> None:
        self.maps, self.prompt, self.size = maps, prompt, size
        words = maps.recorded_words(prompt)
        if not words:
            raise ValueError("none of the prompt's words was recorded; record with positions='real' or 'all'")
        if word is not None and word not in words:
            raise ValueError(f"{word!r} is not among the prompt's recorded words: {words}")
        content = [w for w in words if w not in FUNCTION_WORDS]
        self.word = widgets.Dropdown(options=words, value=word or (content or words)[0], description="word")
        concepts = maps.concepts[prompt] if maps.concepts else []
        self.concept = widgets.Dropdown(options=concepts, value=concepts[0] if concepts else None,
                                        description="concept", disabled=not concepts)
        self.kind = widgets.ToggleButtons(options=[k.upper() for k in maps.kinds + maps.concept_kinds
                                                   + maps.reference_kinds], description="map")
        grid = maps.reference_grid or (0, 0)
        patches = [("whole reference", None)] + [(f"reference ({r}, {c})", (r, c)) for r in range(grid[0])
                                                 for c in range(grid[1])]
        self.patch = widgets.Dropdown(options=patches, value=None, description="patch",
                                      disabled=not maps.reference_kinds)
        self.block = widgets.SelectionSlider(options=maps.blocks, description="block")
        self.top = widgets.Checkbox(value=False, description=f"mean of top layers {list(maps.top_layers)}",
                                    disabled=not set(maps.top_layers) <= set(maps.blocks) or not maps.top_layers)
        self.step = widgets.SelectionSlider(options=maps.steps, description="step")
        self.all_steps = widgets.Checkbox(value=True, description="mean over all steps")
        self.smoothing = widgets.Checkbox(value=False, description="Gaussian smoothing (k=7, σ=1)")
        self.opacity = widgets.FloatSlider(value=0.6, min=0.0, max=1.0, step=0.05, description="opacity")
        self.image = widgets.Image(format="png", layout=widgets.Layout(width=f"{size}px", height=f"{size}px"))
        self.caption = widgets.HTML()
        controls = [self.word, self.concept, self.kind, self.block, self.top, self.step, self.all_steps,
                    self.smoothing, self.opacity, *([self.patch] if maps.reference_kinds else [])]
        for control in controls:
            control.observe(lambda change: self.update(), names="value")
        panels = [widgets.VBox([self.image, self.caption])]
        if masks:
            panels.append(self._scores_panel(masks))
        self.widget = widgets.VBox([widgets.HBox([widgets.VBox(controls[:5]), widgets.VBox(controls[5:])]),
                                    widgets.HBox(panels)])
        self.update()

    def current_map(self):
        kind = self.kind.value.lower()
        blocks = "top" if self.top.value else [self.block.value]
        steps = None if self.all_steps.value else [self.step.value]
        if kind in ("r2i", "i2r"):
            patches = None if self.patch.value is None else [self.patch.value]
            m = self.maps.reference(patches, prompt=self.prompt, kind=kind, blocks=blocks, steps=steps)
        else:
            name = self.concept.value if kind in self.maps.concept_kinds else self.word.value
            m = self.maps.word(name, prompt=self.prompt, kind=kind, blocks=blocks, steps=steps)
        return smooth(m) if self.smoothing.value else m

    def update(self) -> None:
        m = self.current_map()
        self.block.disabled, self.step.disabled = self.top.value, self.all_steps.value
        image = self.maps.images[self.prompt] if len(self.maps.images) > self.prompt else None
        image = None if self.kind.value.lower() == "t2r" else image  # over the reference grid, not the output
        rgb = overlay(image, m, self.opacity.value) if image is not None else colourise(m)
        self.image.value = png(rgb, scale=max(1, self.size // rgb.shape[0]))
        where = f"top layers {list(self.maps.top_layers)}" if self.top.value else f"block {self.block.value}"
        when = "all steps" if self.all_steps.value else f"step {self.step.value}"
        name = self.concept.value if self.kind.value.lower() in self.maps.concept_kinds else self.word.value
        if self.kind.value.lower() in ("r2i", "i2r"):
            name = "the whole reference" if self.patch.value is None else f"reference patch {self.patch.value}"
        self.caption.value = (f"<b>{self.kind.value}</b> of <b>{name}</b>, {where}, {when}; "
                              f"max {float(m.max()):.3f}")

    def _scores_panel(self, masks: dict) -> widgets.Widget:
        scores = [score_blocks(self.maps, masks, prompt=self.prompt, kind=k) for k in self.maps.kinds]
        fig = block_scores(scores)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        best = scores[0].top(5)
        note = widgets.HTML(f"Blocks ranked by soft IoU of their {scores[0].kind.upper()} maps against the masks. "
                            f"Best five: {best}. Averaging a few such blocks gives cleaner maps than all blocks.")
        return widgets.VBox([widgets.Image(value=buffer.getvalue(), format="png"), note])


def explorer(maps: AttentionMaps, masks: dict | None = None, prompt: int = 0, word: str | None = None
             ) -> widgets.Widget:
    """The explorer widget for recorded maps (display it in a notebook), opened on `word`
    (default: the prompt's first content word)."""
    return Explorer(maps, masks, prompt, word=word).widget

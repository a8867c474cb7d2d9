"""An ipywidgets explorer of recorded maps: block, step, word (or concept), T2I/I2T/concept, smoothing, opacity;
with I2I maps, a grid of the token patches to click: the clicked query patch's I2I map. Reference maps (Flux.1
Kontext) join the map choices where recorded: R2I / I2R of a reference patch (or the whole reference) on the output,
and T2R, a word's map over the reference grid (shown without the output image under it).

Everything is precomputed by the recording; a slider move only re-colours one small map, so it
is instant. With masks, a bar chart ranks the blocks, which is why a few layers are averaged.

>>> explorer(out.maps, masks={"cat": cat_mask})        # in a notebook cell
"""

from __future__ import annotations

import io
import math

import ipywidgets as widgets
import matplotlib.pyplot as plt

from ..maps import AttentionMaps, smooth
from ..metrics import score_blocks
from ..tokens import FUNCTION_WORDS
from .figures import block_scores
from .render import image_of, outline, picture, png

# The patch picker has at most this many buttons per side; on larger grids a button covers several tokens.
PICKER_SIDE = 32


class Explorer:
    """The widget state and its controls; `.widget` is what a notebook displays."""

    def __init__(self, maps: AttentionMaps, masks: dict | None = None, prompt: int = 0, size: int = 256,
                 word: str | None = None) -> None:
        self.maps, self.prompt, self.size = maps, prompt, size
        words = maps.recorded_words(prompt)
        if not words and maps.i2i is None:
            raise ValueError("none of the prompt's words was recorded; record with positions='real' or 'all'")
        if word is not None and word not in words:
            raise ValueError(f"{word!r} is not among the prompt's recorded words: {words}")
        content = [w for w in words if w not in FUNCTION_WORDS]
        self.word = widgets.Dropdown(options=words, value=word or (content or words or [None])[0], description="word")
        concepts = maps.concepts[prompt] if maps.concepts else []
        self.concept = widgets.Dropdown(options=concepts, value=concepts[0] if concepts else None,
                                        description="concept", disabled=not concepts)
        i2i = ("i2i",) if maps.i2i is not None else ()
        self.kind = widgets.ToggleButtons(options=[k.upper() for k in maps.kinds + maps.concept_kinds + i2i
                                                   + maps.reference_kinds], description="map")
        self.query = maps.query_patches[len(maps.queries) // 2] if i2i else None  # the I2I query patch shown
        self.buttons: dict[tuple[int, int], widgets.Button] = {}  # the picker's buttons of recorded patches
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
        if i2i:
            panels.append(self._picker())
        if masks and maps.kinds:
            panels.append(self._scores_panel(masks))
        self.widget = widgets.VBox([widgets.HBox([widgets.VBox(controls[:5]), widgets.VBox(controls[5:])]),
                                    widgets.HBox(panels)])
        self.update()

    def _picker(self) -> widgets.Widget:
        """A button per token cell; a cell holding recorded query patches selects the one nearest its centre."""
        rows, cols = self.maps.grid
        side = math.ceil(max(rows, cols) / PICKER_SIDE)
        recorded = self.maps.query_patches
        cells = []
        for top in range(0, rows, side):
            for left in range(0, cols, side):
                inside = [p for p in recorded if top <= p[0] < top + side and left <= p[1] < left + side]
                centre = (top + (side - 1) / 2, left + (side - 1) / 2)
                patch = min(inside, key=lambda p: (p[0] - centre[0]) ** 2 + (p[1] - centre[1]) ** 2, default=None)
                button = widgets.Button(disabled=patch is None, tooltip=str(patch) if patch else "not recorded",
                                        layout=widgets.Layout(width="14px", height="14px", padding="0"))
                if patch is not None:
                    button.on_click(lambda _, patch=patch: self.pick(patch))
                    self.buttons[patch] = button
                cells.append(button)
        grid = widgets.GridBox(cells, layout=widgets.Layout(
            grid_template_columns=f"repeat({math.ceil(cols / side)}, 14px)", grid_gap="1px"))
        self._mark_picked()
        return widgets.VBox([widgets.HTML("<b>I2I query</b>: click a patch"), grid])

    def _mark_picked(self) -> None:
        for patch, button in self.buttons.items():
            button.button_style = "info" if patch == self.query else ""

    def pick(self, patch: tuple[int, int]) -> None:
        """Show the I2I map of a recorded query patch (row, col), as a click on its picker cell does."""
        self.maps.query_columns(patch)
        self.query = tuple(patch)
        self._mark_picked()
        if self.kind.value != "I2I":
            self.kind.value = "I2I"  # redraws
        else:
            self.update()

    def current_map(self):
        kind = self.kind.value.lower()
        blocks = "top" if self.top.value else [self.block.value]
        steps = None if self.all_steps.value else [self.step.value]
        if kind == "i2i":
            m = self.maps.patch(self.query, prompt=self.prompt, blocks=blocks, steps=steps)
        elif kind in ("r2i", "i2r"):
            patches = None if self.patch.value is None else [self.patch.value]
            m = self.maps.reference(patches, prompt=self.prompt, kind=kind, blocks=blocks, steps=steps)
        else:
            name = self.concept.value if kind in self.maps.concept_kinds else self.word.value
            m = self.maps.word(name, prompt=self.prompt, kind=kind, blocks=blocks, steps=steps)
        return smooth(m) if self.smoothing.value else m

    def update(self) -> None:
        m = self.current_map()
        self.block.disabled, self.step.disabled = self.top.value, self.all_steps.value
        image = None if self.kind.value.lower() == "t2r" else image_of(self.maps, self.prompt)  # T2R: reference grid
        rgb = picture(image, m, self.opacity.value)
        if self.kind.value == "I2I":
            rgb = outline(rgb, self.query, self.maps.grid)
        self.image.value = png(rgb, scale=max(1, self.size // rgb.shape[0]))
        where = f"top layers {list(self.maps.top_layers)}" if self.top.value else f"block {self.block.value}"
        when = "all steps" if self.all_steps.value else f"step {self.step.value}"
        name = self.concept.value if self.kind.value.lower() in self.maps.concept_kinds else self.word.value
        name = f"patch {self.query}" if self.kind.value == "I2I" else name
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

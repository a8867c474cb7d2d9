"""Pictures of attention maps: matplotlib figures, plotly heatmaps, an ipywidgets explorer."""

from .explorer import Explorer, explorer
from .figures import block_scores, t2i_vs_i2t, three_kinds, word_grid
from .interactive import heatmap
from .render import colourise, overlay

__all__ = ["explorer", "Explorer", "word_grid", "t2i_vs_i2t", "three_kinds", "block_scores", "heatmap", "overlay",
           "colourise"]

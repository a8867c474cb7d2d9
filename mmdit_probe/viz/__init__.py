"""Pictures of attention maps: matplotlib figures, plotly heatmaps, an ipywidgets explorer."""

from .explorer import Explorer, explorer
from .figures import block_scores, i2i_maps, t2i_vs_i2t, t2t_matrix, three_kinds, word_grid
from .interactive import heatmap
from .render import colourise, outline, overlay

__all__ = ["explorer", "Explorer", "word_grid", "t2i_vs_i2t", "three_kinds", "block_scores", "heatmap", "overlay",
           "colourise", "i2i_maps", "t2t_matrix", "outline"]

"""Pictures of the engine: pure functions from a config, a trace or benchmark results to a Figure.

Same input, same pixels: nothing here reads a clock or a random source, and
:func:`save_figure` strips the PNG metadata that would differ between runs.
"""

from nanoengine.viz.anatomy import model_anatomy, parameter_counts
from nanoengine.viz.bench_plots import kv_cache_speed
from nanoengine.viz.style import save_figure
from nanoengine.viz.timeline import token_timeline

__all__ = ["kv_cache_speed", "model_anatomy", "parameter_counts", "save_figure", "token_timeline"]

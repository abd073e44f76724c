"""Pictures of the engine: pure functions from a config, a trace or benchmark results to a Figure.

Same input, same pixels: nothing here reads a clock or a random source, and
:func:`save_figure` strips the PNG metadata that would differ between runs.
"""

from nanoengine.viz.anatomy import model_anatomy, parameter_counts
from nanoengine.viz.animation import allocation_animation, explore
from nanoengine.viz.bench_plots import kv_cache_speed
from nanoengine.viz.block_pool import block_pool_grid, block_tables, slot_states, trace_colors
from nanoengine.viz.examples import example_paging_manager, example_paging_trace
from nanoengine.viz.kernel import kernel_thread_mapping
from nanoengine.viz.memory import paged_vs_contiguous
from nanoengine.viz.style import save_figure
from nanoengine.viz.timeline import token_timeline

__all__ = [
    "allocation_animation", "block_pool_grid", "block_tables", "example_paging_manager", "example_paging_trace",
    "explore", "kernel_thread_mapping", "kv_cache_speed", "model_anatomy", "paged_vs_contiguous", "parameter_counts",
    "save_figure", "slot_states", "token_timeline", "trace_colors",
]

"""Pictures of the engine: pure functions from a config, a trace or benchmark results to a Figure.

Same input, same pixels: nothing here reads a clock or a random source, and
:func:`save_figure` strips the PNG metadata that would differ between runs.
"""

from nanoengine.viz.anatomy import model_anatomy, parameter_counts
from nanoengine.viz.animation import allocation_animation, explore
from nanoengine.viz.bench_plots import batching_throughput, chunk_size_tradeoff, kv_cache_speed, progression_chart
from nanoengine.viz.beam_tree import beam_tree, beam_trie
from nanoengine.viz.block_pool import block_pool_grid, block_tables, slot_states, trace_colors
from nanoengine.viz.examples import (
    example_beam_output,
    example_logits,
    example_lora_trace,
    example_paging_manager,
    example_paging_trace,
    example_prefix_manager,
    example_prefix_trace,
    example_scheduler_trace,
    example_sliding_traces,
)
from nanoengine.viz.gantt import adapter_gantt, gantt_states, scheduler_gantt, step_adapters
from nanoengine.viz.kernel import kernel_thread_mapping
from nanoengine.viz.memory import paged_vs_contiguous
from nanoengine.viz.parallel import tensor_parallel_sharding
from nanoengine.viz.prefix_tree import cache_hits_per_request, prefix_tree, prefix_tree_nodes
from nanoengine.viz.quantization import (
    LESSON11_FORMATS,
    format_errors,
    quantization_error_histogram,
    quantization_tradeoff,
    tradeoff_row,
)
from nanoengine.viz.request_life import RequestLife, request_lives
from nanoengine.viz.sampling_effects import sampling_distributions, sampling_effects
from nanoengine.viz.sliding_window import blocks_held, last_table, sliding_window_blocks, sliding_window_bound
from nanoengine.viz.speculation import accepted_per_step, speculation_speedup
from nanoengine.viz.step_profile import step_waterfall
from nanoengine.viz.style import save_figure
from nanoengine.viz.timeline import token_timeline

__all__ = [
    "accepted_per_step", "adapter_gantt", "allocation_animation", "batching_throughput", "beam_tree", "beam_trie",
    "block_pool_grid", "block_tables", "blocks_held", "cache_hits_per_request", "chunk_size_tradeoff",
    "example_beam_output",
    "example_logits", "example_lora_trace", "example_paging_manager", "example_paging_trace",
    "example_prefix_manager", "example_prefix_trace", "example_scheduler_trace", "example_sliding_traces", "explore",
    "gantt_states", "last_table",
    "kernel_thread_mapping", "kv_cache_speed", "model_anatomy", "paged_vs_contiguous", "parameter_counts",
    "prefix_tree", "prefix_tree_nodes", "progression_chart", "quantization_error_histogram", "quantization_tradeoff",
    "tradeoff_row", "LESSON11_FORMATS", "format_errors", "request_lives", "RequestLife", "sampling_distributions",
    "sampling_effects", "save_figure", "scheduler_gantt", "sliding_window_blocks", "sliding_window_bound",
    "slot_states", "speculation_speedup", "step_adapters", "step_waterfall",
    "tensor_parallel_sharding", "token_timeline", "trace_colors",
]

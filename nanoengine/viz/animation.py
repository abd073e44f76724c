"""Lesson 03's block pool in motion: one frame per engine step of a trace.

Colours come from every request in the whole trace, so a request keeps its colour from
the frame it is admitted to the frame it is freed.
"""

from __future__ import annotations

from matplotlib.animation import FuncAnimation

from nanoengine.trace import PoolSnapshot, Trace, replay
from nanoengine.viz.block_pool import block_pool_grid, trace_colors
from nanoengine.viz.style import figure_png


def allocation_animation(trace: Trace) -> FuncAnimation:
    """One frame per :func:`replay` snapshot, titled ``step N``; ``anim.to_jshtml()`` gives a notebook player."""
    snapshots = replay(trace)
    colors = trace_colors(trace)
    fig = block_pool_grid(snapshots[0], trace.block_size, colors=colors)
    ax = fig.axes[0]

    def draw(frame: int) -> None:
        ax.clear()
        block_pool_grid(snapshots[frame], trace.block_size, ax=ax, title=_frame_title(snapshots[frame]), colors=colors)

    return FuncAnimation(fig, draw, frames=len(snapshots), interval=800, repeat=False)


def explore(trace: Trace) -> object:
    """A step slider redrawing the pool (ipywidgets), or the :func:`allocation_animation` player
    as HTML where ipywidgets is not installed. For notebooks."""
    try:
        import ipywidgets
    except ImportError:
        from IPython.display import HTML

        return HTML(allocation_animation(trace).to_jshtml())
    snapshots = replay(trace)
    colors = trace_colors(trace)

    def png(frame: int) -> bytes:
        snapshot = snapshots[frame]
        return figure_png(block_pool_grid(snapshot, trace.block_size, title=_frame_title(snapshot), colors=colors))

    slider = ipywidgets.IntSlider(value=0, min=0, max=len(snapshots) - 1, description="snapshot")
    image = ipywidgets.Image(value=png(0), format="png")
    slider.observe(lambda change: setattr(image, "value", png(change["new"])), names="value")
    return ipywidgets.VBox([slider, image])


def _frame_title(snapshot: PoolSnapshot) -> str:
    used = sum(owner is not None for owner in snapshot.owner)
    return f"step {snapshot.step}: {used} of {len(snapshot.owner)} blocks used"

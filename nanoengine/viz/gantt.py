"""Lessons 06–07's picture of the scheduler: a Gantt chart of requests over engine steps.

Rows are requests in arrival order, columns are engine steps, and each cell says what the
request did in that step. Above it, the tokens each step computed against the token
budget. :func:`gantt_states` reads the trace into plain lists (the testable part);
:func:`scheduler_gantt` only draws them. Lesson 14's :func:`adapter_gantt` draws the same
states in the colour of each request's LoRA adapter, under the adapters each step ran.

How the trace is read. The scheduler records ``arrive`` (the prompt), ``preempt`` and
``schedule`` (the chunk computed, from ``first_position``) during step ``s`` with
``event.step == s``, then ``next_step()`` records a ``step`` event. The engine finishes a
request after its step ran, so a ``finish`` event carries ``step == s + 1``: the request
used columns up to ``s`` and is gone from ``s + 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from nanoengine.trace import Trace
from nanoengine.viz.style import COLORS, pale

WAITING = "waiting"  # arrived (or preempted), not running: owns no blocks
STALLED = "stalled"  # running (owns blocks) but the step's budget ran out before its turn
PREFILL = "prefill"  # computed a chunk of its prompt
DECODE = "decode"  # computed one new token after its prompt
RECOMPUTE = "recompute"  # after a preemption: recomputing tokens whose K/V were thrown away
PREEMPTED = "preempted"  # lost its blocks in this step and went back to waiting
COMPUTING = (PREFILL, RECOMPUTE, DECODE)  # the states that spend budget, in stacking order

_STYLE = {  # face colour, hatch, legend label
    WAITING: ("#E4E4E4", None, "waiting (no blocks)"),
    STALLED: ("#E4E4E4", "....", "running, but no budget left this step"),
    PREFILL: (COLORS["prompt"], None, "prefill chunk"),
    DECODE: (COLORS["new"], None, "decode (one token)"),
    RECOMPUTE: ("#C44E52", "////", "recompute after preemption"),
    PREEMPTED: ("#2B2B2B", None, "preempted: blocks freed"),
}
_FINISH_COLOR = "#2E7D32"
# Lesson 14's chart: a colour per adapter, the base model grey; the state is a shade of it.
BASE_MODEL = "base model"
_BASE_COLOR = "#8C8C8C"
_ADAPTER_PALETTE = ("#55A868", "#8172B3", "#DD8452", "#64B5CD", "#C44E52", "#CCB974", "#DA8BC3", "#937860", "#4C72B0")
_PALE = 0.3
_HATCH_OF = {STALLED: "....", PREFILL: "////", RECOMPUTE: "xxxx"}  # hatches; waiting is pale, decode solid
_ANNOTATE_MAX_STEPS, _ANNOTATE_MAX_ROWS = 50, 16
_BUDGET_ON_SCALE = 4  # draw the budget line only when it is at most this many times the largest step


@dataclasses.dataclass(frozen=True, slots=True)
class GanttData:
    """What the chart draws.

    ``states[i][s]`` is request ``i``'s state in step ``s`` (one of the module's state names)
    or None (not yet arrived, or finished); ``chunk_sizes[i][s]`` the tokens it computed in
    that step; ``tokens_per_step[kind][s]`` the step's tokens of each computing kind;
    ``finished_at[i]`` the first step the request was gone (None while unfinished).
    """

    request_ids: list[str]
    prompt_lens: list[int]
    states: list[list[str | None]]
    chunk_sizes: list[list[int]]
    tokens_per_step: dict[str, list[int]]
    finished_at: list[int | None]
    num_preemptions: int

    @property
    def num_steps(self) -> int:
        return len(self.tokens_per_step[DECODE])

    def total_tokens_per_step(self) -> list[int]:
        return [sum(column) for column in zip(*(self.tokens_per_step[k] for k in COMPUTING))]


def gantt_states(trace: Trace) -> GanttData:
    """Read a scheduler trace into a state per request per step.

    A chunk is *recompute* when it starts below the furthest position the request had
    already computed (only a preemption sends it back); otherwise *prefill* while it starts
    inside the prompt, else *decode*. A request with no chunk in a step is *waiting*, or
    *stalled* if it holds blocks (it was scheduled since its last arrival or preemption).
    """
    computing_kinds = ("arrive", "schedule", "preempt")
    num_steps = max([trace.step] + [e.step + 1 for e in trace.events if e.kind in computing_kinds])
    ids, prompt_lens, arrived, finished_at = [], [], [], []
    events_of: list[dict[int, tuple[str, int]]] = []  # row -> step -> (state, tokens)
    live: dict[str, int] = {}  # request id -> row (an id may be reused after it finished)
    furthest: dict[int, int] = {}
    for e in trace.events:
        if e.kind == "arrive":
            live[e.request_id] = len(ids)
            ids.append(e.request_id)
            prompt_lens.append(len(e.token_ids))
            arrived.append(e.step)
            finished_at.append(None)
            events_of.append({})
        elif e.kind in ("schedule", "preempt", "finish") and e.request_id in live:
            row = live[e.request_id]
            if e.kind == "finish":
                finished_at[row] = e.step
                del live[e.request_id]
            elif e.kind == "preempt":
                events_of[row][e.step] = (PREEMPTED, 0)
            else:
                done = furthest.get(row, 0)
                if e.first_position < done:
                    state = RECOMPUTE
                else:
                    state = PREFILL if e.first_position < prompt_lens[row] else DECODE
                furthest[row] = max(done, e.first_position + len(e.token_ids))
                events_of[row][e.step] = (state, len(e.token_ids))

    states: list[list[str | None]] = []
    chunks: list[list[int]] = []
    tokens = {kind: [0] * num_steps for kind in COMPUTING}
    for row in range(len(ids)):
        end = finished_at[row] if finished_at[row] is not None else num_steps
        row_states: list[str | None] = [None] * num_steps
        row_chunks = [0] * num_steps
        running = False  # holds blocks: from its first chunk until a preemption
        for step in range(arrived[row], min(end, num_steps)):
            state, count = events_of[row].get(step, (STALLED if running else WAITING, 0))
            running = state != PREEMPTED and (running or state in COMPUTING)
            row_states[step], row_chunks[step] = state, count
            if state in tokens:
                tokens[state][step] += count
        states.append(row_states)
        chunks.append(row_chunks)
    return GanttData(ids, prompt_lens, states, chunks, tokens, finished_at,
                     sum(e.kind == "preempt" for e in trace.events))


def scheduler_gantt(trace: Trace, token_budget: int | None = None, title: str | None = None) -> Figure:
    """The scheduler's work as a Gantt chart: a row per request (arrival order), a column per
    step, each cell coloured by what the request did then; a ✓ where it finished. The top
    panel stacks each step's tokens by kind, with the budget as a line when ``token_budget``
    is given. Small charts write each prefill or recompute chunk's size in its cell.
    """
    data = gantt_states(trace)
    fig, bars, chart = _gantt_axes(data, bars_h=1.7)
    _draw_bars(bars, data, token_budget)
    _draw_cells(chart, data)
    if title is None:
        title = (f"The scheduler, step by step: {len(data.request_ids)} requests, {data.num_steps} steps, "
                 f"{data.num_preemptions} preemption{'s' if data.num_preemptions != 1 else ''}")
    handles = [Patch(fc=_STYLE[s][0], hatch=_STYLE[s][1], ec="white", label=_STYLE[s][2])
               for s in (WAITING, PREFILL, DECODE, PREEMPTED, RECOMPUTE)]
    if _annotated(data):
        handles[1].set_label("prefill chunk (number: its tokens)")
    if any(STALLED in row for row in data.states):
        face, hatch, label = _STYLE[STALLED]
        handles.insert(1, Patch(fc=face, hatch=hatch, ec="#999999", label=label))
    handles.append(_finish_handle())
    _finish_axes(fig, bars, chart, data, title)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8.5, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def step_adapters(data: GanttData, adapter_of: Mapping[str, str | None]) -> list[list[str]]:
    """The adapters each step ran, sorted by name: those of the requests that computed tokens
    in it (a base-model request adds none). ``adapter_of`` as in :func:`adapter_gantt`."""
    names = [adapter_of.get(rid) for rid in data.request_ids]
    return [sorted({name for name, states in zip(names, data.states) if name and states[step] in COMPUTING})
            for step in range(data.num_steps)]


def adapter_gantt(trace: Trace, adapter_of: Mapping[str, str | None], max_loras: int | None = None,
                  title: str | None = None) -> Figure:
    """Lesson 14's Gantt chart: a row per request, a column per step, each cell in the colour of
    the request's adapter (the base model in grey): pale while it waits, hatched for a prefill
    chunk, solid for a decode, black where it was preempted; a ✓ where it finished. The top
    panel stacks the adapters each step ran, a box each, with ``max_loras`` as a line when
    given: a request whose adapter would be one too many waits while the others run.

    ``adapter_of`` maps a request id to its adapter's name; a request it leaves out, or maps
    to None, runs the base model.
    """
    data = gantt_states(trace)
    names = [adapter_of.get(rid) or BASE_MODEL for rid in data.request_ids]
    colors = _adapter_colors(names)
    per_step = step_adapters(data, adapter_of)
    fig, bars, chart = _gantt_axes(data, bars_h=1.3)
    _draw_adapter_bars(bars, per_step, colors, max_loras)
    _draw_adapter_cells(chart, data, names, colors)
    _finish_rows(chart, data, names)
    if title is None:
        num_adapters = len(colors) - (BASE_MODEL in colors)
        title = (f"Adapters, step by step: {len(data.request_ids)} requests, {num_adapters} "
                 f"adapter{'s' if num_adapters != 1 else ''}" + (" and the base model" if BASE_MODEL in colors else "")
                 + (f", max_loras = {max_loras}" if max_loras is not None else ""))
    _finish_axes(fig, bars, chart, data, title)
    adapters = [Patch(fc=color, ec="white", label=name) for name, color in colors.items()]
    shades = [Patch(fc=pale(_BASE_COLOR, _PALE), ec="white", label="waiting (pale)"),
              Patch(fc=_BASE_COLOR, hatch=_HATCH_OF[PREFILL], ec="white", label="prefill chunk (hatched)"),
              Patch(fc=_BASE_COLOR, ec="white", label="decode (solid)")]
    present = {state for row in data.states for state in row}
    if STALLED in present:
        shades.insert(1, Patch(fc=pale(_BASE_COLOR, _PALE), hatch=_HATCH_OF[STALLED], ec="white",
                               label="running, no budget left (dotted)"))
    if PREEMPTED in present:
        shades.append(Patch(fc=_STYLE[PREEMPTED][0], label=_STYLE[PREEMPTED][2]))
    if RECOMPUTE in present:
        shades.append(Patch(fc=_BASE_COLOR, hatch=_HATCH_OF[RECOMPUTE], ec="white", label=_STYLE[RECOMPUTE][2]))
    fig.legend(handles=adapters, title="colour: its adapter", loc="lower left", ncol=2, fontsize=8.5,
               title_fontsize=8.5, frameon=False, bbox_to_anchor=(0.02, 0.0))
    fig.legend(handles=[*shades, _finish_handle()], title="shade: what it did in the step", loc="lower right",
               ncol=2, fontsize=8.5, title_fontsize=8.5, frameon=False, bbox_to_anchor=(0.98, 0.0))
    return fig


def _adapter_colors(names: list[str]) -> dict[str, str]:
    """A colour per adapter, by sorted name (the same names always get the same colours); the
    base model grey, last."""
    adapters = sorted(set(names) - {BASE_MODEL})
    colors = {name: _ADAPTER_PALETTE[i % len(_ADAPTER_PALETTE)] for i, name in enumerate(adapters)}
    if BASE_MODEL in names:
        colors[BASE_MODEL] = _BASE_COLOR
    return colors


def _draw_adapter_bars(ax: Axes, per_step: list[list[str]], colors: dict[str, str], max_loras: int | None) -> None:
    """One box per adapter a step ran, stacked in name order."""
    for name, color in colors.items():
        boxes = [(step, names.index(name)) for step, names in enumerate(per_step) if name in names]
        if boxes:
            steps, bottoms = zip(*boxes)
            ax.bar(steps, [1] * len(steps), bottom=bottoms, width=0.8, color=color, edgecolor="white", lw=1.0,
                   gid=name)
    top = max((len(names) for names in per_step), default=0)
    if max_loras is not None:
        _limit_line(ax, max_loras, f"max_loras {max_loras}")
        top = max(top, max_loras)
    ax.set_ylim(0, max(1, top) * 1.35)
    _bars_axis(ax, "adapters\nin the step")


def _draw_adapter_cells(ax: Axes, data: GanttData, names: list[str], colors: dict[str, str]) -> None:
    """A collection per (adapter, state), with gid ``"{adapter}:{state}"``."""
    cells: dict[tuple[str, str], list[Rectangle]] = {}
    for row, row_states in enumerate(data.states):
        for step, state in enumerate(row_states):
            if state is not None:
                cells.setdefault((names[row], state), []).append(Rectangle((step - 0.5, row - 0.5), 1, 1))
    for (name, state), rects in cells.items():
        face = colors[name]
        if state in (WAITING, STALLED):
            face = pale(face, _PALE)
        elif state == PREEMPTED:
            face = _STYLE[PREEMPTED][0]
        ax.add_collection(PatchCollection(rects, fc=face, ec="white", lw=1.0, hatch=_HATCH_OF.get(state),
                                          gid=f"{name}:{state}"))


def _gantt_axes(data: GanttData, bars_h: float) -> tuple[Figure, Axes, Axes]:
    """The figure: a panel of per-step bars ``bars_h`` inches high over the chart, a step a column."""
    num_rows, num_steps = len(data.request_ids), max(data.num_steps, 1)
    width = min(16.0, max(10.0, 2.8 + 0.45 * num_steps))
    row_h = 0.42 if num_rows <= 16 else max(0.08, 6.0 / num_rows)
    gantt_h = num_rows * row_h + 0.2
    fig = Figure(figsize=(width, gantt_h + bars_h + 1.9))
    grid = fig.add_gridspec(2, 1, height_ratios=(bars_h, gantt_h), hspace=0.08,
                            left=2.2 / width, right=1 - 0.3 / width,
                            top=1 - 0.55 / fig.get_figheight(), bottom=1.05 / fig.get_figheight())
    bars = fig.add_subplot(grid[0])
    return fig, bars, fig.add_subplot(grid[1], sharex=bars)


def _finish_axes(fig: Figure, bars: Axes, chart: Axes, data: GanttData, title: str) -> None:
    num_steps = max(data.num_steps, 1)
    chart.set_xlim(-0.5, num_steps - 0.5 + 0.6)  # room for the last ✓
    chart.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(num_steps, 30)))
    chart.set_xlabel("engine step")
    bars.tick_params(labelbottom=False)
    bars.set_title(title, fontsize=11)


def _finish_handle() -> Line2D:
    return Line2D([], [], ls="none", marker="$✓$", ms=9, color=_FINISH_COLOR,
                  label="finished: blocks freed at the end of the step")


def _annotated(data: GanttData) -> bool:
    """Small charts get numbers in their cells; on big ones they would be unreadable."""
    return data.num_steps <= _ANNOTATE_MAX_STEPS and len(data.request_ids) <= _ANNOTATE_MAX_ROWS


def _draw_bars(ax, data: GanttData, token_budget: int | None) -> None:
    steps = list(range(data.num_steps))
    bottom = [0] * data.num_steps
    for kind in COMPUTING:
        values = data.tokens_per_step[kind]
        if any(values):
            face, hatch, _ = _STYLE[kind]
            ax.bar(steps, values, bottom=bottom, width=0.8, color=face, hatch=hatch, edgecolor="white", lw=0.5)
            bottom = [b + v for b, v in zip(bottom, values)]
    top = max(bottom, default=0)
    if token_budget is not None and token_budget <= _BUDGET_ON_SCALE * max(top, 1):
        _limit_line(ax, token_budget, f"token budget {token_budget}")
        top = max(top, token_budget)
    elif token_budget is not None:  # a line far above the bars would flatten them to nothing
        ax.text(1.0, 1.0, f"token budget {token_budget} (far above the largest step)", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="#333333")
    if _annotated(data):
        for step, total in enumerate(bottom):
            if total:
                ax.text(step, total, str(total), ha="center", va="bottom", fontsize=7.5, color="#444444")
    ax.set_ylim(0, max(1, top) * 1.25)
    _bars_axis(ax, "tokens\nin the step")


def _limit_line(ax: Axes, value: int, label: str) -> None:
    ax.axhline(value, color="#333333", ls="--", lw=1.2)
    ax.text(1.0, value, label, transform=ax.get_yaxis_transform(), ha="right",
            va="bottom", fontsize=8, color="#333333", bbox=dict(fc="white", ec="none", pad=1))


def _bars_axis(ax: Axes, ylabel: str) -> None:
    ax.set_ylabel(ylabel, fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _draw_cells(ax, data: GanttData) -> None:
    cells: dict[str, list[Rectangle]] = {state: [] for state in _STYLE}
    annotate = _annotated(data)
    for row, row_states in enumerate(data.states):
        for step, state in enumerate(row_states):
            if state is None:
                continue
            cells[state].append(Rectangle((step - 0.5, row - 0.5), 1, 1))
            if annotate and state in (PREFILL, RECOMPUTE):
                ax.text(step, row, str(data.chunk_sizes[row][step]), ha="center", va="center", fontsize=8.5,
                        color="white", weight="bold",
                        path_effects=[patheffects.withStroke(linewidth=2.5, foreground=_STYLE[state][0])])
            if annotate and state == PREEMPTED:
                ax.text(step, row, "×", ha="center", va="center", fontsize=12, color="white", weight="bold")
    for state, rects in cells.items():
        face, hatch, _ = _STYLE[state]
        ax.add_collection(PatchCollection(rects, fc=face, ec="white", lw=1.0, hatch=hatch, gid=state))
    _finish_rows(ax, data, [f"{n}-token prompt" for n in data.prompt_lens])


def _finish_rows(ax: Axes, data: GanttData, details: list[str]) -> None:
    """A ✓ where each request finished; rows labelled by request id (and ``details`` when small)."""
    for row, step in enumerate(data.finished_at):
        if step is not None:
            ax.text(step - 0.5 + 0.05, row, "✓", ha="left", va="center", fontsize=11, color=_FINISH_COLOR,
                    weight="bold")
    ax.set_yticks(range(len(data.request_ids)))
    small = len(data.request_ids) <= _ANNOTATE_MAX_ROWS
    ax.set_yticklabels([f"{rid}  ({detail})" if small else rid
                        for rid, detail in zip(data.request_ids, details)], fontsize=9 if small else 6)
    ax.set_ylim(max(len(data.request_ids), 1) - 0.5, -0.5)
    ax.set_ylabel("requests, in order of arrival", fontsize=9)
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)

"""Lesson 10's pictures: the acceptance figure shows exactly the recorded verifications, the
speed-up figure exactly the recorded ratios, and both are deterministic."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from nanoengine.viz import accepted_per_step, speculation_speedup  # noqa: E402
from nanoengine.viz.style import figure_png  # noqa: E402

pytestmark = pytest.mark.l10

# (step, guesses, accepted): full acceptance, none, partial, and a step with fewer guesses
HISTORY = [(1, 4, 4), (2, 4, 0), (3, 4, 2), (4, 2, 2), (5, 4, 0), (6, 4, 1)]


def _heights(ax) -> list[float]:
    return [patch.get_height() for patch in ax.patches]


def test_the_timeline_stacks_accepted_guesses_and_the_targets_token_under_the_guesses():
    fig = accepted_per_step(HISTORY, last=4)
    timeline, _ = fig.axes
    accepted, own, guessed = (list(c) for c in timeline.containers)
    shown = HISTORY[-4:]
    assert [p.get_height() for p in accepted] == [a for _, _, a in shown]
    assert [p.get_height() for p in own] == [1] * 4
    assert [p.get_y() for p in own] == [a for _, _, a in shown], "the target's token sits on the accepted ones"
    assert [p.get_height() for p in guessed] == [g for _, g, _ in shown]
    assert [p.get_x() + p.get_width() / 2 for p in accepted] == [2, 3, 4, 5], "numbered within the whole history"


def test_the_histogram_counts_tokens_emitted_per_verification_over_the_whole_history():
    fig = accepted_per_step(HISTORY, last=2)
    _, counts = fig.axes
    emitted = [a + 1 for _, _, a in HISTORY]
    assert _heights(counts) == [emitted.count(n) for n in range(1, 6)]
    (mean_line,) = counts.lines
    assert mean_line.get_xdata()[0] == pytest.approx(sum(emitted) / len(emitted))


def _result(batch: int, speed: float) -> dict:
    return {"batch_size": batch, "decode_tokens_per_s": {"median": speed}, "model": "m", "dtype": "bfloat16",
            "output_len": 128, "date": "2026-11-22", "machine": "test"}


def test_the_speedup_curve_plots_speculative_over_plain_per_batch_size():
    plain = [_result(1, 40.0), _result(4, 160.0)]
    lookup = [_result(4, 120.0), _result(1, 70.0), _result(16, 99.0)]  # 16 has no baseline: left out
    fig = speculation_speedup(plain, {"lookup": lookup})
    (curve, _) = fig.axes[0].lines
    assert list(curve.get_xdata()) == [1, 4]
    assert list(curve.get_ydata()) == pytest.approx([70 / 40, 120 / 160])


def test_the_figures_are_deterministic():
    assert figure_png(accepted_per_step(HISTORY)) == figure_png(accepted_per_step(HISTORY))
    plain, lookup = [_result(1, 40.0)], [_result(1, 70.0)]
    assert figure_png(speculation_speedup(plain, {"k": lookup})) == figure_png(speculation_speedup(plain, {"k": lookup}))

"""Lesson 05's picture of the kernel's thread mapping: built headless, deterministic."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from nanoengine.attention.numba_cuda import THREADS_PER_BLOCK  # noqa: E402
from nanoengine.viz import kernel_thread_mapping, save_figure  # noqa: E402

pytestmark = pytest.mark.l05


def _texts(fig: Figure) -> set[str]:
    return {t.get_text() for ax in fig.axes for t in ax.texts}


def test_the_thread_mapping_builds_and_is_byte_identical(tmp_path):
    first = save_figure(kernel_thread_mapping(), tmp_path / "first.png").read_bytes()
    second = save_figure(kernel_thread_mapping(), tmp_path / "second.png").read_bytes()
    assert first.startswith(b"\x89PNG") and first == second


def test_every_position_is_labelled_with_the_thread_that_reads_it():
    seq_len, block_size = 72, 16
    fig = kernel_thread_mapping(seq_len=seq_len, block_size=block_size)
    texts = _texts(fig)
    # One label per thread id (panel 2), the kernel's default block, and one block-table row per logical block.
    assert {str(t) for t in range(THREADS_PER_BLOCK)} <= texts
    assert sum(t.startswith("block_tables[0, ") for t in texts) == -(-seq_len // block_size)
    assert any(f"t+{THREADS_PER_BLOCK}" in t for t in texts)


def test_small_launches_draw_too():
    fig = kernel_thread_mapping(num_seqs=1, num_heads=1, threads=4, seq_len=3, block_size=2, head_dim=2)
    assert "seq 0\nhead 0" in _texts(fig)
    with pytest.raises(ValueError, match="at least 1"):
        kernel_thread_mapping(seq_len=0)

"""Lesson 17: the persistent input batch: a step's inputs written in place, not rebuilt.

Lesson 06's runner builds every step from scratch: Python lists of token ids, positions and
slots (one ``slot_for`` call per token), every block table padded again, then new tensors
from the lists. Between two decode steps almost nothing changes: each sequence has one new
token at the next position, and a block table gains a block every ``block_size`` steps.

So the fast path keeps its inputs in buffers allocated once and grown when a step needs more:
token ids, positions and slots ``[tokens]``, and one row of block table per live request,
which keeps its row until it finishes or is preempted. A step writes only the tokens it
computes and the blocks that changed since the request's last step; the slots come from the
table rows in one vectorized gather instead of a Python call per token.

Invariants: ``rows`` maps each live request to its row of ``block_tables``, and
row ``r`` of ``block_tables`` holds ``tables[r]`` followed by zeros (as lesson 06 pads them).
A row is reused only after :meth:`forget` named its request. The tensors a step gets
are views of the buffers: valid until the next :meth:`prepare`.
"""

from __future__ import annotations

import numpy as np
import torch

from nanoengine.attention.metadata import AttentionMetadata
from nanoengine.scheduler.output import ScheduledRequest
from nanoengine.scheduler.plan_delta import kept_prefix


def _grown(buffer: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``buffer``, or a larger copy with room for ``shape`` (a dimension that grows at least
    doubles, so growing is rare) whose new entries are zeros."""
    if all(n <= have for n, have in zip(shape, buffer.shape)):
        return buffer
    bigger = np.zeros([have if n <= have else max(n, 2 * have) for n, have in zip(shape, buffer.shape)], buffer.dtype)
    bigger[tuple(slice(0, n) for n in buffer.shape)] = buffer
    return bigger


class InputBatch:
    """A runner's step inputs, kept between steps (see the module's docstring)."""

    def __init__(self, block_size: int, device: torch.device | str = "cpu") -> None:
        self.block_size = block_size
        self.device = torch.device(device)
        self.rows: dict[str, int] = {}
        self.free_rows: list[int] = []
        self.tables: list[list[int]] = []
        self.block_tables = np.zeros((8, 16), np.int32)
        self.input_ids = np.zeros(256, np.int64)
        self.positions = np.zeros(256, np.int64)
        self.token_rows = np.zeros(256, np.int64)  # each token's request row

    def forget(self, request_ids: list[str]) -> None:
        """Free the rows of requests that finished or were preempted."""
        for request_id in request_ids:
            row = self.rows.pop(request_id, None)
            if row is not None:
                self.free_rows.append(row)

    def _row_for(self, request_id: str) -> int:
        row = self.rows.get(request_id)
        if row is None:
            if self.free_rows:
                row = self.free_rows.pop()  # it still holds its last owner's table, which the next write replaces
            else:
                row = len(self.tables)
                self.tables.append([])
                self.block_tables = _grown(self.block_tables, (row + 1, 1))
            self.rows[request_id] = row
        return row

    def _write_table(self, row: int, table: list[int]) -> None:
        """Bring the row up to ``table`` (zeros after it), writing only from the first block
        that changed."""
        written = self.tables[row]
        kept = kept_prefix(written, table)
        if kept == len(table) == len(written):
            return
        self.block_tables = _grown(self.block_tables, (1, len(table)))
        self.block_tables[row, kept : len(table)] = table[kept:]
        self.block_tables[row, len(table) : len(written)] = 0
        self.tables[row] = list(table)

    def prepare(self, scheduled: list[ScheduledRequest]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Token ids ``[T]``, positions ``[T]`` and the attention metadata of a step, equal to
        what lesson 06's flattening builds (block tables padded to the longest one)."""
        num_tokens = sum(len(s.token_ids) for s in scheduled)
        if num_tokens > self.input_ids.shape[0]:
            self.input_ids, self.positions, self.token_rows = (
                _grown(b, (num_tokens,)) for b in (self.input_ids, self.positions, self.token_rows)
            )
        query_start_loc, seq_lens, rows = [0], [], []
        start = 0
        for s in scheduled:
            row = self._row_for(s.request_id)
            self._write_table(row, s.block_table)
            count, first = len(s.token_ids), s.num_computed_tokens
            end = start + count
            if count == 1:
                self.input_ids[start] = s.token_ids[0]
                self.positions[start] = first
            else:
                self.input_ids[start:end] = s.token_ids
                self.positions[start:end] = np.arange(first, first + count)
            self.token_rows[start:end] = row
            rows.append(row)
            query_start_loc.append(end)
            seq_lens.append(first + count)
            start = end
        positions = self.positions[:num_tokens]
        slots = (self.block_tables[self.token_rows[:num_tokens], positions // self.block_size].astype(np.int64)
                 * self.block_size + positions % self.block_size)
        width = max(len(s.block_table) for s in scheduled)
        tables = self.block_tables[rows, :width]
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=torch.from_numpy(tables).to(self.device),
            slot_mapping=torch.from_numpy(slots).to(self.device),
            block_size=self.block_size,
        )
        return (torch.from_numpy(self.input_ids[:num_tokens]).to(self.device),
                torch.from_numpy(positions).to(self.device), metadata)

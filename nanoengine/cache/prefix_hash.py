"""Lesson 08: naming a block by everything that decides its K/V.

A block's keys and values depend on its own tokens *and on every token before it*, so a
block's name is a hash chained from its parent's: ``hash(parent_hash, tokens, extra_keys)``.
Two requests whose first ``k`` full blocks hold the same tokens get the same ``k`` hashes,
and the second can reuse the first one's blocks. ``extra_keys`` separate equal tokens whose
K/V differ anyway (a LoRA adapter changes them, lesson 14). Only full blocks are named: a
partly filled block is still being written.

SHA-256 over a fixed byte encoding, not Python's ``hash``: the same tokens get the same
name in every process and every run, and a collision (which would serve another prompt's
K/V) is out of reach.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple = ()) -> BlockHash:
    """The name of a full block holding ``token_ids``, whose predecessor is named ``parent``."""
    # BEGIN SOLUTION L08.T1
    digest = hashlib.sha256(parent or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    digest.update(repr(extra_keys).encode())
    return digest.digest()
    # END SOLUTION


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: tuple = (), known: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """The hashes of every full block of ``token_ids``, reusing the ``known`` leading ones."""
    hashes = list(known)
    for index in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[index * block_size : (index + 1) * block_size], extra_keys))
    return hashes

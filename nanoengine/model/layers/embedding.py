"""The vocabulary layers: token embedding in, logits out (optionally the same matrix).

A GGUF file run natively (``quantization="gguf"``, lesson 11) hands its vocabulary matrices
over as blocks rather than float tensors. They stay quantized: the embedding dequantizes only
the rows it looks up, the head multiplies by the quantized matrix, and a tied head by the
embedding's own, so the model still holds the matrix once.

Under tensor parallelism (lesson 12) both layers split the vocabulary into equal row ranges,
one per rank, after padding it to a multiple of the group size: rank ``r`` holds rows
``[r * rows, (r + 1) * rows)``. The embedding looks up the ids that fall in its range, writes
zeros for the rest, and the group all-reduces (each token's row is on exactly one rank); the
head computes its range of logits and the group all-gathers them, dropping the padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nanoengine.model.layers.linear import LinearMethod, LinearMethodBase, UnquantizedLinearMethod
from nanoengine.parallel.state import current_layout

if TYPE_CHECKING:
    from nanoengine.model.gguf_file import GGUFBlocks


class _VocabLayer(nn.Module):
    """What both vocabulary layers share: this rank's range of the (padded) vocabulary, and
    loading it from a float matrix, copied in, or from GGUF blocks, kept quantized.

    Invariant: ``vocab_start + rows`` ≤ the padded vocabulary; ``rows`` is the same on every
    rank, and the rows past ``vocab_size`` (padding) are zeros.
    """

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.tp = current_layout().tp
        self.vocab_size = vocab_size
        self.rows = -(-vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.rows

    def new_weight(self, hidden_size: int, dtype: torch.dtype) -> nn.Parameter:
        return nn.Parameter(torch.zeros(self.rows, hidden_size, dtype=dtype), requires_grad=False)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor | GGUFBlocks, shard_id: str | None = None
    ) -> None:
        if isinstance(loaded, torch.Tensor):
            if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
                raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, "
                                 f"expected {(self.vocab_size, param.shape[1])}")
            mine = loaded[self.vocab_start : self.vocab_start + self.rows]
            param.data[: mine.shape[0]].copy_(mine)
        elif self.tp.size > 1:
            raise ValueError("a GGUF vocabulary kept quantized cannot be split across tensor-parallel ranks")
        elif tuple(loaded.shape) != tuple(param.shape):
            raise ValueError(f"GGUF tensor {loaded.name!r} has shape {loaded.shape}, expected {tuple(param.shape)}")
        else:
            self.keep_quantized(loaded, param.dtype)

    def keep_quantized(self, blocks: GGUFBlocks, dtype: torch.dtype) -> None:
        """Hold the matrix as ``blocks`` decode it, scales in ``dtype``, instead of ``weight``."""
        raise NotImplementedError(f"{type(self).__name__} cannot hold a quantized matrix")


class VocabEmbedding(_VocabLayer):
    """Looks up one row per token id; lesson 12 splits the rows across ranks.

    Invariant: exactly one of ``weight`` (the float matrix) and ``quantized`` (a module with
    ``rows(ids)`` and ``forward(x) = x @ Wᵀ``, once GGUF blocks were loaded) holds the matrix.
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__(vocab_size)
        self.weight = self.new_weight(hidden_size, dtype)
        self.quantized: nn.Module | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.rows(input_ids)
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # BEGIN SOLUTION L12.T2
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows)
        rows = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        return self.tp.all_reduce(rows * mine.unsqueeze(-1).to(rows.dtype))
        # END SOLUTION

    def keep_quantized(self, blocks: GGUFBlocks, dtype: torch.dtype) -> None:
        """Hold the matrix as row-addressable quantized codes; the float ``weight`` goes."""
        # The quantization methods import the layers, so the layers import them where used.
        from nanoengine.quant.gguf import gguf_rows_weight

        self.quantized = gguf_rows_weight(blocks, dtype)
        del self.weight


class QuantizedMatrixMethod(LinearMethodBase):
    """The head's method once its matrix is quantized: ``layer.quantized(x)`` does the matmul.

    Not an :class:`UnquantizedLinearMethod`, so the fast path's oneDNN packing leaves it alone.
    """

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return layer.quantized(x)


class TiedEmbeddingMethod(UnquantizedLinearMethod):
    """A tied head's method: the plain one over the embedding's matrix, unless the embedding
    loaded it quantized; then, after loading, the head switches to that quantized matrix."""

    def __init__(self, embedding: VocabEmbedding) -> None:
        self.embedding = embedding

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.embedding.quantized is not None:
            layer.use_quantized(self.embedding.quantized)


class LMHead(_VocabLayer):
    """Projects hidden states to vocabulary logits.

    With tied embeddings the head shares the embedding's ``weight`` parameter (one tensor in
    memory, loaded once), as the checkpoint has no separate ``lm_head.weight``. Like the
    linear layers it applies its weight through a :class:`LinearMethod`, so the CPU fast path
    (lesson 15) can swap in prepacked weights. Invariant: it holds either ``weight`` or,
    quantized, ``quantized`` (the tied embedding's own module when tied).
    """

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, tied_to: VocabEmbedding | None) -> None:
        super().__init__(vocab_size)
        if tied_to is not None:
            self.weight = tied_to.weight
            self.linear_method: LinearMethod = TiedEmbeddingMethod(tied_to)
        else:
            self.weight = self.new_weight(hidden_size, dtype)
            self.linear_method = UnquantizedLinearMethod()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear_method.apply(self, hidden, None)
        if self.tp.size == 1:
            return logits
        # BEGIN SOLUTION L12.T3
        return self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
        # END SOLUTION

    def keep_quantized(self, blocks: GGUFBlocks, dtype: torch.dtype) -> None:
        """An untied head's own blocks, run in their own kind (the int4 kernel for 4-bit types)."""
        from nanoengine.quant.gguf import gguf_linear_weight

        self.use_quantized(gguf_linear_weight(blocks, dtype))

    def use_quantized(self, matrix: nn.Module) -> None:
        """Multiply by ``matrix`` (``forward(x) = x @ Wᵀ``) from now on; the float weight goes."""
        del self.weight
        self.quantized = matrix
        self.linear_method = QuantizedMatrixMethod()

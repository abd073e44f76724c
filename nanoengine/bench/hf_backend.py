"""``bench throughput --backend hf``: the same prompts through Hugging Face ``generate``, the
baseline vLLM's ``benchmark_throughput --backend hf`` measures an engine against.

``generate`` pads a batch to its longest prompt and runs every row until the batch's longest
output is done, with no KV paging and no admission of new requests mid-batch: what continuous
batching over a paged cache is built to beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nanoengine.model.loader import load_tokenizer
from nanoengine.platform import resolve_device, resolve_dtype


def load_hf_model(path: Path, dtype: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model at ``path`` (an HF directory or a ``.gguf``, as ``resolve_model_path`` gives),
    built by transformers with SDPA attention in the dtype nanoengine would pick, and the
    tokenizer nanoengine uses, so both backends get the same token ids."""
    from transformers import AutoModelForCausalLM

    device = resolve_device("auto")
    torch_dtype = resolve_dtype(dtype, device)
    where = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    hf_model = AutoModelForCausalLM.from_pretrained(
        path.parent if where else path, **where, dtype=torch_dtype, attn_implementation="sdpa"
    )
    return hf_model.to(device).eval(), load_tokenizer(path)


def _left_padded(prompts: Sequence[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask with every prompt right-aligned, as decoder-only
    ``generate`` needs: new tokens are appended at the right of every row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


@torch.inference_mode()
def hf_generate(
    model: PreTrainedModel,
    requests: Sequence[tuple[list[int], int]],
    max_batch_size: int,
    pad_id: int,
    on_batch_done: Callable[[int], None] = lambda n: None,
) -> list[list[int]]:
    """Greedy ``generate`` over ``(prompt ids, output_len)`` requests in batches of
    ``max_batch_size``, in order; returns each request's ``output_len`` new ids. EOS is never
    allowed to end a row early (``min_new_tokens == max_new_tokens``); as in vLLM's hf backend,
    a batch runs every row to its longest output. ``on_batch_done(n)`` is told each batch's
    size, for a progress bar."""
    outputs = []
    for start in range(0, len(requests), max_batch_size):
        batch = requests[start : start + max_batch_size]
        ids, mask = _left_padded([p for p, _ in batch], pad_id, model.device)
        new_tokens = max(o for _, o in batch)
        generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, min_new_tokens=new_tokens,
                                   max_new_tokens=new_tokens, pad_token_id=pad_id)[:, ids.shape[1] :]
        outputs += [row[:o].tolist() for row, (_, o) in zip(generated, batch)]
        on_batch_done(len(batch))
    return outputs

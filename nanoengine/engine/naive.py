"""Lessons 01–02: the decode loop, first recomputing everything, then with a KV cache.

Both loops are generators of token ids: they run the model only when the caller asks for
the next token, so the caller alone decides when a sequence stops. They stay in the package
as oracles: every faster engine must produce the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import torch

from nanoengine.attention import ContiguousKVCache, NoCache
from nanoengine.engine.detokenizer import IncrementalDetokenizer
from nanoengine.engine.stop_checker import check_token_stop, find_stop_string
from nanoengine.model.llama import head_dim_of
from nanoengine.model.loader import LoadedModel
from nanoengine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from nanoengine.request import Request, RequestStatus
from nanoengine.sampling import sample_next_tokens

# Maps the last position's logits ([vocab], float32) to the next token id.
NextToken = Callable[[torch.Tensor], int]


@torch.inference_mode()
def recompute_decode(model: torch.nn.Module, prompt_token_ids: Sequence[int], next_token: NextToken) -> Iterator[int]:
    """Yield tokens forever, running the model over the *whole* sequence at every step.

    Step ``n`` costs a forward over ``prompt + n`` tokens, so generating N tokens costs
    O(N²) token-forwards: the waste lesson 02 removes.
    """
    # BEGIN SOLUTION L01.T1
    device = next(model.parameters()).device
    token_ids = list(prompt_token_ids)
    no_cache = NoCache()
    while True:
        hidden = model(
            torch.tensor(token_ids, device=device), torch.arange(len(token_ids), device=device), no_cache
        )
        token = next_token(model.compute_logits(hidden[-1:])[0])
        token_ids.append(token)
        yield token
    # END SOLUTION


@torch.inference_mode()
def kv_cache_decode(
    model: torch.nn.Module, prompt_token_ids: Sequence[int], next_token: NextToken, cache: ContiguousKVCache
) -> Iterator[int]:
    """Yield tokens forever; the prompt is computed once (prefill), then one token per step.

    Prefill writes K/V of every prompt token into ``cache``; each decode step feeds only the
    newest token at its position and reads the rest from the cache.
    """
    # BEGIN SOLUTION L02.T3
    device = next(model.parameters()).device
    prompt = torch.tensor(list(prompt_token_ids), device=device)
    hidden = model(prompt, torch.arange(len(prompt), device=device), cache)
    cache.commit(len(prompt))
    while True:
        token = next_token(model.compute_logits(hidden[-1:])[0])
        yield token
        position = torch.tensor([cache.num_tokens], device=device)
        hidden = model(torch.tensor([token], device=device), position, cache)
        cache.commit(1)
    # END SOLUTION


class NaiveEngine:
    """Runs requests one at a time, start to finish (lessons 01–02's engine behind ``LLM``).

    ``use_kv_cache=False`` selects the recompute loop. Unseeded requests draw from one
    engine generator seeded at start, so a script's outputs are reproducible run to run.
    """

    def __init__(self, loaded: LoadedModel, use_kv_cache: bool = True, seed: int = 0) -> None:
        self.loaded = loaded
        self.use_kv_cache = use_kv_cache
        self.generator = torch.Generator().manual_seed(seed)

    def _token_stream(self, request: Request, next_token: NextToken) -> Iterator[int]:
        model = self.loaded.model
        if not self.use_kv_cache:
            return recompute_decode(model, request.prompt_token_ids, next_token)
        config = self.loaded.hf_config
        cache = ContiguousKVCache(
            config.num_hidden_layers,
            request.max_total_tokens(self.loaded.max_model_len),
            config.num_key_value_heads,
            head_dim_of(config),
            self.loaded.dtype,
            self.loaded.device,
        )
        return kv_cache_decode(model, request.prompt_token_ids, next_token, cache)

    def run(self, request: Request) -> Iterator[RequestOutput]:
        """Generate ``request`` to the end, yielding its cumulative output after every token."""
        params = request.params
        generator = self.generator if params.seed is None else torch.Generator().manual_seed(params.seed)
        detokenizer = (
            IncrementalDetokenizer(self.loaded.tokenizer, request.prompt_token_ids, params.skip_special_tokens)
            if params.detokenize
            else None
        )

        def next_token(logits: torch.Tensor) -> int:
            return sample_next_tokens(logits[None], [params], [generator], [request.banned_token_ids()])[0]

        request.status = RequestStatus.RUNNING
        text = ""
        for token in self._token_stream(request, next_token):
            request.output_token_ids.append(token)
            request.first_token_time = request.first_token_time or time.monotonic()
            stopped = check_token_stop(request, self.loaded.max_model_len)
            if detokenizer is not None:
                delta = detokenizer.add(token) + (detokenizer.flush() if stopped else "")
                text = detokenizer.text
                if params.stop and request.status != RequestStatus.FINISHED_STOPPED and len(request.output_token_ids) >= params.min_tokens:
                    match = find_stop_string(text, len(delta), params.stop, params.include_stop_str_in_output)
                    if match is not None:
                        request.stop_reason, cut = match
                        request.status = RequestStatus.FINISHED_STOPPED
                        text = text[:cut]
            if request.status.finished:
                request.finished_time = time.monotonic()
            yield make_request_output(request, text)
            if request.status.finished:
                return


def make_request_output(request: Request, text: str) -> RequestOutput:
    """The user-facing snapshot of a request (copies, so later tokens do not leak into it)."""
    completion = CompletionOutput(
        index=0,
        text=text,
        token_ids=list(request.output_token_ids),
        finish_reason=request.finish_reason,
        stop_reason=request.stop_reason,
    )
    return RequestOutput(
        request_id=request.request_id,
        prompt=request.prompt,
        prompt_token_ids=list(request.prompt_token_ids),
        prompt_logprobs=None,
        outputs=[completion],
        finished=request.status.finished,
        metrics=RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time),
    )

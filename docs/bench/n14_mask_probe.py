"""Probe: the cost of one step's token mask for a JSON schema at SmolLM2's 49,152-token
vocabulary, xgrammar against llguidance, following a valid document token by token."""
import json, time, statistics
import torch
from nanoengine.model.bundled import bundled_model_path

torch.set_num_threads(1)
path = bundled_model_path("smollm2-135m-instruct")
from nanoengine.model.loader import load_tokenizer as lt  # type: ignore
tok = lt(path)
vocab = len(tok)
schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
          "tags": {"type": "array", "items": {"type": "string"}}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "tags", "kind"]}
doc = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "engines", "poetry"], "kind": "cat"})
ids = tok(doc, add_special_tokens=False)["input_ids"]
print("vocab", vocab, "doc tokens", len(ids))

import xgrammar as xgr
t = time.perf_counter()
info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
compiler = xgr.GrammarCompiler(info)
t1 = time.perf_counter()
compiled = compiler.compile_json_schema(json.dumps(schema))
t2 = time.perf_counter()
matcher = xgr.GrammarMatcher(compiled)
bitmask = xgr.allocate_token_bitmask(1, vocab)
times = []
for token in ids:
    s = time.perf_counter(); matcher.fill_next_token_bitmask(bitmask); times.append(time.perf_counter() - s)
    assert matcher.accept_token(token), token
logits = torch.randn(1, vocab)
s = time.perf_counter()
for _ in range(100): xgr.apply_token_bitmask_inplace(logits, bitmask)
apply = (time.perf_counter() - s) / 100
print(f"xgrammar: tokenizer info {t1-t:.2f} s, compile {t2-t1:.3f} s, mask median {statistics.median(times)*1e6:.0f} us "
      f"p90 {sorted(times)[int(0.9*len(times))]*1e6:.0f} us max {max(times)*1e6:.0f} us; apply {apply*1e6:.0f} us")

import llguidance, llguidance.hf, llguidance.torch as llt
t = time.perf_counter()
lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
t1 = time.perf_counter()
grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
m = llguidance.LLMatcher(lltok, grammar)
t2 = time.perf_counter()
mask = llt.allocate_token_bitmask(1, vocab)
times = []
for token in ids:
    s = time.perf_counter(); llt.fill_next_token_bitmask(m, mask, 0); times.append(time.perf_counter() - s)
    assert m.consume_token(token), (token, m.get_error())
print(f"llguidance: tokenizer {t1-t:.2f} s, compile {t2-t1:.3f} s, mask median {statistics.median(times)*1e6:.0f} us "
      f"p90 {sorted(times)[int(0.9*len(times))]*1e6:.0f} us max {max(times)*1e6:.0f} us")

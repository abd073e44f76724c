"""The benchmark commands, shaped like vLLM's: their workloads (shared-prefix random prompts,
JSONL datasets, spread lengths, Poisson arrivals), their summary math, and ``bench
throughput`` / ``bench latency`` end to end on a tiny model; and ``nanoengine generate``,
which runs the engine as users get it (the fast path on)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import statistics

import pytest

from nanoengine import LLM, SamplingParams, cli
from nanoengine.bench.datasets import DatasetRequest, load_jsonl_dataset, random_lengths, random_token_prompts
from nanoengine.bench.hf_backend import hf_generate, load_hf_model
from nanoengine.bench.serve import poisson_arrivals, summarize
from nanoengine.bench.stats import percentiles
from tests.zoo import build_model, build_tokenizer

pytestmark = pytest.mark.l15


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random-weight Llama saved as a Hugging Face directory, which both backends load."""
    path = tmp_path_factory.mktemp("tiny") / "llama-gqa"
    tokenizer = build_tokenizer()
    build_model("llama-gqa", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_shared_prefix_prompts_share_exactly_the_prefix():
    prompts = random_token_prompts([5, 9, 7, 5], vocab_size=1000, seed=3, prefix_len=12)
    assert [len(p) for p in prompts] == [17, 21, 19, 17]
    assert all(p[:12] == prompts[0][:12] for p in prompts)
    assert len({tuple(p[12:13]) for p in prompts}) > 1 and prompts[0] != prompts[3], "own parts must differ"
    assert all(0 <= t < 1000 for p in prompts for t in p)


def test_random_prompts_are_deterministic_in_the_seed():
    assert random_token_prompts([8, 8], 500, seed=1, prefix_len=4) == random_token_prompts([8, 8], 500, 1, 4)
    other = random_token_prompts([8, 8], 500, seed=2, prefix_len=4)
    assert other[0][:4] != random_token_prompts([8, 8], 500, 1, 4)[0][:4]
    assert random_token_prompts([3], 500, seed=1) == [random_token_prompts([3, 9], 500, seed=1)[0]]


def test_range_ratio_bounds_the_lengths():
    lengths = random_lengths(400, 192, 100, 0.333, seed=0)
    prompts, outputs = [p for p, _ in lengths], [o for _, o in lengths]
    assert 128 <= min(prompts) < 135 and 250 < max(prompts) <= 256, "W3: prompts of 128-256 tokens"
    assert 67 <= min(outputs) and max(outputs) <= 133
    assert random_lengths(5, 64, 32, 0.0) == [(64, 32)] * 5
    with pytest.raises(ValueError, match="range_ratio"):
        random_lengths(5, 64, 32, 1.0)


def test_jsonl_dataset_reads_text_and_token_id_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "Hello there", "output_len": 7}\n\n{"prompt_token_ids": [1, 2, 3]}\n')
    assert load_jsonl_dataset(path) == [DatasetRequest("Hello there", 7), DatasetRequest([1, 2, 3], None)]


@pytest.mark.parametrize("bad_line, reason", [
    ("not json", "not JSON"),
    ('{"text": "hi"}', "exactly one of"),
    ('{"prompt": "hi", "prompt_token_ids": [1]}', "exactly one of"),
    ('{"prompt": 3}', "non-empty string"),
    ('{"prompt_token_ids": [1, "2"]}', "list of integers"),
    ('{"prompt_token_ids": []}', "list of integers"),
    ('{"prompt": "hi", "output_len": 0}', "positive integer"),
    ('[1, 2]', "exactly one of"),
])
def test_jsonl_dataset_names_the_file_and_line_of_a_bad_line(tmp_path, bad_line, reason):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "fine"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"data\.jsonl, line 2: .*{reason}"):
        load_jsonl_dataset(path)


def test_jsonl_dataset_rejects_an_empty_or_missing_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the dataset has no requests"):
        load_jsonl_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="cannot read the dataset"):
        load_jsonl_dataset(tmp_path / "missing.jsonl")


def test_poisson_arrivals_are_seeded_with_mean_gap_one_over_rate():
    times = poisson_arrivals(4000, request_rate=8.0, seed=5)
    assert times == poisson_arrivals(4000, 8.0, seed=5) and times != poisson_arrivals(4000, 8.0, seed=6)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0.0 and min(gaps) >= 0
    assert statistics.fmean(gaps) == pytest.approx(1 / 8, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 8, rel=0.1), "exponential gaps: stdev equals the mean"
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0)


def test_percentiles_interpolate_between_ranks_as_numpy():
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values, (10, 50, 99)) == {"p10": pytest.approx(10.9), "p50": 50.5, "p99": pytest.approx(99.01)}
    assert percentiles([], (50,)) == {"p50": 0.0}


def test_serve_summary_counts_each_requests_real_lengths():
    results = [
        {"stamps": [0.1, 0.2, 0.4], "prompt_tokens": 10, "output_tokens": 3, "e2e": 0.5},
        {"stamps": [0.3, 0.4], "prompt_tokens": 30, "output_tokens": 4, "e2e": 0.6},  # a chunk with 2 tokens
        {"stamps": [], "prompt_tokens": 5, "output_tokens": 0, "e2e": 0.2},  # nothing streamed
    ]
    run = summarize(results, elapsed=2.0)
    assert run["requests_per_s"] == 1.5 and run["output_tokens_per_s"] == 3.5
    assert run["total_tokens_per_s"] == (10 + 30 + 5 + 3 + 4) / 2.0
    assert run["ttft_s"] == {"p50": pytest.approx(0.2), "p99": pytest.approx(0.298), "mean": pytest.approx(0.2)}
    assert run["tpot_ms"]["mean"] == pytest.approx((200 + 100) / 2), "TPOT = (e2e - ttft) / (tokens - 1)"
    assert run["itl_ms"] == {"p50": pytest.approx(100), "p99": pytest.approx(198), "mean": pytest.approx(400 / 3)}
    assert run["e2e_s"]["p50"] == pytest.approx(0.5) and run["e2e_s"]["mean"] == pytest.approx(1.3 / 3)


def test_bench_serve_reports_an_unreachable_server_in_one_line(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "3",
            "--num-iters", "1"]
    # in a thread of its own: bench serve calls asyncio.run, and check("l15") in a notebook runs
    # the tests inside Jupyter's event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        code = pool.submit(cli.main, args).result()
    err = capsys.readouterr().err
    assert code == 2 and f"error: request to http://127.0.0.1:{port} failed (ConnectError" in err
    assert "Traceback" not in err


def test_generate_command_prints_completions(tiny_model, capsys):
    code = cli.main(["generate", str(tiny_model), "--prompt", "ab cd", "--prompt", "東京",
                     "--max-tokens", "5", "--temperature", "0", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert code == 0
    assert "--- 'ab cd'" in out and "--- '東京'" in out


def test_hf_backend_generates_what_nanoengine_generates(tiny_model):
    """Same model, same prompts, greedy: the baseline does the same work, token for token,
    whatever the padding of its batch, and EOS never cuts a row short."""
    model, tokenizer = load_hf_model(tiny_model, "float32")
    requests = [(p, o) for p, o in zip(random_token_prompts([3, 9, 5], len(tokenizer), seed=1), [6, 2, 4])]
    ours = LLM(str(tiny_model), dtype="float32", kv_cache_memory_bytes=2**20).generate(
        [{"prompt_token_ids": p} for p, _ in requests],
        [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in requests], use_tqdm=False)
    assert hf_generate(model, requests, 2, tokenizer.pad_token_id) == [out.outputs[0].token_ids for out in ours]
    eos = model.generation_config.eos_token_id = ours[0].outputs[0].token_ids[0]  # its first choice, now EOS
    (first,) = hf_generate(model, requests[:1], 1, tokenizer.pad_token_id)
    assert len(first) == 6 and first[0] != eos, "EOS is held back until output_len"


@pytest.mark.parametrize("backend", ["nanoengine", "hf"])
def test_bench_throughput_records_both_backends(tiny_model, tmp_path, backend):
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", str(tiny_model), "--backend", backend, "--num-prompts", "5",
                     "--input-len", "6", "--output-len", "4", "--prefix-len", "4", "--range-ratio", "0.5",
                     "--hf-max-batch-size", "2", "--num-iters", "2", "--dtype", "float32",
                     "--kv-cache-memory", "1MiB", "--result-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["backend"] == backend and record["num_prompts"] == 5 and record["prefix_len"] == 4
    assert record["model"] == "llama-gqa" and record["dtype"] == "float32"
    for key in ("requests_per_s", "total_tokens_per_s", "output_tokens_per_s", "elapsed_s"):
        assert set(record[key]) == {"median", "min", "max"} and record[key]["min"] > 0
    rates = record["requests_per_s"]["median"], record["output_tokens_per_s"]["median"]
    assert rates[1] > rates[0], "several output tokens per request"
    assert ("ttft_p50_s" in record) == (backend == "nanoengine"), "hf generate does not stream"


# a 32-token prefix is 2 blocks: the warm-up's second prompt hits them, then 3 of 4 prompts in each of 2 runs
@pytest.mark.parametrize("prefix_len, hits", [(0, 0), (32, 2 + 2 * 3 * 2)])
def test_bench_throughput_shares_only_the_prefix(tiny_model, tmp_path, prefix_len, hits):
    """Each run draws new prompts, so the prefix cache never serves one from an earlier run (nor
    from the warm-up); a shared prefix is computed once per run and hit by the rest. One
    request at a time, so each finds the blocks of those before it."""
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", str(tiny_model), "--num-prompts", "4", "--input-len", "40",
                     "--output-len", "2", "--prefix-len", str(prefix_len), "--num-iters", "2", "--max-num-seqs", "1",
                     "--dtype", "float32", "--kv-cache-memory", "1MiB", "--result-json", str(out)]) == 0
    assert json.loads(out.read_text())["prefix_cache_hit_blocks"] == hits


def test_bench_throughput_reads_a_dataset(tiny_model, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "The quick brown fox", "output_len": 3}\n{"prompt_token_ids": [5, 6, 7, 8]}\n')
    out = tmp_path / "throughput.json"
    assert cli.main(["bench", "throughput", str(tiny_model), "--dataset-path", str(data), "--output-len", "2",
                     "--num-iters", "1", "--dtype", "float32", "--kv-cache-memory", "1MiB",
                     "--result-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["num_prompts"] == 2 and record["input_len"] is None and record["dataset_path"] == str(data)
    per_run = record["output_tokens_per_s"]["median"] * record["elapsed_s"]["median"]
    assert per_run == pytest.approx(3 + 2), "output_len from the line, else --output-len"


def test_bench_latency_llm_engine_reports_percentiles(tiny_model, tmp_path):
    out = tmp_path / "latency.json"
    assert cli.main(["bench", "latency", str(tiny_model), "--engine", "llm", "--batch-size", "2", "--input-len", "6",
                     "--output-len", "5", "--num-iters", "2", "--max-num-seqs", "4", "--dtype", "float32",
                     "--result-json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["engine"] == "llm" and record["batch_size"] == 2
    request = record["request_latency_s"]
    assert list(request) == ["mean", "p10", "p25", "p50", "p75", "p90", "p99"]
    assert 0 < request["p10"] <= request["p50"] <= request["p99"] <= record["latency_s"]["max"]
    assert 0 < record["prefill_s"]["min"] < record["latency_s"]["min"]
    assert record["prefill_tokens_per_s"]["median"] > 0 and record["decode_tokens_per_s"]["median"] > 0
    assert len(record["decode_step_ms"]) == 5 - 1, "one step per decoded token of the batch"


def test_bench_latency_naive_engines_take_one_request(tiny_model, capsys):
    assert cli.main(["bench", "latency", str(tiny_model), "--engine", "paged", "--batch-size", "2"]) == 2
    assert "needs --engine llm" in capsys.readouterr().err


def test_bench_progression_runs_every_stage_and_draws_the_chart(tiny_model, tmp_path):
    from matplotlib.figure import Figure

    from nanoengine.bench.progression import STAGES
    from nanoengine.viz import progression_chart

    out = tmp_path / "progression.json"
    assert cli.main(["bench", "progression", str(tiny_model), "--num-prompts", "3", "--prefix-len", "8",
                     "--input-len", "4", "--output-len", "3", "--num-iters", "2", "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [s["label"] for s in result["stages"]] == [s.label for s in STAGES]
    assert all(s["total_tokens_per_s"]["median"] > 0 for s in result["stages"])
    assert result["stages"][-1]["fast_path"] and not result["stages"][3]["fast_path"]
    fig = progression_chart(result)
    assert isinstance(fig, Figure)
    assert "1×" in fig.axes[0].texts[0].get_text()  # lesson 01 is the unit of the speed-ups
